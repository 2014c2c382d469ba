"""Rotate the residual stream by a randomized orthogonal matrix (QuaRot, Ashkboos et al. 2024).

Matches   the residual stream of ``qpass.rotation.residual_stream_rotation`` (from the input embedding through
          the residual adds; its readers, writers, embedding tables and norms), found from the graph alone
Changes   1. a tied reader (lm_head sharing the embedding table) gets its own copy of the table (untied)
          2. every norm weight on the stream is folded into the linears that read it (``fold_norm_weight``:
             ``W *= g``, ``b += W beta``; the norm keeps weight 1, bias 0); a reader without a bias gets a zero
             one first where the norm has a bias
          3. Q [d, d] orthogonal, seeded: ``kind: hadamard`` is ``D kron(H_m, H_p) / sqrt(d)`` (random signs D,
             Sylvester H_p, Paley H_m; a seeded random orthogonal small factor where d has no such split),
             ``kind: random`` a Haar-random orthogonal matrix. With a LayerNorm on the stream Q is made to fix the
             all-ones vector (``Q <- M Q``, M a Householder reflection), so the LayerNorm's mean subtraction commutes
             with it: LN(x Q) = LN(x) Q once its weight and bias are folded. (SliceGPT/QuaRot instead fold the
             centring into the writers and turn LayerNorm into RMSNorm; fixing the all-ones direction needs no graph
             change, costs one reflection, and keeps the spread of everything orthogonal to the mean direction,
             which is all a LayerNorm's readers ever see.)
          4. readers ``W <- W Q``; writers ``W <- Qᵀ W``, ``b <- Qᵀ b``; embedding tables ``E <- E Q``
          The float model computes the same function (to float rounding); the rotated weights are in the state
          dict, and the plan records d, the kind, the seed and the structural edits (untie, zero biases)
Requires  nothing (no calibration); run it before any quantizer is inserted
Preserves nothing (untying and zero biases add nodes)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from qpass import folding
from qpass import patterns as P
from qpass.errors import RecipeError, UnsupportedOpError
from qpass.graph import LinearSite, is_quantizer, linear_sites, module_path, param_of
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, occurrences
from qpass.primitives import hadamard as H
from qpass import rotation as online_heads
from qpass.rotation import Stream, residual_stream_rotation

aten = torch.ops.aten
KINDS = ("hadamard", "random")


@dataclass(frozen=True)
class RotateConfig:
    name: ClassVar[str] = "rotate"
    field_docs: ClassVar[dict] = {
        "kind": "hadamard: randomized Hadamard (random signs times a Sylvester/Paley Hadamard of the stream width, "
                "a seeded random orthogonal small factor where the width has no Hadamard split); random: a "
                "Haar-random orthogonal matrix",
        "seed": "seed of the random signs / random orthogonal matrix (recorded in the plan)",
        "online": "an online Hadamard (one qpass.hadamard node, a fast Walsh-Hadamard transform) on the input of "
                  "every linear that writes the stream (down_proj, o_proj, fc2, ...), its weight compensated "
                  "(W <- W T): their input activations are quantized in the rotated basis",
        "heads": "rotate attention heads: V per head offline (v rows / o columns, block-diagonal Hadamard times "
                 "random signs) and Q and K per head online after RoPE (one qpass.hadamard node each, before the KV "
                 "cache), so K and V are quantized in a rotated basis",
    }

    kind: str = "hadamard"
    seed: int = 0
    online: bool = False
    heads: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RecipeError("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 <= self.seed < 2 ** 63:
            raise RecipeError("seed", f"must be a non-negative integer, got {self.seed}")


@dataclass(frozen=True)
class Rotate(Pass):
    """Fold the norms of the residual stream into its readers, then rotate the stream by an orthogonal Q."""

    config: RotateConfig = RotateConfig()
    name: ClassVar[str] = "rotate"
    preserves: ClassVar = ()

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        stream = _stream(gm)
        _check_unquantized(stream)
        edits = [("untie", *k) for k in _tied_readers(gm, stream)]
        _apply_edits(gm, edits)
        bias = [("bias", *k) for k in _bias_needs(gm, _stream(gm))]
        _apply_edits(gm, bias)
        edits += bias
        folded = _fold_norms(gm)
        stream = _stream(gm)
        q, kind = rotation_matrix(stream.dim, cfg.kind, cfg.seed, mean_preserving=bool(stream.layer_norms))
        changed = _rotate(gm, stream, q)
        near: list[str] = []
        online = _writer_keys(gm, stream) if cfg.online else []
        heads = online_heads.head_keys(gm, near) if cfg.heads else []
        v_rotated = online_heads.rotate_values(gm, near, cfg.seed) if cfg.heads else []
        _insert_online(gm, online, heads, cfg.seed, compensate=True)
        decisions = {"dim": stream.dim, "kind": kind, "seed": cfg.seed, "mean_preserving": bool(stream.layer_norms),
                     "edits": [list(e) for e in edits], "online": [list(k) for k in online],
                     "heads": [list(k) for k in heads], "values_rotated": v_rotated}
        stats = {"readers": len(stream.readers), "writers": len(stream.writers), "tables": len(stream.tables),
                 "norms_folded": folded, "layer_norms": len(stream.layer_norms), "untied": sum(
                     e[0] == "untie" for e in edits), "biases_added": sum(e[0] == "bias" for e in edits),
                 "params_rotated": changed, "online_hadamards": len(online) + 2 * len(heads),
                 "values_rotated": len(v_rotated)}
        return PassResult(modified=True, stats=stats, near_misses=near, plan=Plan(self.name, decisions=decisions))

    def streaming_refusal(self) -> str | None:
        return ("rotate rewrites every weight that reads or writes the residual stream together, which needs every "
                "weight in memory")

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Redo the structural edits (untied copies, zero biases); the rotated values are in the state dict."""
        _apply_edits(gm, [tuple(e) for e in plan.decisions.get("edits", ())])
        _insert_online(gm, [tuple(k) for k in plan.decisions.get("online", ())],
                       [tuple(k) for k in plan.decisions.get("heads", ())], int(plan.decisions.get("seed", 0)),
                       compensate=False)


