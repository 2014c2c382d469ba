"""Evaluate FP vs quantized: perplexity, KL(FP||Q) per token, top-1 agreement, weight bytes.

    qpass eval MODEL_DIR [--recipe R.yaml ...] [--eval TEXT] [--calib TEXT] [--json OUT.json] [--markdown OUT.md]
               [--window 256] [--calib-samples 32] [--max-eval-tokens N] [--seed 0] [--no-progress]
    qpass eval --table MANIFEST.yaml --out DOC.md [--model DIR ...] [--skip-family F ...] [--force] [--strict]
               [--import ROWS.json | COMMIT:ROWS.json ...] [--missing]
    qpass eval LOWERED_DIR [--fp-model HF_DIR] [--eval TEXT] [--json OUT.json] [--markdown OUT.md] ...

The third form scores a lowered ONNX directory (``tools/lower.py --backend onnx``: model.onnx + qpass.json) in
onnxruntime (``QpassORTModelForCausalLM``, the session configuration recorded at lowering) on the same eval
windows: its perplexity, and KL(FP‖Q) / top-1 agreement against the float model it was lowered from
(--fp-model, else the source that tools/lower.py records in qpass.json). Without a float model only the
perplexity is scored.

The second form is the one comparison table (docs/comparison.md from docs/comparison.yaml): every row of the
manifest on every model (default: the two bundled models), one table per model, rows cached in DOC.json beside
the doc and re-evaluated only when their inputs change (see qpass/cli/eval.py's table section). --import takes
rows from the family tables' caches (docs/results_*.json) computed from the same model, texts, settings and
recipe file; --missing evaluates only the rows no cache has for their current inputs, leaving rows of earlier
code versions marked ‡.

Deterministic: fixed seed, fixed non-overlapping windows (see qpass.eval). Without --eval/--calib the files
named in MODEL_DIR/qpass_data.json are used (the bundled models have one). Every recipe is applied to the same
FP model with the same calibration windows (consecutive --window-token windows of the calibration text).
Without a recipe only the FP model is scored, and no calibration text is needed. Recipes and files are
checked before the model is loaded.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from ..tables import write_atomic
from ._common import (CHECKOUT, CliError, UsageError, check_model_dir, check_text_file, data_files, default_path,
                      display, load_model, load_tokenizer, note, one_line, read_recipe, say, token_ids)

HELP = "perplexity, KL and top-1 agreement of FP vs quantized, and weight bytes"
BITS_NOTE = ("bits/weight: stored bits (codes, fp16 scales, zero points) per weight. 'all linears' includes lm_head: "
             "one the recipe leaves in float (`ignore: [lm_head]`) counts at 32 bits; 'quantized linears' counts only "
             "the quantized ones.")


def add_arguments(ap) -> None:
    ap.add_argument("model_dir", metavar="MODEL_DIR", nargs="?",
                    help="Hugging Face model directory with a tokenizer (not with --table: use --model)")
    ap.add_argument("--recipe", action="append", default=[], metavar="R.yaml",
                    help="recipe YAML to compare against FP (repeatable; none: score the FP model only)")
    ap.add_argument("--eval", dest="eval_path", metavar="TEXT",
                    help="held-out text to score (default: 'eval' in MODEL_DIR/qpass_data.json)")
    ap.add_argument("--calib", dest="calib_path", metavar="TEXT",
                    help="calibration text, needed with --recipe (default: 'calib' in MODEL_DIR/qpass_data.json)")
    ap.add_argument("--window", type=int, default=256, metavar="T",
                    help="tokens per evaluation and calibration window (default 256)")
    ap.add_argument("--calib-samples", type=int, default=32, metavar="N", help="calibration windows (default 32)")
    ap.add_argument("--max-eval-tokens", type=int, default=None, metavar="N",
                    help="score only the first N tokens of the held-out text (default: all of it)")
    ap.add_argument("--json", dest="json_path", metavar="OUT.json", help="also write the rows as JSON")
    ap.add_argument("--markdown", dest="markdown_path", metavar="OUT.md", help="also write the table as Markdown")
    ap.add_argument("--fp-model", metavar="HF_DIR",
                    help="with a lowered ONNX MODEL_DIR: the float model it was lowered from, the reference of KL "
                         "and top-1 (default: the source tools/lower.py records in qpass.json)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    t = ap.add_argument_group("comparison table (--table)")
    t.add_argument("--table", metavar="MANIFEST.yaml",
                   help="evaluate every row of a manifest (docs/comparison.yaml) on every model and write one "
                        "table per model to --out")
    t.add_argument("--out", metavar="DOC.md", help="the table's Markdown file (with --table)")
    t.add_argument("--cache", metavar="ROWS.json",
                   help="the rows, cached by their inputs (default: --out with .json instead of .md)")
    t.add_argument("--model", dest="models", action="append", default=[], metavar="DIR",
                   help="evaluate only this model (repeatable; default: models/tiny-llama and models/tiny-opt)")
    t.add_argument("--skip-family", action="append", default=[], metavar="FAMILY",
                   help="do not evaluate the rows of this family (e.g. QAT); cached rows still show")
    t.add_argument("--force", action="store_true", help="evaluate every row again, cached or not")
    t.add_argument("--import", dest="imports", action="append", default=[], metavar="ROWS.json",
                   help="take rows from another table's cache (e.g. docs/results_wa.json, or COMMIT:PATH for one "
                        "as an earlier commit had it) where this one has no current row: only a row of the same "
                        "model, texts, settings and recipe file (the code version may differ: such a row shows ‡); "
                        "repeatable")
    t.add_argument("--missing", action="store_true",
                   help="evaluate only the rows that have no result for their current inputs (none, or one from "
                        "another recipe file, model, texts or settings); rows of the same inputs from an earlier "
                        "code version stay as they are (‡)")
    t.add_argument("--strict", action="store_true",
                   help="stop at the first row that fails (default: the table shows the error in its row)")


def resolve_files(args) -> tuple[str, str | None]:
    named = data_files(args.model_dir)
    eval_path = args.eval_path or named.get("eval")
    calib_path = args.calib_path or named.get("calib")
    if not eval_path:
        raise UsageError(f"give --eval TEXT (no qpass_data.json in {args.model_dir} names one)")
    check_text_file(eval_path, "evaluation text")
    if args.recipe and not calib_path:
        raise UsageError(f"--recipe needs calibration text: give --calib TEXT (no qpass_data.json in "
                         f"{args.model_dir} names one)")
    if calib_path and args.recipe:
        check_text_file(calib_path, "calibration text")
    return eval_path, calib_path if args.recipe else None


def run(args, say=say) -> int:
    import torch

    from qpass.eval import evaluate, markdown

    if args.window < 2 or args.calib_samples < 1:
        raise UsageError("--window must be >= 2 and --calib-samples >= 1")
    if args.table:
        return run_table(args, say)
    table_only = [o for o, v in (("--out", args.out), ("--cache", args.cache), ("--model", args.models),
                                 ("--skip-family", args.skip_family), ("--force", args.force),
                                 ("--strict", args.strict), ("--import", args.imports),
                                 ("--missing", args.missing)) if v]
    if table_only:
        raise UsageError(f"{', '.join(table_only)} only go with --table")
    if not args.model_dir:
        raise UsageError("give MODEL_DIR (or --table MANIFEST.yaml)")
    if is_lowered_onnx(args.model_dir):
        return run_lowered(args, say)
    if args.fp_model:
        raise UsageError("--fp-model goes with a lowered ONNX MODEL_DIR (model.onnx + qpass.json)")
    if os.path.isdir(args.model_dir) and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise CliError(f"{args.model_dir!r} is neither a Hugging Face model directory (no config.json) nor a lowered "
                       "ONNX directory (no model.onnx or qpass.json, as tools/lower.py --backend onnx writes)")
    check_model_dir(args.model_dir)
    for path in args.recipe:
        read_recipe(path)
    eval_path, calib_path = resolve_files(args)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model_dir, "qpass eval")
    eval_ids = token_ids(tok, eval_path)
    calib_ids = token_ids(tok, calib_path) if calib_path else torch.zeros(0, dtype=torch.long)
    if args.max_eval_tokens:
        eval_ids = eval_ids[: args.max_eval_tokens]
    model = load_model(args.model_dir)
    if not args.no_progress:
        note(f"scoring FP32 and {len(args.recipe)} recipe(s) on {eval_ids.numel()} tokens")
    try:
        rows = evaluate(model, args.recipe, eval_ids, calib_ids, window=args.window,
                        calib_samples=args.calib_samples, progress=not args.no_progress)
    except ValueError as e:           # e.g. a text shorter than one window
        raise CliError(str(e)) from e
    calib_text = f"; calib {display(calib_path)} ({args.calib_samples} windows)" if calib_path else ""
    say(f"model {args.model_dir}; eval {display(eval_path)} ({eval_ids.numel()} tokens, windows of "
        f"{args.window}){calib_text}")
    table = markdown(rows)
    say(table)
    say(BITS_NOTE)
    if args.markdown_path:
        write_atomic(args.markdown_path, f"{table}\n\n{BITS_NOTE}\n")
    if args.json_path:
        out = {"model": args.model_dir, "eval": display(eval_path), "eval_tokens": eval_ids.numel(),
               "calib": display(calib_path) if calib_path else None, "window": args.window,
               "calib_samples": args.calib_samples, "rows": rows, "command": " ".join(sys.argv)}
        write_atomic(args.json_path, json.dumps(out, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ a lowered ONNX model

def is_lowered_onnx(path: str) -> bool:
    """A directory qpass.lower(qm, "onnx", dir) wrote: a model.onnx, or a qpass.json of that format (a damaged
    directory; verify() says what is wrong when it is loaded)."""
    if os.path.isfile(os.path.join(path, "model.onnx")):
        return True
    try:
        with open(os.path.join(path, "qpass.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == "qpass-onnx"
    except (OSError, ValueError, AttributeError):
        return False


def run_lowered(args, say=say) -> int:
    """Score a lowered ONNX directory in onnxruntime (see the module docstring)."""
    import torch

    from qpass.backends.onnx_qdq import QpassORTModelForCausalLM
    from qpass.backends.onnx_qdq.lower import verify
    from qpass.eval import evaluate_lowered, markdown

    lowered = args.model_dir
    if args.recipe or args.calib_path:
        raise UsageError(f"{lowered!r} is a lowered ONNX model, already quantized: --recipe and --calib apply to "
                         "a Hugging Face model directory (lower one with tools/lower.py --recipe)")
    meta = verify(lowered)                                   # ArtifactError (one line) on a damaged directory
    fp_dir, recorded = args.fp_model, meta.get("source_model")
    if fp_dir is None and recorded:
        if os.path.isfile(os.path.join(recorded, "config.json")):
            fp_dir = recorded
        else:
            note(f"the float model qpass.json records ({recorded}) is not there: perplexity only (give --fp-model "
                 "HF_DIR for KL and top-1)")
    if fp_dir is not None:
        check_model_dir(fp_dir)
    named = {**data_files(lowered), **(data_files(fp_dir) if fp_dir else {})}
    eval_path = args.eval_path or named.get("eval")
    if not eval_path:
        raise UsageError(f"give --eval TEXT (no qpass_data.json in {lowered}"
                         f"{' or ' + fp_dir if fp_dir else ''} names one)")
    check_text_file(eval_path, "evaluation text")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    tok_dir = lowered if meta.get("tokenizer_files") or not fp_dir else fp_dir
    eval_ids = token_ids(load_tokenizer(tok_dir, "qpass eval"), eval_path)
    if args.max_eval_tokens:
        eval_ids = eval_ids[: args.max_eval_tokens]
    onnx_model = QpassORTModelForCausalLM.from_pretrained(lowered, use_cache=False)
    reference = load_model(fp_dir) if fp_dir else None
    name = f"ONNX {os.path.basename(os.path.normpath(lowered))} (onnxruntime)"
    if not args.no_progress:
        note(f"scoring {name}{' and FP32' if reference is not None else ''} on {eval_ids.numel()} tokens")
    try:
        rows = evaluate_lowered(onnx_model, eval_ids, reference=reference, window=args.window, name=name,
                                progress=not args.no_progress)
    except ValueError as e:           # a text shorter than one window, another model's vocabulary
        raise CliError(str(e)) from e
    rows[-1]["recipe"] = display(os.path.join(lowered, "recipe.yaml"))
    say(f"lowered model {lowered} (fused accuracy level {meta['options']['fused_accuracy_level']}); FP model "
        f"{fp_dir or '– (KL and top-1 need --fp-model)'}; eval {display(eval_path)} ({eval_ids.numel()} tokens, "
        f"windows of {args.window})")
    table = markdown(rows)
    say(table)
    say(BITS_NOTE + " A lowered model's bytes are not counted here (–).")
    if args.markdown_path:
        write_atomic(args.markdown_path, f"{table}\n")
    if args.json_path:
        out = {"lowered": lowered, "fp_model": fp_dir, "eval": display(eval_path), "eval_tokens": eval_ids.numel(),
               "window": args.window, "rows": rows, "command": " ".join(sys.argv)}
        write_atomic(args.json_path, json.dumps(out, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ the comparison table
#
# qpass eval --table docs/comparison.yaml --out docs/comparison.md
#
# The manifest lists rows {family, method, recipe[, paper, notes]}; every row is evaluated on every model with the
# same settings as the plain command (qpass.eval.evaluate's computation, one recipe at a time, so that a row that
# fails is one error cell and a cached row costs nothing). Each result is stored in the cache (DOC.json) under a
# key made of everything that decides its numbers: the model directory's files, the recipe file, the eval and
# calibration texts, the settings (window, calibration windows, eval tokens, seed), the sources of qpass (without
# qpass/cli, which only drives) and passes/, and the torch and transformers versions. A rerun evaluates only the
# rows whose key changed (and rows that failed before); --force evaluates all. The cache gains each row as soon
# as it is evaluated (every entry is complete and keyed, so an interrupted run resumes); the doc is rendered from
# the cache and written only when the whole run succeeded.

MANIFEST_KEYS = ("version", "recipes", "exclude", "rows")
ROW_KEYS = ("family", "method", "recipe", "paper", "notes")
ROW_REQUIRED = ("family", "method", "recipe")
BUNDLED_MODELS = (("models", "tiny-llama"), ("models", "tiny-opt"))
CACHE_FORMAT = 1
FP = "FP32"
SECTION = "comparison"
TABLE_HEAD = ["family", "method", "recipe", "bits/weight, all linears", "bits/weight, quantized linears",
              "perplexity", "Δppl vs FP", "KL(FP‖Q)/token", "top-1 agreement", "apply time (s)", "peak RSS (GB)"]
TABLE_ALIGN = "lllrrrrrrrr"


@dataclass(frozen=True)
class TableRow:
    index: int
    family: str
    method: str
    recipe: str              # the file, as resolved (relative to the manifest's directory)
    paper: str | None = None
    notes: str | None = None

    @property
    def id(self) -> str:     # the cache's name for the row: the recipe file, relative to the checkout
        return display(self.recipe)


def read_manifest(path: str) -> tuple[list[TableRow], list[str]]:
    """The rows of a comparison manifest, checked (keys, types, files, each recipe parsed), and the presets in its
    directory that are neither a row nor excluded. Errors are CliErrors naming the manifest and the row."""
    from qpass.errors import QpassError
    from qpass.recipe import load_yaml

    if not os.path.isfile(path):
        raise CliError(f"manifest {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            doc = load_yaml(f.read())
    except (QpassError, OSError, UnicodeDecodeError) as e:
        raise CliError(f"manifest {path!r}: {one_line(e)}") from e
    if not isinstance(doc, dict):
        raise CliError(f"manifest {path!r}: expected a mapping with 'rows', got {type(doc).__name__}")
    unknown = sorted(set(map(str, doc)) - set(MANIFEST_KEYS))
    if unknown:
        raise CliError(f"manifest {path!r}: unknown key {unknown[0]!r} (allowed: {', '.join(MANIFEST_KEYS)})")
    if doc.get("version", 1) != 1:
        raise CliError(f"manifest {path!r}: version {doc['version']!r} is not supported (1 is)")
    rows_in, exclude = doc.get("rows"), doc.get("exclude") or []
    if not isinstance(rows_in, list) or not rows_in:
        raise CliError(f"manifest {path!r}: 'rows' must be a non-empty list of {{family, method, recipe}}")
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise CliError(f"manifest {path!r}: 'exclude' must be a list of recipe files")
    folder = doc.get("recipes", ".")
    if not isinstance(folder, str):
        raise CliError(f"manifest {path!r}: 'recipes' must be the folder of the presets, relative to the manifest")
    base = os.path.normpath(os.path.join(os.path.dirname(path), folder))
    if not os.path.isdir(base):
        raise CliError(f"manifest {path!r}: recipes folder {folder!r} does not exist ({display(base)})")
    rows: list[TableRow] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(rows_in):
        where = f"manifest {path!r}, rows[{i}]"
        if not isinstance(r, dict):
            raise CliError(f"{where}: expected a mapping {{family, method, recipe}}, got {r!r}")
        if isinstance(r.get("method"), str):
            where += f" ({r['method']!r})"
        bad = sorted(set(map(str, r)) - set(ROW_KEYS))
        if bad:
            raise CliError(f"{where}: unknown key {bad[0]!r} (allowed: {', '.join(ROW_KEYS)})")
        for k in ROW_REQUIRED:
            if not isinstance(r.get(k), str) or not r[k].strip():
                raise CliError(f"{where}: {k!r} is missing or not a non-empty string")
        for k in ("paper", "notes"):
            if r.get(k) is not None and not isinstance(r[k], str):
                raise CliError(f"{where}: {k!r} must be a string")
        recipe = os.path.normpath(os.path.join(base, r["recipe"]))
        if not os.path.isfile(recipe):
            raise CliError(f"{where}: recipe file {r['recipe']!r} does not exist ({display(recipe)})")
        key = os.path.realpath(recipe)
        if key in seen:
            raise CliError(f"{where}: recipe {r['recipe']!r} is already rows[{seen[key]}]")
        seen[key] = i
        try:
            read_recipe(recipe)
        except CliError as e:
            raise CliError(f"{where}: {e}") from e
        rows.append(TableRow(i, r["family"].strip(), r["method"].strip(), recipe, r.get("paper"), r.get("notes")))
    excluded = {os.path.realpath(os.path.join(base, e)) for e in exclude}
    for e in exclude:
        if os.path.realpath(os.path.join(base, e)) in seen:
            raise CliError(f"manifest {path!r}: {e!r} is both excluded and a row")
    unlisted = [display(p) for p in sorted(glob.glob(os.path.join(base, "*.yaml")))
                if os.path.realpath(p) not in seen and os.path.realpath(p) not in excluded
                and os.path.realpath(p) != os.path.realpath(path)]
    return rows, unlisted


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return _sha(f.read())


def tree_digest(root: str, suffix: str = "", skip: tuple[str, ...] = ()) -> str:
    """One digest of every file under `root` (names relative to it, and contents); `skip`: relative folders left
    out; __pycache__ and hidden entries are always left out."""
    parts = []
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__"
                         and os.path.normpath(os.path.join(rel_d, x)) not in skip)
        for name in sorted(files):
            if name.startswith(".") or not name.endswith(suffix):
                continue
            parts.append(f"{os.path.normpath(os.path.join(rel_d, name))}\0{file_digest(os.path.join(d, name))}")
    return _sha("\n".join(parts).encode())


def code_state() -> dict:
    """What of the code decides the numbers: a digest of the sources of qpass (without qpass/cli) and passes/,
    the versions, and (for the reader) the git commit and whether those folders differ from it."""
    import subprocess

    import passes
    import qpass
    import torch
    import transformers

    from ..version import __version__

    q_dir, p_dir = os.path.dirname(qpass.__file__), os.path.dirname(passes.__file__)
    sources = _sha(f"{tree_digest(q_dir, '.py', skip=('cli',))}\n{tree_digest(p_dir, '.py')}".encode())
    commit, dirty = None, None
    try:
        git = ["git", "-C", CHECKOUT]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                timeout=30).stdout.strip() or None
        status = subprocess.run([*git, "status", "--porcelain", "--", q_dir, p_dir], capture_output=True, text=True,
                                check=True, timeout=30).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"qpass": __version__, "sources": sources, "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit, "dirty": dirty}


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - informative only
        isa = "?"
    return f"{cpu} ({os.cpu_count()} cores; torch kernels {isa}; {torch.get_num_threads()} thread(s))"


@dataclass
class ModelInputs:
    """A model of the table: its directory, texts and the key every row of it shares."""
    dir: str
    name: str                 # display(dir), the cache's name for it
    eval_path: str
    calib_path: str
    parts: dict               # key parts shared by every row (the FP row's key is these alone)

    def key(self, recipe: str | None) -> tuple[str, dict]:
        parts = dict(self.parts, recipe=file_digest(recipe) if recipe else None)
        return _sha(json.dumps(parts, sort_keys=True).encode())[:24], parts


def model_inputs(model_dir: str, settings: dict, code: dict) -> ModelInputs:
    check_model_dir(model_dir)
    named = data_files(model_dir)
    for what, k in (("evaluation text", "eval"), ("calibration text", "calib")):
        if not named.get(k):
            raise CliError(f"{model_dir}: no qpass_data.json names its {what} ('{k}'); the table needs both")
        check_text_file(named[k], f"{model_dir}: {what}")
    parts = {"model": tree_digest(model_dir), "eval": file_digest(named["eval"]),
             "calib": file_digest(named["calib"]), "settings": settings,
             **{k: code[k] for k in ("qpass", "sources", "torch", "transformers")}}
    return ModelInputs(model_dir, display(model_dir), named["eval"], named["calib"], parts)


class TableScorer:
    """qpass.eval.evaluate's computation, one recipe at a time: the FP log-probabilities once, then each recipe
    applied to the same FP model with the same calibration windows and scored on the same eval windows."""

    def __init__(self, model, eval_ids, calib_ids, *, window: int, calib_samples: int, seed: int, progress: bool):
        from qpass.eval import windows

        self.model, self.seed, self.progress = model, seed, progress
        self.calib = [w.unsqueeze(0) for w in calib_ids.split(window) if w.numel() == window][:calib_samples]
        self.wins = windows(eval_ids, window)
        self.ref = None

    def _logprobs(self, model, desc: str) -> list:
        from qpass.eval import _log_probs

        return _log_probs(model, self.wins, desc, self.progress)

    def reference(self) -> dict:
        import torch

        from qpass.eval import _scores, weight_bytes

        torch.manual_seed(self.seed)
        t0 = time.perf_counter()
        self.ref = self._logprobs(self.model, "FP32 reference")
        return {**_scores(self.ref, self.ref, self.wins), **weight_bytes(self.model),
                "seconds": time.perf_counter() - t0}

    def recipe(self, path: str) -> dict:
        import torch

        from qpass import apply
        from qpass.eval import _scores, weight_bytes

        if self.ref is None:
            self.reference()
        torch.manual_seed(self.seed)          # every row starts from the same state, whatever ran before it
        from qpass.memory import PeakRss

        t0 = time.perf_counter()
        with PeakRss() as peak:
            qm = apply(self.model, path, calib_data=self.calib, progress=self.progress)
        seconds = time.perf_counter() - t0
        out = self._logprobs(qm, f"evaluating {os.path.basename(path)}")
        return {**_scores(self.ref, out, self.wins), **weight_bytes(qm), "seconds": seconds,
                "peak_rss": peak.bytes, "eval_seconds": time.perf_counter() - t0 - seconds}


def _load_cache(path: str) -> dict:
    empty = {"format": CACHE_FORMAT, "models": {}}
    if not os.path.exists(path):
        return empty
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError) as e:
        raise CliError(f"cache {path!r} is not readable JSON ({one_line(e)}): move it away or fix it") from e
    return _checked_cache(cache, f"cache {path!r}", "move it away")


def _checked_cache(cache, what: str, fix: str) -> dict:
    """`cache` if it is a comparison-table cache of this format, else a CliError naming `what`."""
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT or not isinstance(cache.get("models"), dict):
        raise CliError(f"{what} is not a format-{CACHE_FORMAT} comparison cache: {fix}")
    return cache


def _default_models() -> list[str]:
    return [display(default_path(*parts)) for parts in BUNDLED_MODELS]


def run_table(args, say=say) -> int:
    import torch

    from ..tables import markers, replace_section

    bad = [o for o, v in (("MODEL_DIR", args.model_dir), ("--recipe", args.recipe), ("--eval", args.eval_path),
                          ("--calib", args.calib_path), ("--json", args.json_path),
                          ("--markdown", args.markdown_path)) if v]
    if bad:
        raise UsageError(f"--table takes its models from --model and their texts from their qpass_data.json; "
                         f"{', '.join(bad)} do not go with it")
    if not args.out:
        raise UsageError("--table needs --out DOC.md")
    if args.force and args.missing:
        raise UsageError("--force and --missing contradict each other: give one")
    out = args.out
    cache_path = args.cache or (os.path.splitext(out)[0] + ".json")
    if os.path.abspath(cache_path) == os.path.abspath(out):
        raise UsageError(f"--cache and --out are the same file ({out})")
    for p in (out, cache_path):
        if not os.path.isdir(os.path.dirname(os.path.abspath(p))):
            raise CliError(f"the folder of {p!r} does not exist")
    rows, unlisted = read_manifest(args.table)
    families = list(dict.fromkeys(r.family for r in rows))
    unknown = [f for f in args.skip_family if f not in families]
    if unknown:
        raise UsageError(f"--skip-family {unknown[0]!r}: the manifest's families are {', '.join(families)}")
    for p in unlisted:
        note(f"note: {p} is neither a row of {args.table} nor in its 'exclude' list")
    model_dirs = list(dict.fromkeys(args.models or _default_models()))
    cache = _load_cache(cache_path)
    settings = {"window": args.window, "calib_samples": args.calib_samples,
                "max_eval_tokens": args.max_eval_tokens, "seed": args.seed}
    code = code_state()
    host = machine()
    inputs = [model_inputs(d, settings, code) for d in model_dirs]
    # the other models of the cache are rendered too (their rows checked against their current inputs)
    others = []
    for name in cache["models"]:
        if name not in {m.name for m in inputs} and os.path.isdir(name):
            try:
                others.append(model_inputs(name, settings, code))
            except CliError as e:
                note(f"note: cached model {name} is left out of the table: {e}")
    for path in args.imports:
        if os.path.abspath(path) == os.path.abspath(cache_path):
            raise UsageError(f"--import {path}: that is this table's own cache")
        taken = import_rows(cache, _read_import(path), path, inputs, rows)
        note(f"{path if _git_spec(path) else display(path)}: {taken} row(s) taken")
    logging.basicConfig(level=logging.WARNING)
    argv = " ".join(sys.argv) if sys.argv and sys.argv[0] else "qpass eval --table ..."
    t_run = time.perf_counter()
    todo_total = 0
    for m in inputs:
        entry = cache["models"].setdefault(m.name, {"rows": {}})
        stored = entry["rows"]
        plan = []
        for row in [None, *rows]:
            rid = FP if row is None else row.id
            key, parts = m.key(None if row is None else row.recipe)
            old = stored.get(rid)
            fresh = old is not None and old.get("key") == key and "error" not in old.get("result", {})
            if row is not None and row.family in args.skip_family:
                continue
            # --missing: a row of the same inputs from an earlier code version (‡) stays; one of other inputs (†)
            # is not this recipe's result any more, so it is evaluated like a row that has none
            kept = (args.missing and old is not None and "error" not in old["result"]
                    and _same_inputs(old.get("key_parts", {}), parts))
            if args.force or not (fresh or kept):
                plan.append((row, rid, key, parts))
        need_rows = [p for p in plan if p[0] is not None]
        if not need_rows and not any(p[0] is None for p in plan):
            note(f"{m.name}: every row is cached")
            continue
        todo_total += len(plan)
        note(f"{m.name}: evaluating {len(need_rows)} row(s)"
             f"{' and FP32' if any(p[0] is None for p in plan) else ''} of {len(rows)}")
        torch.manual_seed(args.seed)
        tok = load_tokenizer(m.dir, "qpass eval --table")
        eval_ids = token_ids(tok, m.eval_path)
        calib_ids = token_ids(tok, m.calib_path)
        if args.max_eval_tokens:
            eval_ids = eval_ids[: args.max_eval_tokens]
        model = load_model(m.dir)
        scorer = TableScorer(model, eval_ids, calib_ids, window=args.window, calib_samples=args.calib_samples,
                             seed=args.seed, progress=not args.no_progress)
        if not scorer.wins:
            raise CliError(f"{m.name}: the evaluation text {display(m.eval_path)} has no window of >= 2 tokens")
        if not scorer.calib and need_rows:
            raise CliError(f"{m.name}: the calibration text {display(m.calib_path)} has no full window of "
                           f"{args.window} tokens")
        entry.update(eval=display(m.eval_path), eval_tokens=int(eval_ids.numel()), calib=display(m.calib_path),
                     calib_windows=len(scorer.calib), window=args.window)
        run_info = {"commit": code["commit"], "dirty": code["dirty"], "machine": host, "command": argv}
        # the FP row first, always when anything of this model is evaluated: the other rows need its logits
        try:
            fp = scorer.reference()
        except Exception as e:  # noqa: BLE001 - the model itself does not run: no row can be scored
            raise CliError(f"{m.name}: the FP32 model does not evaluate: {one_line(e)}") from e
        key, parts = m.key(None)
        stored[FP] = {"key": key, "key_parts": parts, "result": fp, "run": run_info}
        note(f"  {FP}: perplexity {fp['perplexity']:.3f} ({fp['seconds']:.0f}s)")
        for n, (row, rid, key, parts) in enumerate(need_rows, 1):
            try:
                res = scorer.recipe(row.recipe)
                msg = f"perplexity {res['perplexity']:.3f} ({res['seconds'] + res['eval_seconds']:.0f}s)"
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one row's failure is that row's cell
                if args.strict:
                    raise CliError(f"{m.name}: {row.id} ({row.method}) failed: {one_line(e)}") from e
                res = {"error": one_line(e), "error_type": type(e).__name__}
                msg = f"ERROR {type(e).__name__}: {one_line(e)}"
            stored[rid] = {"key": key, "key_parts": parts, "result": res, "run": run_info}
            note(f"  [{n}/{len(need_rows)}] {row.id}: {msg}")
            _write_cache(cache_path, cache, args.table)       # every evaluated row is kept at once
    seconds = time.perf_counter() - t_run
    if code_state()["sources"] != code["sources"]:
        note("warning: the qpass or passes sources changed while the table ran; its rows are keyed by the sources "
             "at its start")
    # prune rows that are no longer in the manifest, then render from the cache
    ids = {FP, *(r.id for r in rows)}
    for entry in cache["models"].values():
        entry["rows"] = {k: v for k, v in entry["rows"].items() if k in ids}
    if todo_total:
        cache["last_run"] = {"command": argv, "seconds": round(seconds, 1), "machine": host}
    body = render_table(rows, [*inputs, *others], cache, args.table, out, cache_path)
    _write_cache(cache_path, cache, args.table)
    existing = ""
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            existing = f.read()
    if any(ln.strip() == markers(SECTION)[0] for ln in existing.splitlines()):
        replace_section(out, SECTION, body)     # prose around the generated section stays
    else:
        begin, end = markers(SECTION)
        write_atomic(out, f"# One comparison table: every method on the bundled models\n\n{begin}\n{body}\n{end}\n")
    say(body)
    note(f"wrote {out} and {cache_path} ({todo_total} row(s) evaluated in {seconds:.0f}s)")
    return 0


CODE_PARTS = ("qpass", "sources", "torch", "transformers")


def _same_inputs(parts: dict, current: dict) -> bool:
    """Whether a cached row was computed from the same model, texts, settings and recipe file as the current key
    (the code version may differ)."""
    return all(parts.get(k) == v for k, v in current.items() if k not in CODE_PARTS)


def _descends(commit: str | None, of: str | None) -> bool:
    """Whether git commit `commit` is `of` or comes after it (False when either is unknown)."""
    import subprocess

    if not commit or not of:
        return False
    try:
        return subprocess.run(["git", "-C", CHECKOUT, "merge-base", "--is-ancestor", of, commit],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _git_spec(path: str) -> tuple[str, str] | None:
    """(commit, file) for an --import of the form COMMIT:PATH (a cache as an earlier commit had it), else None."""
    rev, sep, file = path.partition(":")
    if not sep or os.path.exists(path) or not rev or os.sep in rev:
        return None
    return rev, file


def _read_import(path: str) -> dict:
    """An --import's cache: a file, or COMMIT:PATH read with git show from this checkout's history."""
    import subprocess

    spec = _git_spec(path)
    if spec is None:
        if not os.path.isfile(path):
            raise CliError(f"--import {path}: no such file (give a table cache, or COMMIT:PATH for one in git history)")
        return _load_cache(path)
    try:
        proc = subprocess.run(["git", "-C", CHECKOUT, "show", f"{spec[0]}:{spec[1]}"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise CliError(f"--import {path}: git show failed ({one_line(e)})") from e
    if proc.returncode != 0:
        raise CliError(f"--import {path}: git has no {spec[1]} at {spec[0]} ({one_line(proc.stderr.strip())})")
    try:
        cache = json.loads(proc.stdout)
    except ValueError as e:
        raise CliError(f"--import {path}: not JSON ({one_line(e)})") from e
    return _checked_cache(cache, f"--import {path}", "give a table's cache (docs/results_*.json)")


def _better(cand: dict, mine: dict | None, key: str, parts: dict) -> bool:
    """Whether an imported row of the current inputs (`cand`) should replace this cache's row `mine`."""
    if mine is None or "error" in mine.get("result", {}):
        return True
    if mine.get("key") == key:                              # this cache's row is current
        return False
    if cand["key"] == key or not _same_inputs(mine.get("key_parts", {}), parts):
        return True
    # both from earlier code versions: the later commit wins
    c, o = cand.get("run", {}).get("commit"), mine.get("run", {}).get("commit")
    return c != o and _descends(c, o)


