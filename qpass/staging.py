"""Temporary output folders beside a destination: named after their owner, cleaned when the owner is dead,
published with the user's umask.

A staging folder is ``.qpass-<kind>-<pid>@<host>-<random>`` in the destination's parent. A run that is
killed (SIGKILL, power loss) cannot remove its own; the next run in the same parent calls
``clean_stale(parent)``, which removes the folders whose process is gone on this host. Folders without an
owner in their name (made by older versions) are removed only when they are older than a day.
``tempfile`` creates folders 0700 and files 0600; ``publish(path)`` gives the final tree the modes a plain
``mkdir`` and ``open`` would (0777 / 0666 minus the umask).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time

log = logging.getLogger(__name__)

PREFIX = ".qpass-"
UNOWNED_MAX_AGE_S = 24 * 3600
_OWNED = re.compile(r"^\.qpass-[a-z]+-(\d+)@([A-Za-z0-9]*)-")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def make_dir(parent: str | os.PathLike, kind: str) -> str:
    """A new, empty staging folder in `parent` (created if missing), owned by this process."""
    parent = os.fspath(parent)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{os.getpid()}@{_host()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by another user
        return True
    return True


def is_stale(path: str | os.PathLike, now: float | None = None) -> bool:
    """True when the staging folder `path` belongs to no running process."""
    name = os.path.basename(os.fspath(path))
    if not name.startswith(PREFIX):
        return False
    m = _OWNED.match(name)
    if m:
        # NOTE: a folder made on another host (a shared file system) is never judged from here.
        return m.group(2) == _host() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
    try:
        age = (now or time.time()) - os.lstat(path).st_mtime
    except OSError:
        return False
    return age > UNOWNED_MAX_AGE_S


def clean_stale(parent: str | os.PathLike) -> list[str]:
    """Remove the stale ``.qpass-*`` staging folders in `parent`; return the paths removed."""
    parent = os.fspath(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in sorted(names):
        path = os.path.join(parent, name)
        if name.startswith(PREFIX) and os.path.isdir(path) and not os.path.islink(path) and is_stale(path, now):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                log.info("removed stale staging folder %s", path)
                removed.append(path)
    return removed


def umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike) -> None:
    """Give `path` and everything under it the modes a plain ``mkdir`` / ``open`` would have: directories
    0777 & ~umask, files 0666 & ~umask (execute bits kept). Temporary files and folders are created 0600 /
    0700, and a rename keeps that."""
    mask = umask()
    for root, _, files in os.walk(os.fspath(path)):      # every directory once; links are not followed
        _chmod(root, 0o777 & ~mask)
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                _chmod(f, (0o666 | (os.stat(f).st_mode & 0o111)) & ~mask)


def _chmod(path: str, mode: int) -> None:
    if stat.S_IMODE(os.stat(path).st_mode) != mode:
        os.chmod(path, mode)
