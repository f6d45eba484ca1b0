"""`edgeai pull | import | list | show | rm`: parse, call `edgeai.store`, render."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from edgeai.cli import render

_TIERS = ("edge", "workhorse", "enterprise", "cloud")


def _count(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _fits(v: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[v]


def _done(lm: Any, verb: str, as_json: bool) -> None:
    if as_json:
        render.print_json(lm.to_dict())
        return
    render.err.print(
        f"[green]{verb}[/] {render.esc(lm.name)} ({render.human_bytes(lm.size)}) from "
        f"{render.esc(lm.origin)}"
    )
    render.out.print(str(lm.path), markup=False)


def _bytes(n: int | None) -> str:
    """Compact sizes for tables: 76 MB, 1.7 GB."""
    if not n:
        return "-"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _table(rows: list[dict]) -> None:
    from rich.table import Table

    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "TIER", "PARAMS", "SIZE", "MEMORY", "CONTEXT", "STATUS", "FITS"):
        t.add_column(
            col,
            no_wrap=True,
            justify="right" if col in {"PARAMS", "SIZE", "MEMORY", "CONTEXT"} else "left",
        )
    style = {
        "installed": "[green]installed[/]",
        "damaged": "[red]damaged[/]",
        "remote": "[dim]remote[/]",
        "available": "available",
    }
    for r in rows:
        ctx = f"{r['context'] // 1024}k" if r["context"] else "-"
        t.add_row(
            render.esc(r["name"]),
            render.esc(r["tier"] or "-"),
            _count(r["params"]),
            _bytes(r["size"]),
            _bytes(r["memory"]),
            ctx,
            style[r["status"]],
            _fits(r["fits"]),
        )
    render.out.print(t)


def _progress(quiet: bool):
    return contextlib.nullcontext() if quiet else render.progress()


def register(app: typer.Typer) -> None:
    @app.command()
    def pull(
        model: str = typer.Argument(..., help="catalog name (see `edgeai list`) or hf:org/repo"),
        name: str | None = typer.Option(None, "--name", help="store it under this name"),
        force: bool = typer.Option(
            False,
            "--force",
            help="pull even if it does not fit in memory, or replace "
            "another model installed under that name",
        ),
        as_json: bool = typer.Option(False, "--json", help="print the installed model as JSON"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        """Download a model (verified, resumable) into the local store."""
        from edgeai import store

        try:
            with _progress(quiet) as on_progress:
                lm = store.pull(model, name=name, on_progress=on_progress, force=force)
        except KeyboardInterrupt:
            render.err.print(
                f"[yellow]interrupted[/]: run `edgeai pull {render.esc(model)}` again to resume"
            )
            raise typer.Exit(130) from None
        _done(lm, "pulled", as_json)

    @app.command("import")
    def import_(
        file: Path = typer.Argument(..., help="a GGUF model file (Q4_0, Q4_1, Q8_0, F16, F32)"),
        name: str | None = typer.Option(
            None, "--name", help="store it under this name (default: from the file name)"
        ),
        force: bool = typer.Option(
            False, "--force", help="replace an installed model with the same name"
        ),
        as_json: bool = typer.Option(False, "--json", help="print the installed model as JSON"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no spinner"),
    ) -> None:
        """Convert a GGUF file into an MLX model in the local store."""
        from edgeai import store

        with _progress(quiet) as on_progress:
            lm = store.import_gguf(file, name, force=force, on_progress=on_progress)
        _done(lm, "imported", as_json)

    @app.command("list")
    def list_(
        installed: bool = typer.Option(False, "--installed", help="only models on this machine"),
        tier: str | None = typer.Option(
            None, "--tier", help="only this tier: " + ", ".join(_TIERS)
        ),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """The catalog and the installed models, with size, memory and whether each fits."""
        from edgeai import store
        from edgeai.errors import InvalidInput

        if tier is not None and tier not in _TIERS:
            raise InvalidInput(f"unknown tier '{tier}'", "use one of " + ", ".join(_TIERS))
        rows = [
            r
            for r in store.overview()
            if (r["installed"] or not installed) and (tier is None or r["tier"] == tier)
        ]
        if as_json:
            render.print_json(rows)
        elif not rows:
            render.err.print(
                "no models" + (" installed; try `edgeai pull smollm2-135m`" if installed else "")
            )
        else:
            _table(rows)

    @app.command()
    def show(
        model: str = typer.Argument(..., help="model name, alias or hf:org/repo"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """Everything known about one model: catalog entry, sources, local files."""
        from edgeai import store
        from edgeai.routing.confidence import gate_summary

        d = store.describe(model)
        if d.get("installed") or d.get("tier") != "remote":
            d["gate"] = gate_summary(d["name"])
        if as_json:
            render.print_json(d)
            return
        _show(d)

    @app.command()
    def rm(
        model: str = typer.Argument(..., help="installed model name"),
        yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
        keep_cache: bool = typer.Option(
            False, "--keep-cache", help="keep hub files in the Hugging Face cache"
        ),
        as_json: bool = typer.Option(False, "--json", help="print what was removed as JSON"),
    ) -> None:
        """Delete an installed model."""
        from edgeai import store
        from edgeai.errors import InvalidInput, ModelNotFound

        d = store.describe(model)
        if not d["installed"]:
            raise ModelNotFound(
                f"model '{d['name']}' is not installed", "see `edgeai list --installed`"
            )
        if not yes:
            size = render.human_bytes(d["local"]["size"])
            try:
                ok = typer.confirm(f"delete {d['name']} ({size})?", default=False, err=True)
            except typer.Abort:
                raise InvalidInput("no confirmation given", "answer y, or pass --yes") from None
            if not ok:
                render.err.print("kept it")
                raise typer.Exit(1)
        lm = store.remove(model, purge_cache=not keep_cache)
        if as_json:
            render.print_json({"removed": lm.name, "freed": lm.size, "path": str(lm.path)})
        else:
            render.err.print(f"removed {render.esc(lm.name)} ({render.human_bytes(lm.size)})")


def _field(key: str, value: object) -> object:
    """A source field for `show`; a multi-wheel source's parts as first … last (N wheels)."""
    if key == "parts" and isinstance(value, list) and value:
        first, last = (p["package"] if isinstance(p, dict) else p for p in (value[0], value[-1]))
        return f"{first} … {last} ({len(value)} wheels)"
    return value


