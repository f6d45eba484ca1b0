"""`edgeai doctor`: what this machine has, what is installed, and what will run."""

from __future__ import annotations

from typing import Any

from edgeai.cli import render


def report() -> dict[str, Any]:
    """Platform, MLX backend, memory, store, installed models (and whether each fits), kernel."""
    from edgeai import config, hardware, kernels, store
    from edgeai.errors import EdgeAIError
    from edgeai.options import DEFAULT_MODEL

    try:  # a broken config.toml is a finding to show, not a reason to stop checking
        default, config_problem = config.default_model(), None
    except EdgeAIError as e:
        default, config_problem = DEFAULT_MODEL, e.message
    models = []
    for lm in store.list_models():
        need = store.memory_needed(lm)
        models.append(
            {
                "name": lm.name,
                "size": lm.size,
                "memory": need,
                "fits": hardware.fits_memory(need),
                "ok": lm.problem is None,
                "problem": lm.problem,
                "path": str(lm.path),
            }
        )
    return {
        "platform": hardware.summary(),
        "store": {
            "path": str(config.models_dir()),
            "size": store.disk_usage(),
            "free_disk": hardware.free_disk(config.home()),
        },
        "config": str(config.config_path()),
        "config_problem": config_problem,
        "default_model": default,
        "models": models,
        "kernels": kernels.status(),
    }


def render_report(r: dict[str, Any]) -> None:
    from rich.table import Table

    p, hb, e = r["platform"], render.human_bytes, render.esc
    ok, bad = "[green]✓[/]", "[red]✗[/]"
    out = render.out
    out.print(
        f"[bold]platform[/]   {p['system']} · {p['machine']} · {p['cpu_cores']} cores "
        f"· Python {p['python']}"
    )
    out.print(f"[bold]mlx[/]        {p['mlx']} · backend [bold]{p['backend']}[/]")
    mem = p["memory"]
    out.print(f"[bold]memory[/]     {hb(mem['available'])} available of {hb(mem['total'])}")
    s = r["store"]
    out.print(
        f"[bold]store[/]      {e(s['path'])} · {hb(s['size'])} used · {hb(s['free_disk'])} free"
    )
    out.print(f"[bold]config[/]     {e(r['config'])}")
    if r.get("config_problem"):
        out.print(f"             {bad} {e(r['config_problem'])}")
    k = r["kernels"]
    if k.get("available"):
        prec = {
            "fast": "fast: int8 activations at decode",
            "accurate": "accurate: float32 accumulation",
        }
        why = (
            f"{k.get('isa')} · {k.get('threads')} threads "
            f"· {prec.get(k.get('precision'), 'float32 accumulation')} · "
            f"{k.get('verified_ok', 0)} shapes verified, {k.get('verified_failed', 0)} failed"
        )
    else:
        why = (
            k.get("reason") or "custom kernels unavailable; MLX's built-in quantized matmul is used"
        )
    out.print(f"[bold]kernel[/]     {k.get('kernel')} ({k.get('backend')}) — {e(why)}")
    if not r["models"]:
        out.print(
            f"[bold]models[/]     none installed; "
            f"`edgeai run` pulls {e(r['default_model'])} on first use"
        )
        return
    t = Table(title="installed models", title_justify="left")
    for col in ("name", "size", "memory", "fits", "state"):
        t.add_column(col)
    for m in r["models"]:
        fits = "?" if m["fits"] is None else (ok if m["fits"] else bad)
        t.add_row(
            e(m["name"]),
            hb(m["size"]),
            hb(m["memory"]),
            fits,
            ok if m["ok"] else f"{bad} {e(m['problem'])}",
        )
    out.print(t)
