"""`edgeai eval`: run the local model over questions with gold answers; judge or calibrate
the score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from edgeai.cli import render


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        data: list[Path] | None = typer.Argument(
            None,
            help="JSONL files of {question, answer} (NQ / GSM8K / "
            "choices / unanswerable) or SelfAware-style JSON; omit them "
            "to refit from --records alone",
        ),
        model: str | None = typer.Option(
            None, "--model", "-m", help="Model name or MLX directory [default: smollm2-135m]"
        ),
        limit: int | None = typer.Option(
            None, "--limit", "-l", help="At most this many questions per file (seeded sample)"
        ),
        max_tokens: int = typer.Option(
            24, "--max-tokens", "-n", help="Answer length cap for short-answer questions"
        ),
        max_tokens_math: int = typer.Option(
            64, "--max-tokens-math", help="Answer length cap for maths problems"
        ),
        records: Path | None = typer.Option(
            None,
            "--records",
            help="Save generations here (JSONL) and reuse "
            "those already there: refit without regenerating",
        ),
        calibrate: bool = typer.Option(
            False,
            "--calibrate",
            help="Fit the score on a split, pick the threshold, "
            "report held-out numbers, save to the user config",
        ),
        target_accuracy: float | None = typer.Option(
            None,
            "--target-accuracy",
            min=0.0,
            max=1.0,
            help="Threshold target: accuracy of answers kept local [default: 0.9]",
        ),
        budget: float | None = typer.Option(
            None,
            "--budget",
            min=0.0,
            max=1.0,
            help="Threshold target instead: share of questions escalated",
        ),
        fit_fraction: float = typer.Option(
            0.5, "--fit-fraction", min=0.1, max=0.9, help="Share of items used to fit"
        ),
        seed: int = typer.Option(0, "--seed", help="Sampling and split seed"),
        plot_path: Path = typer.Option(
            Path("edgeai-eval.png"), "--plot", help="Where to write the PNG plot"
        ),
        no_save: bool = typer.Option(
            False, "--no-save", help="With --calibrate: do not write the user config"
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON"),
        p_true: bool = typer.Option(
            False,
            "--p-true",
            help="Also score each answer by P(True) self-evaluation (one more pass each), "
            "to compare estimators",
        ),
        samples: int = typer.Option(
            0,
            "--samples",
            min=0,
            max=20,
            help="Also score each answer by the agreement of this many sampled answers with "
            "it (that many more generations each), to compare estimators",
        ),
    ) -> None:
        """Label answers, report accuracy, AUROC and risk–coverage; --calibrate fits the escalation score."""  # noqa: E501
        # One line on purpose: Typer (rich markup) keeps docstring line breaks in `edgeai --help`.
        from edgeai.cli.run import load_engine
        from edgeai.errors import InvalidInput
        from edgeai.routing import confidence, evaluate, gate_report

        if target_accuracy is not None and budget is not None:
            raise InvalidInput("give --target-accuracy or --budget, not both")
        engine = None
        if data:
            items = evaluate.mix(data, limit, seed)
            engine = load_engine(model)
            name = engine.name
            recs = _generate(
                evaluate, engine, items, max_tokens, max_tokens_math, records, quiet=json_out
            )
        elif records is not None and records.exists():
            from edgeai.config import default_model

            name = model or default_model()  # the records were made earlier; no model is loaded
            recs = evaluate.load_records(records)
            if not recs:
                raise InvalidInput(f"{records} holds no records", "run `edgeai eval DATA…` first")
        else:
            raise InvalidInput(
                "no questions to evaluate", "give DATA files, or --records FILE from an earlier run"
            )
        if p_true or samples:
            from edgeai.routing import selfcheck

            engine = engine or load_engine(name)
        if p_true:
            with _bar("judging (P(True))", len(recs), json_out) as done:
                recs = selfcheck.add_estimate(
                    recs,
                    "p_true",
                    lambda r: selfcheck.p_true(engine, r["question"], r["text"]),
                    records,
                    done,
                )
        if samples:
            with _bar(f"sampling ({samples} per answer)", len(recs), json_out) as done:
                recs = selfcheck.add_estimate(
                    recs,
                    "agreement",
                    lambda r: selfcheck.sample_agreement(
                        engine, r, samples, max_tokens, max_tokens_math
                    ),
                    records,
                    done,
                )
        report, scorer = gate_report.evaluate(
            recs,
            name,
            calibrate=calibrate,
            target_accuracy=target_accuracy,
            budget=budget,
            fit_fraction=fit_fraction,
            seed=seed,
        )
        report["plot"] = str(gate_report.plot(report, plot_path))
        if scorer is not None and not no_save:
            report["saved_to"] = str(confidence.save_user_scorer(name, scorer))
        if json_out:
            render.print_json(report)
        else:
            _render(report)


def _generate(
    evaluate, engine, items, max_tokens, max_tokens_math, records, quiet: bool
) -> list[dict]:
    with _bar("answering", len(items), quiet) as done:
        gen = evaluate.generate_records(
            engine, items, max_tokens, max_tokens_math, out=records, done=done
        )
        return list(gen)


@contextmanager
def _bar(what: str, total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; yields a callback taking the count done."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=render.err,
        disable=quiet,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.update(task, completed=n)


def _render(report: dict) -> None:
    from rich.table import Table

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    head = Table(title=f"edgeai eval · {report['model']}", show_header=True)
    for c in ("items", "accuracy", "AUROC (score)", "AUROC (length only)"):
        head.add_column(c, justify="right")
    base = (report.get("baseline_length") or {}).get("auroc")
    ci = report.get("auroc_ci95")
    auc = _f(report["auroc"]) + (f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci else "")
    head.add_row(str(report["items"]), pct(report["accuracy"]), auc, _f(base))
    render.out.print(head)
    if "split" in report:
        s = report["split"]
        render.out.print(
            f"held-out split: {s['held_out']} items (fitted on {s['fit']}, seed {s['seed']})"
        )
    kinds = Table(title="by kind")
    for c in ("kind", "items", "accuracy"):
        kinds.add_column(c, justify="right")
    for k, v in report["by_kind"].items():
        kinds.add_row(k, str(v["items"]), pct(v["accuracy"]))
    render.out.print(kinds)
    t = Table(title="per threshold (keep local when P(correct) ≥ threshold)")
    for c in ("threshold", "kept local", "accuracy kept", "accuracy escalated"):
        t.add_column(c, justify="right")
    for r in report["thresholds"]:
        t.add_row(
            f"{r['threshold']:.3f}",
            pct(r["kept_local"]),
            pct(r["kept_accuracy"]),
            pct(r["escalated_accuracy"]),
        )
    render.out.print(t)
    if report.get("estimators"):
        t = Table(title="estimators on the held-out split (threshold from the fit split)")
        for c in ("estimator", "AUROC", "kept local", "accuracy kept", "recall", "extra cost"):
            t.add_column(c, justify="right")
        for name, v in report["estimators"].items():
            if name == "best single signal":
                t.add_row(f"best single signal ({v['name']})", _f(v["auroc"]), "", "", "", "none")
                continue
            cost = f"{v['extra_ms']:.0f} ms" if v.get("extra_ms") else v["cost"]
            if "items" in v:  # scored on the held-out items that carry it
                name += f" ({v['items']} items; gate there {_f(v['shipped_auroc_same_items'])})"
            t.add_row(
                name,
                _f(v["auroc"]),
                pct(v["kept_local"]),
                pct(v["kept_accuracy"]),
                pct(v["recall"]),
                cost,
            )
        render.out.print(t)
    if report.get("by_dataset"):
        t = Table(title="per dataset, at the threshold")
        for c in ("dataset", "items", "accuracy", "AUROC", "kept local", "accuracy kept", "recall"):
            t.add_column(c, justify="right")
        for name, v in report["by_dataset"].items():
            t.add_row(
                name,
                str(v["items"]),
                pct(v["accuracy"]),
                _f(v["auroc"]),
                pct(v["kept_local"]),
                pct(v["kept_accuracy"]),
                pct(v["recall"]),
            )
        render.out.print(t)
    op = report.get("operating_point")
    if op:
        render.out.print(
            f"operating point: threshold {op['threshold']:.3f} keeps {pct(op['kept_local'])} local "
            f"({pct(op['answerable_kept_local'])} of answerable) "
            f"at {pct(op['kept_accuracy'])} accuracy, {pct(op.get('recall'))} of correct answers"
        )
    if report.get("verdict"):
        render.out.print(f"gate: {report['verdict']}", markup=False)
    if report.get("saved_to"):
        render.out.print(f"calibration saved to {report['saved_to']}", markup=False)
    render.err.print(f"[dim]plot: {render.esc(report['plot'])}[/]")


def _f(v) -> str:
    return "—" if v is None else f"{v:.3f}"
