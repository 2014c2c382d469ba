"""Native segments (backends/torch_packed/segments.py): runs of a decode graph replayed by one C call."""
from __future__ import annotations

import ctypes
import operator

import pytest
import torch

import qpass
from qpass.backends.torch_packed import native
from tests import toy

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

if native.available():
    from qpass.backends.torch_packed import runtime, segments as S
    from qpass.backends.torch_packed.runtime import additive_mask

W4 = {"bits": 4, "granularity": "per_group", "group_size": 16}
W8 = {"bits": 8, "granularity": "per_channel"}
A8 = {"bits": 8, "granularity": "per_token", "dynamic": True}
KV4 = {"bits": 4, "granularity": "per_head", "dynamic": True}


def _recipe(weights, acts=None, kv=None, lm_head=False):
    q = {"weights": weights, **({"activations": acts} if acts else {})}
    if not lm_head:
        q["ignore"] = ["lm_head"]
    return {"passes": [{"quantize": q}] + ([{"kv_cache": {"keys": kv, "values": kv}}] if kv else [])}


def _lowered(recipe, kernel=None, family="llama"):
    model = toy.hf_model(family)
    pm = qpass.lower(qpass.apply(model, recipe, progress=False), "torch", kernels="exact")
    if kernel is not None:                               # one kernel at M = 1 for every linear it applies to
        for m in pm.linears().values():
            m.plan = {**m.plan, 1: kernel}
    return pm


def _steps(n_decode=6, prompt=5):
    ids = toy.token_ids(1, prompt + n_decode)
    return [(ids[:, :prompt], torch.arange(prompt))] + [
        (ids[:, i:i + 1], torch.tensor([i])) for i in range(prompt, prompt + n_decode)]


def _decode(gm, steps):
    with torch.no_grad():
        return [gm(input_ids=ids, cache_position=pos) for ids, pos in steps]


def _segments(gm) -> list:
    return [v for v in gm.__dict__.values() if isinstance(v, S.Segment)]


def _pair(pm, length=32):
    """(graph with segments, the same graph without) of one lowered model."""
    with_seg = pm.decode_graph(length)
    mp = pytest.MonkeyPatch()
    mp.setenv(S.ENV_OFF, "0")
    try:
        without = pm.decode_graph(length + 1)
    finally:
        mp.undo()
    return with_seg, without


@pytest.mark.parametrize("recipe,kernel", [
    (_recipe(W4), "q4avx2"), (_recipe(W4), "q4a8"), (_recipe(W4, lm_head=True), "q4a8"),
    (_recipe(W8), "w8avx2"), (_recipe(W8, A8), "i8avx2"), (_recipe(W4, A8, KV4), "q4i8"),
    (_recipe(W4, A8), "q4avx2"), (_recipe(W8, A8, KV4), "w8avx2")],
    ids=["w4-q4avx2", "w4-q4a8", "w4-lmhead", "w8-w8avx2", "w8a8-i8avx2", "w4a8kv4-q4i8", "w4a8-q4avx2-fq",
         "w8a8kv4-w8avx2-fq"])
def test_a_decode_tape_computes_what_the_graph_computes(recipe, kernel):
    pm = _lowered(recipe, kernel)
    if kernel not in {k for m in pm.linears().values() for k in m.plan.values()}:
        pytest.skip(f"{kernel} does not apply here")
    gm, ref = _pair(pm)
    stats = gm.meta[runtime.META_RUNTIME]
    assert stats["segments"] == 1 and stats["segment_nodes"] > 40 and stats["hoisted"] > 0
    steps = _steps()
    got, want = _decode(gm, steps), _decode(ref, steps)
    seg = _segments(gm)[0]
    assert seg.why is None, seg.why
    assert {S.T_ARANGE, S.T_EW, S.T_GATHER, S.T_ATT, S.T_RMS} <= set(seg.tape.prog.tolist())   # prologue taped too
    # prefill and the two calls that show the sizes run the fallback; the other decode steps the tape
    assert seg.calls == {"tape": len(steps) - 3, "fallback": 3}
    for a, b in zip(got, want):       # the same kernels; SiLU's polynomial exp is within a few ulp of torch's
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_without_silu_the_tape_is_bit_for_bit_the_graph():
    """OPT (LayerNorm and ReLU stay in torch, between segments): every taped op is its own kernel, so the logits
    are equal, not close."""
    pm = _lowered(_recipe(W4), "q4avx2", family="opt")
    gm, ref = _pair(pm)
    steps = _steps()
    got, want = _decode(gm, steps), _decode(ref, steps)
    segs = _segments(gm)
    layers = [s for s in segs if any(n.op == "call_method" for n in s.fallback.graph.nodes)]
    # a segment fed by another's n-sized output (the mask) compiles again once that one runs its tape (the
    # strides of its input change: checked by accepts)
    assert len(layers) == 2 and all(s.why is None and s.calls["tape"] >= 2 for s in segs)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_call_of_other_sizes_runs_the_fallback_and_a_plan_change_compiles_again():
    pm = _lowered(_recipe(W4), "q4a8")
    gm, ref = _pair(pm)
    steps = _steps(4)
    _decode(gm, steps), _decode(ref, steps)
    seg = _segments(gm)[0]
    assert seg.tape is not None
    two = [(toy.token_ids(1, 11)[:, 9:11], torch.tensor([9, 10]))]             # two tokens at once
    torch.testing.assert_close(_decode(gm, two)[0], _decode(ref, two)[0], rtol=2e-5, atol=2e-5)
    assert seg.calls["fallback"] == 4 and seg.tape is not None
    for m in pm.linears().values():                      # another kernel: the tape's pointers are stale
        m.plan = {**m.plan, 1: "q4avx2"}
    more = [(toy.token_ids(1, 14)[:, i:i + 1], torch.tensor([i])) for i in range(11, 14)]
    torch.testing.assert_close(torch.cat(_decode(gm, more)), torch.cat(_decode(ref, more)), rtol=2e-5, atol=2e-5)
    assert seg.tape is not None and seg.calls["tape"] == 2 + 1       # compiled again from the two calls after


