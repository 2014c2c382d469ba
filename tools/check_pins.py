"""Check that the running environment is exactly the dev/CI lock (constraints.txt): every installed
distribution is pinned there, at the installed version. ``make venv`` runs it after installing, so a new
transitive dependency, or a pin pip could not honour, fails the fresh-machine install loudly instead of
letting CI test an unlocked release. Exit status 1 lists what differs and how to fix it.

``--write`` rewrites constraints.txt from the running environment instead (``make lock`` runs it in a fresh
venv resolved from pyproject's ranges): the header below, then every distribution but qpass, sorted."""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise SystemExit(f"{path}: {line!r} is not an exact pin (name==version)")
            out[canonical(name)] = version.strip()
    return out


HEADER = """\
# Dev/CI lock: every package the dev environment installs (make venv), pinned. Regenerate on purpose with
# `make lock` (a fresh venv resolved from pyproject's ranges, torch held at the CPU build on local disk),
# run the suite, and commit the diff. torch: the CPU build of 2.13.0 lies on local disk; any other torch pulls
# a multi-GB CUDA build. pyproject.toml declares the ranges the library supports; this file is what CI tests.
"""


def installed() -> dict[str, str]:
    """{canonical name: version without a local tag (torch's +cpu)} of every distribution but qpass."""
    out = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name != "qpass":
            out[name] = dist.version.split("+")[0]
    return out


def write(path: Path) -> None:
    lines = [f"{name}=={version}" for name, version in sorted(installed().items())]
    path.write_text(HEADER + "\n".join(lines) + "\n")


def main() -> int:
    if sys.argv[1:] == ["--write"]:
        write(ROOT / "constraints.txt")
        return 0
    locked = pins(ROOT / "constraints.txt")
    problems = []
    for name, version in installed().items():
        if name not in locked:
            problems.append(f"{name}=={version} is installed but not pinned")
        elif locked[name] != version:
            problems.append(f"{name} is {version}, constraints.txt pins {locked[name]}")
    if problems:
        print("The environment differs from constraints.txt:\n  " + "\n  ".join(sorted(problems))
              + "\nFix: `make clean venv` for the locked environment, or `make lock` to bump the pins on purpose.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
