"""What long store operations report (downloads, conversions), for whoever shows it.

The store never prints: it calls `on_progress(Progress(...))`, and the CLI draws bars.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One report on a task.

    Attributes:
        task: what is being done ("pulling smollm2-135m", "converting x.gguf to MLX").
        done: bytes done so far.
        total: bytes in all; None when there is no measure (a spinner, not a bar).
        finished: the task has ended (successfully or not).
    """

    task: str
    done: int = 0
    total: int | None = None
    finished: bool = False


OnProgress = Callable[[Progress], None]


def silent(_: Progress) -> None:
    pass


@contextmanager
def task(
    on_progress: OnProgress | None, what: str, total: int | None = None, done: int = 0
) -> Iterator[Callable[[int], None]]:
    """Report `what` from its start to its end; yields a callback that adds done bytes."""
    report = on_progress or silent
    count = [done]
    report(Progress(what, done, total))

    def add(n: int) -> None:
        count[0] += n
        report(Progress(what, count[0], total))

    try:
        yield add
    finally:
        report(Progress(what, count[0], total, finished=True))