def test_a_kernel_without_a_native_form_keeps_the_fallback_and_says_why():
    pm = _lowered(_recipe(W4), "dequant")
    gm, ref = _pair(pm)
    steps = _steps(3)
    torch.testing.assert_close(torch.cat(_decode(gm, steps)[1:]), torch.cat(_decode(ref, steps)[1:]))
    seg = _segments(gm)[0]
    assert seg.tape is None and "dequant" in seg.why and "no native form" in seg.why
    assert seg.calls == {"tape": 0, "fallback": len(steps)}


def test_a_position_past_the_cache_is_an_error_not_a_write_outside_it():
    pm = _lowered(_recipe(W4), "q4a8")
    gm = pm.decode_graph(8)
    ids = toy.token_ids(1, 9)
    _decode(gm, [(ids[:, :5], torch.arange(5))] + [(ids[:, i:i + 1], torch.tensor([i])) for i in range(5, 8)])
    assert _segments(gm)[0].tape is not None
    with pytest.raises((IndexError, RuntimeError)):
        _decode(gm, [(ids[:, 8:9], torch.tensor([8]))])


def test_switched_off_the_graph_keeps_its_nodes(monkeypatch):
    monkeypatch.setenv(S.ENV_OFF, "0")
    gm = _lowered(_recipe(W4), "q4a8").decode_graph(16)
    assert gm.meta[runtime.META_RUNTIME]["segments"] == 0 and not _segments(gm)
    assert sum(1 for n in gm.graph.nodes if n.target is runtime.rms_norm) == 5


def test_graph_nodes_sees_inside_the_segments():
    gm = _lowered(_recipe(W4), "q4a8").decode_graph(16)
    assert _segments(gm)
    assert sum(1 for n in gm.graph.nodes if n.target is runtime.rms_norm) == 0
    nodes = list(S.graph_nodes(gm))
    assert sum(1 for n in nodes if n.target is runtime.rms_norm) == 5
    assert sum(1 for n in nodes if n.target is runtime.attention) == 2
    assert not any(n.op == "call_method" and n.target == "__call__" for n in nodes)


# ------------------------------------------------------------------------------------------ the pass


class _Toy(torch.nn.Module):
    def __init__(self, read_mutated: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(8))
        self.read_mutated = read_mutated

    def forward(self, x, c):
        a = torch.ops.qpass_native.rms_norm.default(c if self.read_mutated else x, self.w, 1e-5)
        torch.ops.aten.fill_.Scalar(c, 1.0)              # an in-place write (not taped) no taped node depends on
        b = torch.ops.qpass_native.rms_norm.default(a, self.w, 1e-5)
        return torch.ops.aten.add.Tensor(a, b)


def _toy_graph(read_mutated: bool):
    gm = torch.fx.symbolic_trace(_Toy(read_mutated))
    x, c = torch.randn(1, 8), torch.randn(1, 8)
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(x, c.clone())
    for n in gm.graph.nodes:                             # the decode graph's nodes carry "val" (export)
        tm = n.meta.get("tensor_meta")
        if tm is not None:
            n.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype)
    return gm, x, c


