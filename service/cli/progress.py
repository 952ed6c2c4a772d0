"""Progress on stderr: a live bar on a terminal, a plain line every few seconds otherwise, nothing with --quiet.

The bar (rich) shows done/total, images/s, ETA and the errors so far; per-image errors are printed above
it as they happen (``error: PATH: message``), and in every mode, since they are what a user must see.
"""

from __future__ import annotations

import sys
import time
from typing import IO

PROG = "efficientnet-batch"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Reporter:
    """Counts results and tells the user. ``start`` once the total is known, ``finish`` at the end."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.errors = 0
        self.started = time.monotonic()

    def start(self, total: int, description: str) -> None:
        self.total = total
        self.started = time.monotonic()

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def tick(self) -> None:
        """Called about twice a second by the run."""

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def error(self, path: str, message: str) -> None:
        self.say(f"error: {path}: {message}")

    def finish(self) -> None:
        pass


class QuietReporter(Reporter):
    """--quiet: per-image errors and fatal messages only."""

    def say(self, text: str) -> None:
        pass

    def error(self, path: str, message: str) -> None:
        print(f"error: {path}: {message}", file=self.stream, flush=True)


class LineReporter(Reporter):
    """Not a terminal (a log file, CI, a pipe): one plain line every ``every`` seconds."""

    def __init__(self, stream: IO[str] | None = None, every: float = 10.0) -> None:
        super().__init__(stream)
        self.every = every
        self._last = 0.0

    def start(self, total: int, description: str) -> None:
        super().start(total, description)
        self._last = time.monotonic()
        self.say(f"{PROG}: {description}: {total} image" + ("" if total == 1 else "s"))

    def tick(self) -> None:
        if time.monotonic() - self._last >= self.every and self.done < self.total:
            self._last = time.monotonic()
            self.say(self.line())

    def line(self) -> str:
        rate = self.rate
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        errors = f"{self.errors} error" + ("" if self.errors == 1 else "s")
        return f"{PROG}: {self.done}/{self.total} ({percent:.0f}%), {rate:.1f} images/s, {errors}, ETA {eta}"


class BarReporter(Reporter):
    """A terminal: rich's live progress bar, redrawn in place."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        from rich.console import Console

        self.console = Console(file=self.stream)
        self._progress = None
        self._task = None

    def start(self, total: int, description: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                text = "-- images/s" if speed is None else f"{speed:.1f} images/s"
                return Text(text, style="progress.data.speed", no_wrap=True)

        class ErrorsColumn(ProgressColumn):
            def render(self, task) -> Text:
                errors = task.fields.get("errors", 0)
                return Text(f"{errors} error" + ("" if errors == 1 else "s"), style="red" if errors else "dim",
                            no_wrap=True)

        super().start(total, description)
        self.say(f"{PROG}: {description}")
        self._progress = Progress(
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            ErrorsColumn(),
            console=self.console,
            speed_estimate_period=10.0,
        )
        self._progress.start()
        self._task = self._progress.add_task("images", total=total, errors=0)

    def advance(self, ok: bool) -> None:
        super().advance(ok)
        if self._progress is not None:
            self._progress.update(self._task, advance=1, errors=self.errors)

    def say(self, text: str) -> None:
        # soft_wrap: a long line stays one line (the terminal wraps it), as it would without rich.
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def make_reporter(*, quiet: bool, every: float | None, stream: IO[str] | None = None) -> Reporter:
    stream = stream or sys.stderr
    if quiet:
        return QuietReporter(stream)
    if stream.isatty() and every is None:
        return BarReporter(stream)
    return LineReporter(stream, every=10.0 if every is None else every)
