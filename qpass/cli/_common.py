"""Shared pieces of the subcommands: the one-line error type, progress heartbeats, data-file lookup."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable

# A source checkout holds recipes/ and models/ beside the package; an installed qpass has neither.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CliError(Exception):
    """A one-line reason for the user; the dispatcher prints it and exits 1."""


class UsageError(CliError):
    """Arguments that do not fit together; the dispatcher prints the usage and exits 2."""


def one_line(e: BaseException) -> str:
    text = " ".join(part.strip() for part in str(e).strip().splitlines() if part.strip())
    return text or type(e).__name__


def say(msg: str) -> None:
    print(msg, flush=True)


def note(msg: str) -> None:
    """Progress for long steps, on stderr so that stdout stays the result."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def heartbeat(what: str, report: Callable[[str], None] = note, every: float = 20.0):
    """Report `what` now and every `every` seconds until the block ends (for steps with no progress of their
    own: ONNX export, kernel measurement)."""
    report(f"{what} ...")
    t0, done = time.perf_counter(), threading.Event()

    def beat():
        while not done.wait(every):
            report(f"  {what}: {time.perf_counter() - t0:.0f}s so far")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def default_path(*parts: str) -> str:
    """`parts` under the checkout when qpass runs from one, else under the current directory."""
    checkout = os.path.join(CHECKOUT, *parts)
    return checkout if os.path.exists(checkout) else os.path.join(*parts)


def display(path: str) -> str:
    """`path` relative to the checkout when it is inside it (stable in reports), else absolute."""
    rel = os.path.relpath(os.path.abspath(path), CHECKOUT)
    return os.path.abspath(path) if rel.startswith("..") else rel


def data_files(model_dir: str) -> dict[str, str]:
    """The text files that MODEL_DIR/qpass_data.json names ({"eval": ..., "calib": ...}), or {}. Its paths are
    relative to the repository that holds the model; they are looked up from the model directory upwards."""
    pointer = os.path.join(model_dir, "qpass_data.json")
    if not os.path.isfile(pointer):
        return {}
    try:
        with open(pointer, encoding="utf-8") as f:
            named = json.load(f)
    except (OSError, ValueError) as e:
        raise CliError(f"{pointer}: cannot read it: {one_line(e)}") from e
    found = {}
    for key, rel in named.items():
        base = os.path.abspath(model_dir)
        for _ in range(4):
            if os.path.isfile(os.path.join(base, rel)):
                found[key] = os.path.join(base, rel)
                break
            base = os.path.dirname(base)
        else:
            found[key] = rel if os.path.isfile(rel) else os.path.join(CHECKOUT, rel)
    return found


def check_model_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise CliError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CliError(f"{model_dir!r} is not a Hugging Face model directory (no config.json)")


def check_text_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise CliError(f"{what} {path!r} does not exist")


def read_recipe(path: str):
    """The parsed recipe, or a CliError naming the file; run before anything slow."""
    import qpass

    try:
        return qpass.Recipe.from_yaml(path)
    except (qpass.QpassError, OSError, ValueError) as e:    # ValueError: e.g. a binary file
        raise CliError(f"bad recipe {path!r}: {one_line(e)}") from e


def load_model(model_dir: str):
    import torch
    import transformers

    check_model_dir(model_dir)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise CliError(f"cannot load a causal LM from {model_dir!r}: {one_line(e)}") from e


def load_tokenizer(model_dir: str, why: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise CliError(f"{why} needs the model's tokenizer, and {model_dir!r} has none usable: {one_line(e)}") from e


def token_ids(tok, path: str):
    import torch

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read text file {path!r}: {one_line(e)}") from e
    # verbose=False: the text is cut into windows later, so the tokenizer's "longer than the maximum sequence
    # length" warning does not apply
    return torch.tensor(tok(text, verbose=False)["input_ids"], dtype=torch.long)
