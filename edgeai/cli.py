"""The `edgeai` command: parse arguments, call the library, hand results to render.

Each command group lives in its own `cli_*.py` module that registers itself here.
"""

from __future__ import annotations

import importlib
import sys

import typer

from edgeai import render
from edgeai.errors import EdgeAIError

app = typer.Typer(
    help="Run 4-bit small language models on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command groups, each a module with `register(app)`.
_COMMAND_MODULES = ("cli_run", "cli_store", "cli_bench", "cli_eval", "cli_serve", "cli_adapter")

for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"edgeai.{_name}")
    except ModuleNotFoundError as e:  # a group still being built is simply absent
        if e.name != f"edgeai.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Console-script entry point: user errors become one-line messages, not tracebacks."""
    try:
        app()
    except EdgeAIError as e:
        render.error(e.message, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        render.err.print("[dim]interrupted[/]")
        sys.exit(130)
