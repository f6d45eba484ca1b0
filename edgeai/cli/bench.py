"""`edgeai bench`: prompt and generation tokens/sec, like llama-bench."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from edgeai.cli import render


def _resolve(model: str | None) -> tuple[Path, str]:
    """A store name (pulled on first use) or an MLX directory -> (directory, name)."""
    from edgeai import store

    with render.progress() as on_progress:
        name, path = store.locate(model, on_progress)
    return path, name


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: str | None = typer.Argument(
            None, help="Model name or MLX directory [default: smollm2-135m]"
        ),
        n_prompt: int = typer.Option(
            512, "-p", "--n-prompt", min=0, help="Prompt tokens for the pp test (0 skips)"
        ),
        n_gen: int = typer.Option(
            128, "-n", "--n-gen", min=0, help="Generated tokens for the tg test (0 skips)"
        ),
        reps: int = typer.Option(
            5, "-r", "--repetitions", min=1, help="Timed runs after one warm-up"
        ),
        kernel: str = typer.Option(
            "auto", "--kernel", "-k", help="auto (what `edgeai run` uses), builtin, custom or all"
        ),
        precision: str | None = typer.Option(
            None,
            "--precision",
            help="CPU kernel: fast, accurate or all [default: $EDGEAI_KERNEL_PRECISION, else fast]",
        ),
        json_out: bool = typer.Option(False, "--json", help="Print JSON"),
        csv_out: bool = typer.Option(False, "--csv", help="Print CSV"),
    ) -> None:
        """Measure prompt processing (pp) and generation (tg) speed with random tokens."""
        from edgeai import bench as b
        from edgeai.errors import InvalidInput

        if kernel not in ("auto", "builtin", "custom", "all"):
            raise InvalidInput(
                f"unknown kernel {kernel!r}", "use --kernel auto, builtin, custom or all"
            )
        if precision not in (None, "fast", "accurate", "all"):
            raise InvalidInput(
                f"unknown precision {precision!r}", "use --precision fast, accurate or all"
            )
        precisions = ("fast", "accurate") if precision == "all" else (precision,)
        if json_out and csv_out:
            raise InvalidInput("--json and --csv are exclusive", "pick one output format")
        if n_prompt == 0 and n_gen == 0:
            raise InvalidInput(
                "nothing to measure: -p 0 and -n 0", "give -p or -n a positive count"
            )
        path, name = _resolve(model)
        kernels = b.KERNELS if kernel == "all" else (kernel,)
        head = b.header(name)
        configs = sum(1 if k == "builtin" else len(precisions) for k in kernels)
        runs = configs * ((n_prompt > 0) + (n_gen > 0)) * reps
        rows = []
        from rich.progress import Progress

        with Progress(transient=True, console=render.err) as progress:
            task = progress.add_task("benchmarking", total=runs)
            for row in b.bench(
                path,
                name,
                kernels,
                n_prompt,
                n_gen,
                reps,
                on_rep=lambda: progress.advance(task),
                precisions=precisions,
            ):
                rows.append(row)
        fastest = b.verdict(rows)
        if json_out:
            render.print_json(
                {
                    "header": head.to_dict(),
                    "results": [r.to_dict() for r in rows],
                    "fastest": fastest,
                }
            )
        elif csv_out:
            sys.stdout.write(b.csv_text(head, rows))
        else:  # plain text to stdout, byte for byte (no rich markup or wrapping)
            lines = [f"fastest for {test}: {text}" for test, text in fastest.items()]
            sys.stdout.write(
                b.markdown(head, rows)
                + "\n"
                + "".join(f"\n{ln}" for ln in lines)
                + ("\n" if lines else "")
            )
