"""Progress bars: one tqdm bar shape for every long loop (disabled, not absent, when progress is off, so callers
call `.update(n)` unconditionally and may use it as a context manager)."""

from __future__ import annotations


def progress_bar(total: int | None, desc: str, enabled: bool = True, *, unit: str = "it", **kwargs):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, **kwargs)


def byte_bar(total: int, desc: str, enabled: bool = True):
    """A progress bar counting bytes (KiB, MiB, ...)."""
    return progress_bar(total, desc, enabled, unit="B", unit_scale=True, unit_divisor=1024)