@pytest.mark.parametrize("read_mutated", [False, True])
def test_hoisting_never_moves_a_write_across_a_read_of_the_same_tensor(read_mutated):
    gm, x, c = _toy_graph(read_mutated)
    want = gm(x, c.clone())
    stats = S.native_segments(gm, min_ops=1)
    order = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    mutate = order.index(torch.ops.aten.fill_.Scalar)
    calls = [i for i, n in enumerate(gm.graph.nodes) if n.op == "call_method" and n.target == "__call__"]
    if read_mutated:                                     # the first rms_norm reads c: fill_ stays after it
        assert stats["hoisted"] == 0 and stats["segments"] == 2
    else:                                                # fill_ moves above the run: one segment of 3 ops
        assert stats["hoisted"] >= 1 and stats["segments"] == 1 and mutate < order.index(operator.getitem)
        assert len(calls) == 1
    torch.testing.assert_close(gm(x, c.clone()), want)


def test_nothing_to_tape_leaves_the_graph_alone():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    gm = torch.fx.symbolic_trace(M())
    before = gm.code
    assert S.native_segments(gm) == {"segments": 0, "segment_nodes": 0, "hoisted": 0}
    assert gm.code == before


# ------------------------------------------------------------------------------------------ the C side


def test_a_bad_program_is_refused_with_its_instruction_index():
    lib = native.q4()
    x = torch.arange(8, dtype=torch.float32)
    out = torch.zeros(8)
    slots = (ctypes.c_void_p * 2)(x.data_ptr(), out.data_ptr())
    good = [S.T_SILU, 5, 0, 0, 1, 0, 8]
    prog = torch.tensor(good + [S.T_ADD, 6, 0, 0, 0, 0, 1, 0], dtype=torch.int64)    # ADD takes 7 words
    assert lib.tape_run(prog.data_ptr(), prog.numel(), ctypes.addressof(slots), 0, 1, None) == 2
    torch.testing.assert_close(out, torch.nn.functional.silu(x))                     # the first one ran
    prog = torch.tensor([99, 0], dtype=torch.int64)
    assert lib.tape_run(prog.data_ptr(), prog.numel(), ctypes.addressof(slots), 0, 1, None) == 1
    prog = torch.tensor(good[:4], dtype=torch.int64)                                  # truncated
    assert lib.tape_run(prog.data_ptr(), prog.numel(), ctypes.addressof(slots), 0, 1, None) == 1


