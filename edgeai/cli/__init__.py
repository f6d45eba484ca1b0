"""The `edgeai` command: parse arguments, call the library, hand results to `render`.

One module per command group (run, store, bench, eval, serve, adapter), each with
`register(app)`; `render` is the only module that prints.
"""

from edgeai.cli.app import app, main

__all__ = ["app", "main"]
