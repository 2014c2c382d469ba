"""Our own CPU kernels, in C: compiled on first use with the system C compiler, loaded with ctypes.

    csrc/q4avx2.c     int4 x fp32 linear layer (AVX2 + FMA, OpenMP over output rows) on the ``q4`` layout
                      (packing.py); exact up to fp32 summation order. See the file's header for the math.
                      Also ``i8_linear``: int8 x int8 -> int32 W8A8 linear (exact integer sums, then the fp32
                      scales), on the module's int8 [N, K] weights; see its comment in the same file.

Build: ``$CC`` (default ``cc``) ``-O3 -mavx2 -mfma -fopenmp -shared -fPIC`` (without ``-fopenmp`` if that
fails: one thread) into ``$XDG_CACHE_HOME/qpass/kernels/q4avx2-<hash>.so`` (``~/.cache`` by default; a
per-user temporary folder if that is not writable), where the hash covers the source, the command and the
machine type, so an edited source or another ``$CC`` builds anew. The library is written under a temporary
name and renamed, so concurrent processes never load a half-written file. It is then checked once against
a small reference product before it is used. With torch's Linux wheels the library's ``libgomp.so.1`` is
the one torch already loaded (same soname), so there is one OpenMP runtime and one thread pool.

Optional by design: where the CPU lacks AVX2/FMA (as torch sees it), there is no compiler, the build or the
check fails, or ``QPASS_NO_NATIVE=1`` is set, :func:`q4` returns None (logged once) and the backend works as
without it (int4 weights use the int4pack or dense layouts and torch's kernels).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("qpass.backends.torch_packed")

ENV_DISABLE = "QPASS_NO_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "q4avx2.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
OPENMP = ("-fopenmp",)
ABI_VERSION = 3
ISAS = ("AVX2", "AVX512")           # torch's CPU capabilities that imply AVX2 + FMA
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_I8_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

_lock = threading.Lock()
_state: dict = {}                   # {"lib": Q4Library | None, "why": str}: one build attempt per process


class Q4Library:
    """The loaded library: ``linear(...)`` is ``q4_linear`` (see csrc/q4avx2.c), ``path`` forces a code path."""

    def __init__(self, path: str):
        self.file = path
        lib = ctypes.CDLL(path)
        lib.q4_abi_version.restype = ctypes.c_int
        if lib.q4_abi_version() != ABI_VERSION:
            raise OSError(f"{path} has ABI version {lib.q4_abi_version()}, expected {ABI_VERSION}")
        self.linear = lib.q4_linear
        self.linear.restype, self.linear.argtypes = ctypes.c_int, _ARGS
        self.path = lib.q4_linear_path
        self.path.restype, self.path.argtypes = ctypes.c_int, [ctypes.c_int, *_ARGS]
        self.i8_linear = lib.i8_linear
        self.i8_linear.restype, self.i8_linear.argtypes = ctypes.c_int, _I8_ARGS
        self._lib = lib


def disabled() -> str | None:
    """Why the native kernels are off regardless of the build (None: they are not)."""
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        return f"{ENV_DISABLE}={os.environ[ENV_DISABLE]}"
    isa = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or isa not in ISAS:
        return f"the CPU has no AVX2/FMA as torch sees it ({platform.machine()}, {isa})"
    return None


def q4() -> Q4Library | None:
    """The q4 kernel library, building it on first use; None where it cannot be had (see module doc)."""
    if disabled() is not None:
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"], _state["why"] = _build_and_load()
                if _state["lib"] is None:
                    log.info("native int4 kernel unavailable, using torch's kernels: %s", _state["why"])
                else:
                    log.debug("native int4 kernel: %s", _state["lib"].file)
    return _state["lib"]


def available() -> bool:
    return q4() is not None


def status() -> str:
    """One line for reports: the library in use, or why there is none."""
    why = disabled()
    if why is None:
        lib = q4()
        return f"q4avx2 built ({os.path.basename(lib.file)})" if lib else f"q4avx2 unavailable: {_state['why']}"
    return f"q4avx2 off: {why}"


def reset() -> None:
    """Forget the loaded library (tests: rebuild with another compiler or cache folder)."""
    with _lock:
        _state.clear()


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qpass" / "kernels"


def _writable_dir() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"qpass-kernels-{user}"):
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError(f"no writable folder for compiled kernels (tried {cache_dir()})")


def _build_and_load() -> tuple[Q4Library | None, str]:
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        return None, f"source missing ({e})"
    errors = []
    for extra in (OPENMP, ()):
        cmd = [*compiler(), *FLAGS, *extra]
        try:
            lib = _load_or_build(cmd, library_path(cmd, src))
            _self_check(lib)
            return lib, ""
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            errors.append(f"{' '.join(cmd)}: {str(e).strip()[-500:]}")
    return None, "; ".join(errors)


def library_path(cmd: list[str], src: bytes) -> Path:
    """Where the library built from `src` by `cmd` is cached (the name hashes both and the machine type)."""
    key = hashlib.sha256(src + "\0".join([*cmd, platform.machine()]).encode()).hexdigest()[:16]
    return _writable_dir() / f"q4avx2-{key}.so"


def _load_or_build(cmd: list[str], path: Path) -> Q4Library:
    if path.is_file():
        try:
            return Q4Library(str(path))
        except OSError as e:                     # e.g. truncated by a full disk: build it again
            log.debug("cached kernel %s unusable (%s), rebuilding", path, e)
    _compile(cmd, path)
    return Q4Library(str(path))


def _compile(cmd: list[str], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cmd, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"exit {proc.returncode}: {proc.stderr}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _self_check(lib: Q4Library) -> None:
    """A small product on both code paths against float math: a miscompiled library is never used."""
    from .packing import to_q4

    g = torch.Generator().manual_seed(0)
    n, k, group = 7, 64, 32
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s = torch.randn(n, k // group, generator=g)
    z = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g)
    x = torch.randn(5, k, generator=g)
    w = (u.float().view(n, -1, group) - z.float().unsqueeze(-1)).mul(s.unsqueeze(-1)).view(n, k)
    ref = x @ w.t()
    qw = to_q4(u)
    for path in (0, 1):
        for m in (1, 5):
            out = torch.empty(m, n)
            rc = lib.path(path, x.data_ptr(), m, k, qw.data_ptr(), n, s.data_ptr(), z.data_ptr(), group, None,
                          out.data_ptr(), 1)
            if rc != 0 or not torch.allclose(out, ref[:m], rtol=1e-4, atol=1e-4):
                raise ValueError(f"self-check failed (path {path}, M={m}, rc={rc})")
    k = 45                                                   # i8_linear: a 16-column tail, codes at -128
    a = torch.randint(-128, 128, (3, k), dtype=torch.int8, generator=g)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    a[0, 0], w8[0, 0] = -128, -128
    sa, ws = torch.rand(3, generator=g), torch.rand(n, generator=g)
    ref = (a.long() @ w8.long().t()).float() * sa[:, None] * ws
    out = torch.empty(3, n)
    rc = lib.i8_linear(a.data_ptr(), 3, k, w8.data_ptr(), n, sa.data_ptr(), ws.data_ptr(), None, out.data_ptr(), 1)
    if rc != 0 or not torch.allclose(out, ref, rtol=1e-6, atol=0):
        raise ValueError(f"self-check failed (i8_linear, rc={rc})")
