"""The typer app: the command groups registered on it, and the console-script entry point."""

from __future__ import annotations

import sys

import typer

from edgeai.cli import adapter, bench, evaluate, render, run, serve, store
from edgeai.errors import EdgeAIError

app = typer.Typer(
    help="Run 4-bit small language models on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command groups, each a module with `register(app)`; each defers its heavy imports (MLX,
# the server) to the command's body, so `edgeai --help` starts fast.
for _group in (run, store, bench, evaluate, serve, adapter):
    _group.register(app)


def main() -> None:
    """Console-script entry point: user errors become one-line messages, not tracebacks."""
    render.show_library_warnings()
    try:
        app()
    except EdgeAIError as e:
        render.error(e.message, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        render.err.print("[dim]interrupted[/]")
        sys.exit(130)
