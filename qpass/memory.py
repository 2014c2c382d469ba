"""Peak resident memory of a block of code (Linux), for the tools' time-and-memory columns and qat's stats."""
from __future__ import annotations

__all__ = ["PeakRss"]

_ACTIVE: list["PeakRss"] = []


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak resident memory (bytes) of this process over a with-block, or None where it cannot be read.

    Linux: the kernel's high-water mark (VmHWM) is reset on entry (``/proc/self/clear_refs`` = 5) and read on
    exit, so the number is the block's own peak, memory that was already held included. Meters nest: an inner
    meter's reset is folded into the outer ones (each outer meter keeps the highest mark seen before the reset).
    Elsewhere: None (ru_maxrss cannot be reset)."""

    def __enter__(self) -> "PeakRss":
        self.bytes = None
        self._seen = 0
        now = _hwm()
        for m in _ACTIVE:
            m._seen = max(m._seen, now or 0)
        self._ok = now is not None and _reset()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _ACTIVE.remove(self)
        if self._ok:
            peak = _hwm()
            if peak is not None:
                self.bytes = max(self._seen, peak)
                for m in _ACTIVE:
                    m._seen = max(m._seen, self.bytes)
        return False