def import_rows(cache: dict, other: dict, source: str, inputs: list[ModelInputs], rows: list[TableRow]) -> int:
    """Copy into `cache` the rows of another table's cache `other` that this table lacks or has only in an older
    form. A row is taken only when its model, texts, settings and recipe file are the ones this table would use
    (so its numbers are this row's, computed by the code version it names), and then only if this cache has no
    row with the current key: over a row of changed inputs, a failed row or none; over a row of the same inputs
    from an earlier code version, when its commit comes after that row's. Returns the number of rows taken."""
    taken = 0
    for m in inputs:
        theirs = other["models"].get(m.name, {})
        if not theirs.get("rows"):
            continue
        entry = cache["models"].setdefault(m.name, {"rows": {}})
        for row in [None, *rows]:
            rid = FP if row is None else row.id
            cand = theirs["rows"].get(rid)
            if cand is None or "error" in cand.get("result", {}) or "key_parts" not in cand:
                continue
            key, parts = m.key(None if row is None else row.recipe)
            if not _same_inputs(cand["key_parts"], parts):
                continue
            mine = entry["rows"].get(rid)
            if not _better(cand, mine, key, parts):
                continue
            entry["rows"][rid] = {**cand, "run": {**cand.get("run", {}),
                                                  "imported_from": source if _git_spec(source) else display(source)}}
            if "eval" not in entry and "eval" in theirs:
                entry.update({k: theirs[k] for k in ("eval", "eval_tokens", "calib", "calib_windows", "window")
                              if k in theirs})
            taken += 1
    return taken