@pytest.mark.parametrize("count", [1, 7, 8, 13, 64])
def test_tape_silu_and_silu_mul_match_torch(count):
    lib = native.q4()
    g = torch.Generator().manual_seed(count)
    x = torch.randn(count, generator=g) * 8
    x[0] = -100.0
    y = torch.randn(count, generator=g)
    out, out2 = torch.full((count + 1,), 7.0), torch.full((count + 1,), 7.0)
    slots = (ctypes.c_void_p * 4)(x.data_ptr(), y.data_ptr(), out.data_ptr(), out2.data_ptr())
    prog = torch.tensor([S.T_SILU, 5, 0, 0, 2, 0, count, S.T_SILU_MUL, 7, 0, 0, 1, 0, 3, 0, count],
                        dtype=torch.int64)
    assert lib.tape_run(prog.data_ptr(), prog.numel(), ctypes.addressof(slots), 0, 1, None) == 0
    torch.testing.assert_close(out[:count], torch.nn.functional.silu(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out2[:count], torch.nn.functional.silu(x) * y, rtol=1e-6, atol=1e-7)
    assert out[count] == 7.0 and out2[count] == 7.0                          # nothing written past the end


def test_dynamic_sizes_are_the_calls_n():
    a = [((1, 1, 8), (8, 8, 1), torch.float32), 5, ((1, 1, 1, 5), (5, 5, 5, 1), torch.float32)]
    b = [((1, 1, 8), (8, 8, 1), torch.float32), 6, ((1, 1, 1, 6), (6, 6, 6, 1), torch.float32)]
    assert S._dynamic_input(a, b) == 1
    assert S._dynamic_input(b, a) is False                                   # n shrank: a prefill, then a decode
    assert S._dynamic_input(a, a) is None
    c = [((1, 2, 8), (16, 8, 1), torch.float32), 6, b[2]]                    # another size changed too
    assert S._dynamic_input(a, c) is False
    d = [a[0], 6, ((1, 1, 1, 7), (7, 7, 7, 1), torch.float32)]                # a size that is not n
    assert S._dynamic_input(a, d) is False


class _Prologue(torch.nn.Module):
    """The small ops a decode step's prologue holds (positions, a causal mask, rotary tables, an embedding)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(10, 6))
        self.inv_freq = torch.nn.Parameter(torch.tensor([1.0, 0.1, 0.01]))

    def forward(self, pos, ids, x):
        aten = torch.ops.aten
        r = aten.arange.default(4)
        p = aten.add.Tensor(r, aten.select.int(pos, 0, 0))                                # int64 + 0-dim int64
        allowed = aten.le.Tensor(aten.unsqueeze.default(aten.arange.default(6), 0), aten.unsqueeze.default(p, 1))
        mask = additive_mask(aten.logical_not.default(aten.logical_not.default(allowed)), torch.float32)
        f = aten.mul.Tensor(aten.to.dtype(aten.unsqueeze.default(p, 1), torch.float32), self.inv_freq)
        emb = aten.cat.default([f, f], -1)
        rot = aten.add.Tensor(aten.mul.Tensor(aten.cos.default(emb), 0.7071067811865476), aten.sin.default(emb))
        e = aten.embedding.default(self.table, ids)
        y = aten.sub.Tensor(aten.div.Tensor(e, 3.0), aten.neg.default(x))                  # broadcast [2, 6] - [6]
        return mask, rot, y, aten.gt.Scalar(y, 0.1), aten.mul.Tensor(aten.eq.Scalar(p, 2), 5)


def _traced(mod, *args):
    tracer = torch.fx.Tracer(autowrap_functions=(additive_mask,))      # a node, as prefix_attention's
    gm = torch.fx.GraphModule(mod, tracer.trace(mod))
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(*args)
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            n.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype)
    return gm


def test_the_prologue_ops_on_the_tape_are_torchs():
    mod = _Prologue()
    calls = [(torch.tensor([p]), torch.tensor([p % 10, (3 * p) % 10]), torch.randn(6)) for p in range(5)]
    gm = _traced(mod, *calls[0])
    stats = S.native_segments(gm, min_ops=1)
    assert stats["segments"] == 1
    seg = _segments(gm)[0]
    for args in calls:
        want = mod(*args)
        got = gm(*args)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            if a.dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=3e-7, atol=0)      # cos / sin: libm's, within an ulp
            else:
                assert torch.equal(a, b)
    assert seg.why is None and seg.calls == {"tape": 3, "fallback": 2}
    ops = seg.tape.prog.tolist()
    assert S.T_EW in ops and S.T_GATHER in ops
    with pytest.raises(RuntimeError, match="native tape failed"):          # an id outside the table
        gm(torch.tensor([1]), torch.tensor([1, 10]), torch.randn(6))


def test_a_frozen_step_takes_its_inputs_by_position_too():
    """freeze drops export's input-spec pre-hook with the pytree codegen (it cost ~100 us of a cold step)."""
    pm = _lowered(_recipe(W4), "q4a8")
    a, b = pm.decode_graph(16), pm.decode_graph(17)
    assert a.meta[runtime.META_RUNTIME].get("input_check") == 0
    with torch.no_grad():
        for ids, pos in _steps(3):
            torch.testing.assert_close(a(ids, pos), b(input_ids=ids, cache_position=pos), rtol=0, atol=0)


def test_chunked_prefill_and_decode_get_a_tape_each():
    pm = _lowered(_recipe(W4), "q4a8")
    for m in pm.linears().values():                      # two-row chunks on the same kernel (bucket 8)
        m.plan = {**m.plan, 8: "q4a8"}
    gm, ref = _pair(pm)
    ids = toy.token_ids(1, 16)
    chunk = lambda p, t: (ids[:, p:p + t], torch.arange(p, p + t))      # noqa: E731
    steps = [chunk(0, 5), chunk(5, 2), chunk(7, 2), chunk(9, 1), chunk(10, 1), chunk(11, 1), chunk(12, 2)]
    got, want = _decode(gm, steps), _decode(ref, steps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    seg = _segments(gm)[0]
    assert len(seg.tapes) == 2 and seg.calls == {"tape": 2, "fallback": 5} and seg.why is None


def test_a_low_bit_cache_read_outside_its_segment_is_cut_to_n_per_call(monkeypatch):
    """With attention left to torch (as around a rotation the tape does not run), the dequantized K/V leave the
    segment: views of the first n slots of their buffers, made per call."""
    real = S._native_targets

    def without_attention():
        return {t: k for t, k in real().items() if k != "attention"}
    monkeypatch.setattr(S, "_native_targets", without_attention)
    pm = _lowered(_recipe(W4, A8, KV4), "q4i8")
    gm, ref = _pair(pm)
    steps = _steps()
    for a, b in zip(_decode(gm, steps), _decode(ref, steps)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    kv = [s for s in _segments(gm) if any(o[0] == "dyn" for o in (s.tape.outputs if s.tape else []))]
    assert kv and all(s.calls["tape"] == len(steps) - 3 for s in kv)
