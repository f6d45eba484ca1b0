"""`edgeai serve` (the local OpenAI-compatible server) and `edgeai ps` (what it has loaded)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import typer

from edgeai.cli import render


def _served_model(model: str | None, name: str | None) -> tuple[str, Path]:
    """The default model's name and MLX directory (pulled into the store on first use)."""
    from edgeai import store

    with render.progress() as on_progress:
        found, path = store.locate(model, on_progress)
    return name or found, path


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: str | None = typer.Option(
            None,
            "--model",
            "-m",
            help="Default model: a name or an MLX directory [default: smollm2-135m]",
        ),
        name: str | None = typer.Option(
            None,
            "--name",
            help="Name clients use for --model (default: its name or directory name)",
        ),
        socket_path: Path | None = typer.Option(
            None,
            "--socket",
            help=(
                "Unix socket path [default: $EDGEAI_SOCKET or $XDG_RUNTIME_DIR/edgeai/edgeai.sock]"
            ),
        ),
        host: str | None = typer.Option(
            None,
            "--host",
            help="Also listen on TCP at this address (loopback unless told otherwise)",
        ),
        port: int | None = typer.Option(
            None,
            "--port",
            min=0,
            max=65535,
            help="Also listen on TCP at this port (0: any free port)",
        ),
        token: str | None = typer.Option(
            None, "--token", envvar="EDGEAI_SERVER_TOKEN", help="Bearer token TCP clients must send"
        ),
        policy: str | None = typer.Option(
            None,
            "--policy",
            help=(
                "Escalation policy for requests that set none: local-only, auto, remote "
                "[default: config, else auto]"
            ),
        ),
        max_batch: int = typer.Option(
            16, "--max-batch", min=1, max=256, help="Most sequences decoded together"
        ),
        max_queue: int = typer.Option(
            64, "--max-queue", min=0, help="Most requests waiting; beyond it: 503 + Retry-After"
        ),
        keep_alive: float = typer.Option(
            300.0,
            "--keep-alive",
            help="Seconds an idle model stays loaded (-1: forever, 0: unload at once)",
        ),
        max_body: int = typer.Option(
            4 << 20, "--max-body", min=1024, help="Largest request body in bytes"
        ),
        no_store: bool = typer.Option(
            False, "--no-store", help="Serve only --model, not every model in the store"
        ),
        log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level"),
    ) -> None:
        """Serve models to local apps over a Unix socket, OpenAI-compatible."""
        from edgeai.config import load_config
        from edgeai.routing.router import policy_from_config
        from edgeai.server import app as server_app
        from edgeai.server.metrics import Metrics
        from edgeai.server.models import ModelRegistry
        from edgeai.server.scheduler import Scheduler
        from edgeai.server.transport import Listen, default_socket_path
        from edgeai.server.transport import serve as run_server

        if port is None and host is not None:
            raise typer.BadParameter("--host needs --port")
        if not math.isfinite(keep_alive):
            raise typer.BadParameter("--keep-alive must be a number of seconds (-1: forever)")
        if token is not None:
            from edgeai.keys import clean

            token = clean(token, "the token (--token or $EDGEAI_SERVER_TOKEN)") or None
        pol = policy_from_config(
            load_config(), policy
        )  # a bad --policy fails here, not per request
        served_name, path = _served_model(model, name)
        metrics = Metrics()
        scheduler = Scheduler(
            max_batch=max_batch, max_queue=max_queue, keep_alive=keep_alive, metrics=metrics
        )
        registry = ModelRegistry({served_name: path}, use_store=not no_store)
        settings = server_app.Settings(max_body=max_body, policy=pol)
        asgi = server_app.build_app(scheduler, registry, metrics=metrics, settings=settings)
        listen = Listen(socket_path or default_socket_path(), host, port, token)

        def ready(where: list[str]) -> None:
            render.err.print(
                f"edgeai serve: {served_name} on {', '.join(where)} (policy {pol}); Ctrl-C stops",
                soft_wrap=True,
                markup=False,
            )

        run_server(asgi, listen, log_level=log_level, on_ready=ready)

    @app.command()
    def ps(
        socket_path: Path | None = typer.Option(None, "--socket", help="The server's Unix socket"),
        json_out: bool = typer.Option(False, "--json", help="Print JSON"),
    ) -> None:
        """Show what a running `edgeai serve` has loaded."""
        import httpx

        from edgeai.errors import EdgeAIError
        from edgeai.server.transport import default_socket_path

        sock = socket_path or default_socket_path()
        if not os.path.exists(sock):
            raise EdgeAIError(
                f"no server socket at {sock}", "start one with `edgeai serve` (or pass --socket)"
            )
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as client:
                status = client.get("http://localhost/api/ps").json()
        except httpx.HTTPError as e:
            raise EdgeAIError(
                f"the server at {sock} does not answer: {e}", "restart `edgeai serve`"
            ) from None
        if json_out:
            render.print_json(status)
            return
        from rich.table import Table

        table = Table(
            "model", "loaded for", "unloads in", "kernel", "context", "prompt cache", box=None
        )
        for m in status["models"]:
            expires = (
                "busy" if m["expires_in_seconds"] is None else f"{m['expires_in_seconds']:.0f} s"
            )
            pc = m.get("prompt_cache") or {}
            cache = (
                f"{pc.get('entries', 0)} prompts, {render.human_bytes(pc.get('bytes', 0))}, "
                f"{pc.get('hits', 0)} hits / {pc.get('misses', 0)} misses"
            )
            table.add_row(
                render.esc(m["name"]),
                f"{m['loaded_seconds']:.0f} s",
                expires,
                str(m["kernel"]),
                str(m["context_length"]),
                cache,
            )
        if not status["models"]:
            render.out.print("no model loaded")
        else:
            render.out.print(table)
        lanes = status.get("lanes") or {}
        render.out.print(
            f"active {status['active']}/{status['max_batch']}, waiting {status['waiting']}/"
            f"{status['max_queue']}, {status['tokens_per_second']:.1f} tok/s; "
            "requests decoded alone "
            f"{lanes.get('alone', 0)}, batched {lanes.get('batched', 0)}"
        )
