"""Progress for long work: a bar in the terminal and, inside a Prefect run, a progress artifact in the UI."""

from __future__ import annotations

import sys
import time
from typing import Any


def _in_prefect_run() -> bool:
    try:
        from prefect.context import get_run_context

        get_run_context()
        return True
    except Exception:  # no Prefect, or not inside a flow/task run
        return False


class Progress:
    """`with Progress("calibrating", total=n) as p: p.advance()` — cheap to call often (throttled)."""

    def __init__(self, description: str, total: int, *, min_interval: float = 0.5) -> None:
        self.description = description
        self.total = max(int(total), 1)
        self.done = 0
        self.min_interval = min_interval
        self._last = 0.0
        self._next_push = (
            0.0  # Prefect updates are HTTP calls: spaced so they cost a few % of the work at most
        )
        self._bar: Any = None
        self._task: Any = None
        self._artifact: Any = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                "[bold]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        else:
            print(f"{self.description}: 0/{self.total}", file=sys.stderr, flush=True)
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(0.0, description=self.description)
        return self

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = min(done, self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        now = time.monotonic()
        if now - self._last >= self.min_interval or self.done >= self.total:
            self._last = now
            if self._bar is None:
                print(f"{self.description}: {self.done}/{self.total}", file=sys.stderr, flush=True)
            if now >= self._next_push or self.done >= self.total:
                self._push()

    def _push(self) -> None:
        if self._artifact is None:
            return
        from prefect.artifacts import update_progress_artifact

        start = time.monotonic()
        update_progress_artifact(self._artifact, 100.0 * self.done / self.total)
        took = time.monotonic() - start
        self._next_push = start + max(2.0, 20 * took)

    def __call__(self, done: int, total: int | None = None) -> None:
        """Usable as a `progress(done, total)` callback by library code that knows nothing of us."""
        if total:
            self.total = max(int(total), 1)
        self.update(done)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc[0] is None and self.done < self.total:
            self.update(self.total)
