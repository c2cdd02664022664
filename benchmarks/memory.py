"""The process's resident memory, read from /proc/self (Linux), for the benchmark scripts."""

from __future__ import annotations

__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak_rss"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Resident set size now."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since start or the last reset_peak_rss()."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Make the kernel's high-water mark (VmHWM) restart from the current RSS."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