def rotation_matrix(dim: int, kind: str, seed: int, mean_preserving: bool = False) -> tuple[torch.Tensor, str]:
    """(Q [dim, dim] float64 orthogonal, the kind built: hadamard | hadamard_random | random), from the seed."""
    if kind == "hadamard":
        q, built = H.randomized_hadamard(dim, seed)
    else:
        q, built = H.random_orthogonal(dim, seed), "random"
    return (H.mean_preserving(q) if mean_preserving else q), built


def _stream(gm: GraphModule) -> Stream:
    s = residual_stream_rotation(gm)
    if isinstance(s, str):
        raise UnsupportedOpError(f"rotate cannot rotate the residual stream: {s}",
                                 fix="leave rotate out of the recipe for this model")
    return s


def _check_unquantized(stream: Stream) -> None:
    for site in stream.readers + stream.writers:
        if is_quantizer(site.weight_use):
            raise UnsupportedOpError(f"rotate: {site.path} is already quantized; rotating it now would rotate "
                                     "the rounded weight", fix="put rotate before quantize/gptq in the recipe")


# ---------------------------------------------------------------------------------- structural edits
# An edit is (kind, linear module path, occurrence): ("untie", path, at) gives that linear its own copy of a
# weight it shares with an embedding; ("bias", path, at) gives it a zero bias. Occurrences count linear sites
# with that path in graph order, so another capture of the model finds the same linears.


def _keys(gm: GraphModule) -> tuple[list[LinearSite], list[tuple[str, int]]]:
    sites = linear_sites(gm)
    paths = [s.path or s.node.name for s in sites]
    return sites, list(zip(paths, occurrences(paths)))


def _tied_readers(gm: GraphModule, stream: Stream) -> list[tuple[str, int]]:
    """Readers whose weight is also an embedding table of the stream (tied lm_head), or another use of it."""
    sites, keys = _keys(gm)
    key_of = dict(zip([s.node for s in sites], keys))
    twins = P.storage_twins(gm)
    tables = {t.args[0].target for t in stream.tables}
    out = []
    for r in stream.readers:
        names = {r.weight.target, *twins.get(r.weight.target, ())}
        others = [u for u in P.weight_users(r.weight) if u is not r.node and u is not r.weight_use]
        if names & tables:
            out.append(key_of[r.node])
        elif others or twins.get(r.weight.target):
            raise UnsupportedOpError(f"rotate: the weight of {r.path} is shared with another use; rotating it would "
                                     "change that use too", fix="untie the weights before quantizing")
    return out


def _bias_needs(gm: GraphModule, stream: Stream) -> list[tuple[str, int]]:
    """Readers without a bias behind a norm that has one (folding the norm's bias needs theirs)."""
    sites, keys = _keys(gm)
    key_of = dict(zip([s.node for s in sites], keys))
    out = []
    for g in folding.analyze(gm).groups:
        if g.producer.node in stream.norm_weights and len(g.producer.params) > 1:
            out += [key_of[c.site.node] for c in g.consumers if c.site.bias is None]
    return list(dict.fromkeys(out))


def _apply_edits(gm: GraphModule, edits: list[tuple]) -> None:
    sites, keys = _keys(gm)
    by_key = dict(zip(keys, sites))
    found = []
    for kind, path, at in edits:
        site = by_key.get((path, at))
        if site is None:
            raise PlanError(f"the rotate plan edits linear {path!r} (occurrence {at}), which this graph does not have",
                            fix="apply plans to a capture of the model they were made on")
        found.append((kind, site))
    for kind, site in found:
        if kind == "untie":
            _untie(gm, site)
        elif kind == "bias":
            folding.add_zero_bias(gm, "linear", site)
        else:
            raise PlanError(f"the rotate plan has an unknown edit {kind!r}", fix="quantize again and save")
    gm.graph.lint()
    gm.recompile()


