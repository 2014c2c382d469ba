"""The ``qpass`` command: ``qpass lower|eval|demo|qat ...`` (installed as a console script; also
``python -m qpass.cli``). ``tools/lower.py``, ``tools/eval.py``, ``tools/demo.py`` and ``tools/qat.py`` are thin
wrappers that run the same subcommands under their own names.

Each subcommand is a module with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; the
table below is the list (no scanning). Errors are one line on stderr: exit code 1 for an error, 2 for bad
usage, 130 when interrupted (Ctrl-C), never a traceback for those.
"""
from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = """Quantize LLMs with recipes and lower them (qpass).

    qpass lower MODEL_DIR --recipe R.yaml --out OUT_DIR [--backend onnx|torch]
    qpass eval MODEL_DIR --recipe R.yaml ...
    qpass demo
    qpass export QPASS_DIR --format compressed-tensors --out OUT_DIR

`qpass COMMAND --help` lists a command's options."""
COMMANDS = {"lower": "qpass.cli.lower", "eval": "qpass.cli.eval", "demo": "qpass.cli.demo", "qat": "qpass.cli.qat",
            "export": "qpass.cli.export"}


def _module(command: str):
    return importlib.import_module(COMMANDS[command])


def _parser(prog: str, module, **kw) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    module.add_arguments(ap)
    return ap


def build_parser(prog: str = "qpass") -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from ..version import __version__

    ap = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"qpass {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parsers = {}
    for name in COMMANDS:
        module = _module(name)
        parsers[name] = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parsers[name])
    return ap, parsers


def _import_heavy() -> None:
    """Import torch and transformers with Ctrl-C held until both are loaded.

    torch's import cannot be interrupted safely: a KeyboardInterrupt raised inside it is swallowed by some
    submodules' ``try/except`` (the command then runs on as if nothing happened) or leaves a half-initialised
    ``torch`` behind (an AttributeError "partially initialized module" later). So while they load, SIGINT only
    sets a flag, and the interrupt is raised once they are in: Ctrl-C then always exits 130 with one line."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return                              # signal handlers can only be set from the main thread
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        import torch  # noqa: F401
        try:
            import transformers  # noqa: F401
        except ImportError:
            pass
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _run(module, args, ap: argparse.ArgumentParser, name: str) -> int:
    from ..errors import QpassError
    from ._common import CliError, UsageError, one_line

    try:
        _import_heavy()
        return module.run(args)
    except UsageError as e:
        ap.error(str(e))                     # exits 2 with the usage line
    except KeyboardInterrupt:
        print(f"{name}: {getattr(module, 'INTERRUPTED', 'interrupted')}", file=sys.stderr)
        return 130
    except (CliError, QpassError, OSError) as e:
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None, prog: str = "qpass") -> int:
    """The console script: ``qpass COMMAND [options]``."""
    try:
        ap, parsers = build_parser(prog)
        args = ap.parse_args(argv)
        if args.command is None:
            ap.print_help(sys.stderr)
            return 2
        return _run(_module(args.command), args, parsers[args.command], f"{prog} {args.command}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def tool(command: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """``tools/<command>.py``: the subcommand under the script's name (same parser, same code)."""
    prog = prog or f"{command}.py"
    try:
        module = _module(command)
        ap = _parser(prog, module)
        return _run(module, ap.parse_args(argv), ap, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
