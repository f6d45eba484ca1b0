"""`edgeai adapter add/list/rm`: LoRA adapters in the store."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeai.cli import render


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        help="LoRA adapters: add, list, remove. Use one with `edgeai run --adapter NAME`.",
        no_args_is_help=True,
    )
    app.add_typer(sub, name="adapter")

    @sub.command("add")
    def add(
        path: Path = typer.Argument(
            ..., help="mlx-lm adapter directory (adapter_config.json + adapters.safetensors)"
        ),
        base: str = typer.Option(
            ...,
            "--base",
            "-b",
            help="The base model it was trained on: store name or MLX directory",
        ),
        name: str | None = typer.Option(
            None, "--name", help="Name to store it under [default: the directory name]"
        ),
        force: bool = typer.Option(False, "--force", help="Replace an adapter of the same name"),
        json_out: bool = typer.Option(False, "--json", help="Print JSON"),
    ) -> None:
        """Check an adapter against its base model's layers and shapes, and store it."""
        from edgeai.store import adapters

        with render.err.status(f"checking {render.esc(path)} against {render.esc(base)}…"):
            info = adapters.add(path, base, name=name, force=force)
        if json_out:
            render.print_json(info.to_dict())
        else:
            render.out.print(
                f"added adapter {info.name} for {render.esc(info.base)}: rank {info.rank}, "
                f"{info.layers} layers, {render.human_bytes(info.size_bytes)}"
            )

    @sub.command("list")
    def list_(json_out: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
        """List the stored adapters."""
        from rich.table import Table

        from edgeai.store import adapters

        infos = adapters.list_adapters()
        if json_out:
            render.print_json([i.to_dict() for i in infos])
            return
        if not infos:
            render.err.print("no adapters; add one with `edgeai adapter add PATH --base MODEL`")
            return
        table = Table("name", "base", "rank", "scale", "layers", "size", box=None)
        for i in infos:
            if i.problem:
                table.add_row(i.name, f"damaged: {render.esc(i.problem)}", "-", "-", "-", "-")
                continue
            table.add_row(
                i.name,
                render.esc(i.base),
                str(i.rank),
                f"{i.scale:g}",
                str(i.layers),
                render.human_bytes(i.size_bytes),
            )
        render.out.print(table)

    @sub.command("rm")
    def rm(name: str = typer.Argument(..., help="Adapter name")) -> None:
        """Remove a stored adapter."""
        from edgeai.store import adapters

        info = adapters.remove(name)
        render.err.print(f"removed adapter {info.name}")