def _untie(gm: GraphModule, site: LinearSite) -> None:
    """Give `site` its own copy of its weight, under a new name beside it (the table keeps the old one)."""
    value = param_of(gm, site.weight).detach().clone()
    target = folding._new_param_target(gm, site.weight, "weight_untied", value)
    with gm.graph.inserting_before(site.node if site.weight_use is site.weight else site.weight_use):
        node = gm.graph.get_attr(target)
    node.meta["val"] = folding._attr(gm, target)
    user = site.node if site.weight_use is site.weight else site.weight_use
    user.replace_input_with(site.weight, node)


# ------------------------------------------------------------------------------------------ the rotation


def _fold_norms(gm: GraphModule) -> int:
    """Fold each stream norm's weight (and bias) into its readers, analysing again after each fold."""
    done = 0
    for _ in range(10_000):
        stream = _stream(gm)
        groups = {g.producer.node: g for g in folding.analyze(gm).groups}
        inner = {a for n in stream.norm_weights if n.target is aten.add.Tensor for a in n.args}   # add(g * x, b)
        todo = [n for n in stream.norm_weights if n not in inner and not _neutral(gm, n)]
        if not todo:
            return done
        n = todo[0]
        g = groups.get(n)
        if g is None or not bool(g.consumed.all()):
            why = "; ".join(f"{k}: {v}" for k, v in folding.analyze(gm).unfoldable.items())
            raise UnsupportedOpError(f"rotate: the weight of norm {n.name} on the residual stream cannot be folded "
                                     f"into its readers ({why or 'not all of its channels are read by linears'})",
                                     where=module_path(gm, n))
        folding.fold_norm_weight(gm, g)
        done += 1
    raise RuntimeError("rotate: norm folding did not converge")


def _neutral(gm: GraphModule, n: Node) -> bool:
    """The norm weight node `n` is already the identity (weights 1, biases 0)."""
    params = folding.producer_at(gm, n)
    if isinstance(params, folding.Producer):
        vals = [(param_of(gm, p).detach(), i) for i, (p, _) in enumerate(params.params)]
        return all(bool((v == (1.0 if i == 0 else 0.0)).all()) for v, i in vals)
    if n.target is aten.layer_norm.default:
        w, b = (n.args + (None, None, None, None))[2:4]
        return all(a is None for a in (w, b))
    return False


def _rotate(gm: GraphModule, stream: Stream, q: torch.Tensor) -> int:
    done: set[tuple[str, str]] = set()

    def once(role: str, node: Node) -> bool:
        key = (role, node.target)
        if key in done:
            return False
        done.add(key)
        return True

    for r in stream.readers:
        if once("reader", r.weight):
            folding._set_canonical(gm, r, folding.canonical_weight(gm, r).double() @ q)
    for w in stream.writers:
        if once("writer", w.weight):
            folding._set_canonical(gm, w, q.T @ folding.canonical_weight(gm, w).double())
            if w.bias is not None:
                b = param_of(gm, w.bias)
                with torch.no_grad():
                    b.copy_((b.detach().double() @ q).to(b))
    for t in stream.tables:
        if once("table", t.args[0]):
            e = param_of(gm, t.args[0])
            with torch.no_grad():
                e.copy_((e.detach().double() @ q).to(e))
    return len(done)


# ------------------------------------------------------------------------------------ online Hadamards


def _writer_keys(gm: GraphModule, stream: Stream) -> list[tuple[str, int]]:
    sites, keys = _keys(gm)
    key_of = dict(zip([s.node for s in sites], keys))
    return list(dict.fromkeys(key_of[w.node] for w in stream.writers))


def _insert_online(gm: GraphModule, online: list[tuple], heads: list[tuple], seed: int, compensate: bool) -> None:
    """A qpass.hadamard node with seeded random signs S on the input of each linear of `online` (with
    ``compensate``, its weight becomes W S T: the function is kept) and on Q and K of each attention of `heads`
    (``online_heads``; no signs: Q and K get the same transform)."""
    sites, keys = _keys(gm)
    by_key = dict(zip(keys, sites))
    for i, (path, at) in enumerate(online):
        site = by_key.get((path, at))
        if site is None:
            raise PlanError(f"the rotate plan puts an online Hadamard before linear {path!r} (occurrence {at}), which "
                            "this graph does not have", fix="apply plans to a capture of the model they were made on")
        n = param_of(gm, site.weight).shape[site.in_axis]
        factor, _ = H.small_factor(n)
        signs = H.random_signs(n, seed + 1 + i)
        if compensate:
            w = folding.canonical_weight(gm, site).double()
            folding._set_canonical(gm, site, w @ (signs.view(n, 1) * H.transform_matrix(n, factor)))
        node = online_heads.hadamard_node(gm, site.node, site.input, factor, near=site.weight, signs=signs)
        site.node.replace_input_with(site.input, node)
    online_heads.insert_heads(gm, heads)
    gm.graph.lint()
    gm.recompile()


__all__ = ["Rotate", "RotateConfig", "rotation_matrix"]