def _show(d: dict) -> None:
    from rich.table import Table

    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    e = render.esc
    t.add_row("name", e(d["name"]))
    for key in ("description", "tier", "license"):
        if d.get(key):
            t.add_row(key, e(d[key]))
    if d.get("params"):
        t.add_row("params", _count(d["params"]))
    if d.get("size"):
        t.add_row("download", render.human_bytes(d["size"]))
    if d.get("memory"):
        t.add_row("memory", f"{render.human_bytes(d['memory'])} (fits now: {_fits(d.get('fits'))})")
    if d.get("context"):
        t.add_row("context", f"{d['context']:,} tokens")
    if d.get("aliases"):
        t.add_row("aliases", e(", ".join(d["aliases"])))
    for i, s in enumerate(d.get("sources") or [], 1):
        fields = (f"{k}={_field(k, v)}" for k, v in s.items() if k != "sha256")
        t.add_row(f"source {i}", e(" ".join(fields)))
    if d.get("remote"):
        t.add_row("remote", e(f"{d['remote']['provider']}: {d['remote']['model']}"))
    local = d.get("local")
    if local:
        t.add_row(
            "installed",
            e(f"{local['path']} ({render.human_bytes(local['size'])}, {local['created']})"),
        )
        fields = (f"{k}={_field(k, v)}" for k, v in local["source"].items() if k != "sha256")
        t.add_row("from", e(" ".join(fields)))
        if local.get("problem"):
            t.add_row("problem", f"[red]{e(local['problem'])}[/]")
    else:
        t.add_row("installed", "no")
    gate = d.get("gate")
    if gate:
        t.add_row("gate", e(_gate_line(gate)))
        if gate.get("source"):
            t.add_row("gate from", e(gate["source"]))
    render.out.print(t)


def _gate_line(g: dict) -> str:
    """The confidence gate in one line: estimator, AUROC, what the threshold keeps."""
    if g.get("auroc") is None:
        return g.get("verdict") or "not calibrated"
    line = f"{g['estimator']}, held-out AUROC {g['auroc']:.2f}; threshold {g['threshold']:.2f}"
    if g.get("kept_local"):
        line += (
            f" keeps {g['kept_local']:.0%} local at {g['kept_accuracy']:.0%} accuracy"
            f" (target {g['target'] or 0.9:.0%}), {g['recall']:.0%} of correct answers"
        )
    else:
        line += f": {g.get('verdict')}"
    return line