def _write_cache(path: str, cache: dict, manifest: str) -> None:
    cache["manifest"] = display(manifest)
    write_atomic(path, json.dumps(cache, indent=1, ensure_ascii=False) + "\n")


def _fmt_row(row: TableRow | None, res: dict | None, fp: dict | None, mark: str) -> list[str]:
    family, method, recipe = ("–", FP, "–") if row is None else (row.family, row.method, row.id)
    method += mark
    if res is None:
        return [family, method, recipe, "–", "–", "not evaluated", "–", "–", "–", "–", "–"]
    if "error" in res:
        msg = res["error"] if len(res["error"]) <= 300 else res["error"][:297] + "..."
        cell = f"error: {res.get('error_type', 'Error')}: {msg}"
        return [family, method, recipe, "–", "–", cell, "–", "–", "–", "–", "–"]
    q = res.get("quantized_bits_per_weight")
    delta = "–" if fp is None or "perplexity" not in fp else f"{res['perplexity'] - fp['perplexity']:+.3f}"
    return [family, method, recipe, f"{res['bits_per_weight']:.2f}", "–" if q is None else f"{q:.2f}",
            f"{res['perplexity']:.3f}", delta if row is not None else "0.000", f"{res['kl']:.5f}",
            f"{100 * res['top1_agreement']:.2f}%", "–" if row is None else f"{res.get('seconds', 0):.1f}",
            "–" if res.get("peak_rss") is None else f"{res['peak_rss'] / 1e9:.2f}"]


