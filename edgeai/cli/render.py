"""Everything the CLI prints: rich for people, JSON for scripts. No logic lives here."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

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


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


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
    if answer.signals:
        sig = "  ".join(f"{k}={v:.3g}" for k, v in answer.signals.items())
        err.print(f"[bold]signals[/]   {esc(sig)}")
