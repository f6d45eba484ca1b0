"""Everything the CLI prints: rich for people, JSON for scripts. No logic lives here."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from edgeai.hardware import human_bytes  # noqa: F401 - the CLI formats sizes through render

# Answers go to stdout; progress, stats and errors to stderr, so pipes get only the answer.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def esc(value: Any) -> str:
    """`value` as text that Rich prints as written: user text (names, paths, messages from
    files) must never be read as markup, which can crash ("[/]") or swallow "[policy]"."""
    return escape(str(value))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]error:[/] {esc(message)}", markup=True, highlight=False)
    if hint:
        err.print(f"[dim]hint: {esc(hint)}[/]")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {esc(message)}")


class _WarningLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


def show_library_warnings() -> None:
    """Print what the library logs at WARNING and above (logger "edgeai") as `warning:` lines."""
    log = logging.getLogger("edgeai")
    if not any(isinstance(h, _WarningLines) for h in log.handlers):
        log.addHandler(_WarningLines(logging.WARNING))
        log.propagate = False


@contextlib.contextmanager
def progress() -> Iterator[Callable[[Any], None]]:
    """An `on_progress` for the store's reports (edgeai.store.progress.Progress): a bar per
    task on stderr with bytes and speed where bytes are counted, a spinner where they are not."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bars:
        tasks: dict[str, Any] = {}
        started: dict[str, float] = {}

        def show(p: Any) -> None:
            if p.task not in tasks:
                tasks[p.task] = bars.add_task(p.task, total=p.total, completed=p.done, amount="")
                started[p.task] = time.monotonic()
            amount = ""
            if p.total:
                rate = p.done / max(time.monotonic() - started[p.task], 1e-3)
                amount = f"{human_bytes(p.done)} / {human_bytes(p.total)}, {human_bytes(rate)}/s"
            tid = tasks[p.task]
            bars.update(tid, completed=p.done, total=p.total, amount=amount)
            if p.finished:
                bars.update(tid, total=p.total or 1, completed=p.total or 1)
                bars.stop_task(tid)

        yield show


def decision(answer: Any, explain: bool = False) -> None:
    """Which tier answered (always, on stderr); with `explain`, the route, signals, score,
    threshold and decision behind it."""
    score = "" if answer.confidence is None else f" · P(correct) {answer.confidence:.2f}"
    thr = "" if answer.threshold is None else f" (threshold {answer.threshold:.2f})"
    how = f" ({answer.decision})" if answer.decision and answer.decision != answer.tier else ""
    err.print(f"[dim]answered by {esc(answer.tier)}{esc(how)}{score}{thr}[/]", markup=True)
    if not explain:
        return
    err.print(f"[bold]route[/]     {esc(answer.route or '—')}")
    err.print(f"[bold]decision[/]  {esc(answer.decision or '—')}")
    for r in answer.reasons:
        err.print(f"  · {r}", markup=False)
    if answer.explanation:
        err.print("[bold]why[/]       what moved P(correct) most for this answer:")
        for r in answer.explanation:
            err.print(f"  · {r}", markup=False)
    if answer.signals:
        sig = "  ".join(f"{k}={v:.3g}" for k, v in answer.signals.items())
        err.print(f"[bold]signals[/]   {esc(sig)}")