def render_table(rows: list[TableRow], models: list[ModelInputs], cache: dict, manifest: str, out: str,
                 cache_path: str) -> str:
    """The generated part of the doc, from the cache alone: header, one table per model, notes."""
    from .. import tables

    runs, stale_any, code_stale = [], False, False
    sections = []
    for m in models:
        entry = cache["models"].get(m.name, {"rows": {}})
        stored = entry["rows"]
        body = []
        fp_entry = stored.get(FP)
        fp = fp_entry["result"] if fp_entry else None
        for row in [None, *rows]:
            e = stored.get(FP if row is None else row.id)
            mark = ""
            if e is not None:
                runs.append(e.get("run", {}))
                key, parts = m.key(None if row is None else row.recipe)
                if e.get("key") != key:
                    if _same_inputs(e.get("key_parts", {}), parts):
                        mark = " ‡"
                        code_stale = True
                    else:
                        mark, stale_any = " †", True
            body.append(_fmt_row(row, e["result"] if e else None, fp, mark))
        info = (f"Eval `{entry['eval']}` ({entry['eval_tokens']:,} tokens in windows of {entry['window']}); "
                f"calibration: {entry['calib_windows']} windows of `{entry['calib']}`."
                if "eval" in entry else "Not evaluated yet.")
        sections.append(f"## {m.name}\n\n{info}\n\n{tables.markdown(TABLE_HEAD, body, TABLE_ALIGN)}")
    commits = {}
    for r in runs:
        c = (r.get("commit") or "unknown")[:10] + (" + uncommitted changes in qpass/ or passes/" if r.get("dirty")
                                                   else "")
        commits[c] = commits.get(c, 0) + 1
    machines = sorted({r.get("machine") for r in runs if r.get("machine")})
    versions = next((e["key_parts"] for m in models for e in cache["models"].get(m.name, {"rows": {}})["rows"].values()
                     if "key_parts" in e), {})
    last = cache.get("last_run", {})
    commit_text = "; ".join(f"{c} ({n} rows)" if len(commits) > 1 else c for c, n in commits.items()) or "–"
    head = [
        f"Generated by `python tools/eval.py --table {display(manifest)} --out {display(out)}` from the rows cached "
        f"in `{display(cache_path)}` (one line in the manifest adds a method; `--skip-family QAT` leaves the slow "
        "rows out of a run, `--model DIR` evaluates one model). Do not edit this section by hand.",
        "",
        f"- Last run: `{last.get('command', '–')}` ({last.get('seconds', 0) / 60:.1f} min for the rows it evaluated)."
        if last else "- Last run: –",
        f"- Versions: qpass {versions.get('qpass', '?')} at commit {commit_text} (sources digest "
        f"{versions.get('sources', '?')[:12]}), torch {versions.get('torch', '?')}, transformers "
        f"{versions.get('transformers', '?')}.",
        f"- Machine: {'; '.join(machines) or '–'}. fp32 on CPU. Another CPU kind (AVX2 vs AVX-512) changes float "
        "rounding: rows with int8 activations move in the last digits, QAT rows by up to ~0.3 perplexity "
        "(docs/results_llm_qat.md). Times in the JSON are from a shared machine and indicative only.",
        "- Settings: every row of a model uses the same eval windows and the same calibration windows "
        "(the texts named in the model's `qpass_data.json`); seed reset before each row.",
        "- bits/weight: stored bits (codes, fp16 scales, zero points, side channels) per weight, as `qpass.eval` "
        "counts them; 'all linears' includes lm_head (a float one at 32 bits), 'quantized linears' only the "
        "quantized ones. Δppl vs FP: the row's perplexity minus the FP32 row's. Apply time and peak RSS: `qpass.apply` "
        "alone (calibration and training included, scoring not), on the machine of the row's run; the peak is the "
        "process's (the FP model and its reference log-probabilities included): compare rows, not absolutes.",
    ]
    if stale_any:
        head.append("- † a row from an earlier run whose inputs (model, recipe file, texts or settings) have "
                    "changed since: its numbers may not be this recipe's any more; rerun the command (`--missing` "
                    "is enough) to refresh it.")
    if code_stale:
        head.append("- ‡ a row computed from the same model, recipe file, texts and settings by an earlier version "
                    "of qpass (the commit listed under Versions; torch and transformers as its run had them): "
                    "rerun the command without `--missing` to refresh it.")
    legend = [[r.method, r.id, r.paper or "–", r.notes or "–"] for r in rows if r.paper or r.notes]
    tail = ("\n\n## Methods\n\n" + tables.markdown(["method", "recipe", "paper", "notes"], legend)) if legend else ""
    return "\n".join(head) + "\n\n" + "\n\n".join(sections) + tail
