"""The one progress helper every progress bar uses.

`PIPELINE_NO_PROGRESS=1` turns every bar off (tests, CI). On a terminal a bar is tqdm's; when stderr is not a
terminal (a log file, a pipe), progress is plain lines, one per tenth of the work (and at least every
PLAIN_EVERY_S seconds), so a log holds no carriage returns or cursor-movement escape codes (ESC[A).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PLAIN_EVERY_S = 60.0


def progress_disabled() -> bool:
    return os.environ.get("PIPELINE_NO_PROGRESS", "") not in ("", "0")


def progress(
    iterable: Iterable | None = None,
    desc: str = "",
    total: int | None = None,
    initial: int = 0,
    leave: bool = True,
    enabled: bool = True,
):
    """A progress bar over ITERABLE (or updated by hand): tqdm on a terminal, plain lines elsewhere, nothing when
    progress is off or not ENABLED (e.g. ranks other than 0)."""
    if progress_disabled() or not enabled:
        return Quiet(iterable)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave)
    return PlainLines(iterable, desc, total, initial)


class Quiet:
    """The tqdm calls the pipeline makes, doing nothing."""

    def __init__(self, iterable: Iterable | None = None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


class PlainLines(Quiet):
    """Progress as whole lines on stderr: `DESC: 40/100 (40%) loss=0.3`."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, initial: int = 0) -> None:
        super().__init__(iterable)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.desc, self.total, self.count = desc, total, initial
        self.postfix = ""
        self.last_tenth = self._tenth()
        self.last_time = time.monotonic()

    def _tenth(self) -> int:
        return 10 * self.count // self.total if self.total else 0

    def __iter__(self) -> Iterator:
        for item in super().__iter__():
            yield item
            self.update(1)
        self.close()

    def update(self, count: int = 1) -> None:
        self.count += count
        now = time.monotonic()
        if self._tenth() > self.last_tenth or now - self.last_time >= PLAIN_EVERY_S:
            self.last_tenth, self.last_time = self._tenth(), now
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def _line(self) -> None:
        shown = f"{self.count}/{self.total} ({100 * self.count // self.total}%)" if self.total else str(self.count)
        print(f"{self.desc}: {shown}" + (f" {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.total and self.last_tenth < 10 and self.count >= self.total:
            self.last_tenth = 10
            self._line()
