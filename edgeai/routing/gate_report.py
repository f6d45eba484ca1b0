"""The whole evaluation of a confidence gate: judge the scorer in force on eval records, or
fit a new one on a split and report the held-out half — per estimator (with its cost), per
dataset, the operating point in plain words — and plot it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeai.routing import calibrate as cal
from edgeai.routing import confidence
from edgeai.routing.evaluate import answer_of, auroc, auroc_ci, risk_coverage, threshold_table

# What each estimator adds to an answer's cost (measured: benchmarks/bench_gate.py).
COST = {
    "token signals": "none: read from the answer's own tokens",
    "probe": "a slice of one layer's output per step, one dot product per answer",
    "probe + token signals": "as the probe",
    "P(True)": "one more pass over question + answer",
    "sample agreement": "k more answers, sampled",
}
# Estimators that ask the model again (`edgeai.routing.selfcheck`): the record field each fills.
EXTRA = {"P(True)": "p_true", "sample agreement": "agreement"}
MIN_COMPARED = 20  # held-out items an extra estimator needs before its AUROC is reported


def summarize(
    records: Sequence[dict],
    scores: np.ndarray,
    threshold: float | None,
    baseline: np.ndarray | None = None,
) -> dict:
    """Accuracy, AUROC, risk–coverage, per-threshold table and the operating point."""
    y = np.array([bool(r["correct"]) for r in records])
    answerable = np.array([r["kind"] != "unanswerable" for r in records])
    cov, acc = risk_coverage(scores, y)
    out: dict[str, Any] = {
        "items": len(records),
        "accuracy": float(y.mean()) if len(y) else None,
        "auroc": auroc(scores, y),
        "auroc_ci95": auroc_ci(scores, y),
        "auroc_answerable": auroc(np.asarray(scores)[answerable], y[answerable]),
        "by_kind": {
            k: {
                "items": int(sum(r["kind"] == k for r in records)),
                "accuracy": float(np.mean([r["correct"] for r in records if r["kind"] == k])),
            }
            for k in sorted({r["kind"] for r in records})
        },
        "risk_coverage": {"coverage": cov.round(4).tolist(), "accuracy": acc.round(4).tolist()},
        # Thresholds at coverage steps: calibrated scores of a weak model crowd near its accuracy.
        "thresholds": threshold_table(
            scores,
            y,
            sorted({float(np.quantile(scores, q)) for q in np.linspace(0, 0.95, 20)}, reverse=True),
        ),
    }
    if baseline is not None:
        bcov, bacc = risk_coverage(baseline, y)
        out["baseline_length"] = {
            "auroc": auroc(baseline, y),
            "risk_coverage": {
                "coverage": bcov.round(4).tolist(),
                "accuracy": bacc.round(4).tolist(),
            },
        }
    if threshold is not None:
        out["operating_point"] = operating_point(scores, y, threshold, answerable)
    return out


def operating_point(
    scores: np.ndarray, y: np.ndarray, threshold: float, answerable: np.ndarray | None = None
) -> dict[str, Any]:
    """What a threshold does: share kept local, their accuracy (precision), and the share of
    the correct answers it keeps (recall)."""
    scores, y = np.asarray(scores), np.asarray(y, dtype=bool)
    keep = scores >= threshold
    return {
        "threshold": float(threshold),
        "kept_local": float(keep.mean()) if len(keep) else 0.0,
        "kept_accuracy": float(y[keep].mean()) if keep.any() else None,
        "recall": float(keep[y].mean()) if y.any() else None,
        "answerable_kept_local": float(keep[answerable].mean())
        if answerable is not None and answerable.any()
        else None,
    }


# -- the whole evaluation -----------------------------------------------------------------


def verdict(op: dict[str, Any] | None, target: float, model: str) -> str:
    """The operating point in words; says plainly when the target cannot be met."""
    if not op or not op.get("kept_local"):
        return (
            f"{model} keeps 0% local at {target:.0%} accuracy: its confidence never reaches "
            "that target; use a bigger model or lower the target (--target-accuracy)"
        )
    return (
        f"keeps {op['kept_local']:.0%} of questions local at {op['kept_accuracy']:.0%} accuracy "
        f"(target {target:.0%}), {op['recall']:.0%} of its correct answers"
    )


def by_dataset(records: Sequence[dict], scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per source file: items, accuracy, AUROC and the operating point."""
    out = {}
    srcs = np.array([r["source"].split(":")[0] for r in records])
    y = cal.labels(records)
    for s in sorted(set(srcs)):
        m = srcs == s
        out[s] = {
            "items": int(m.sum()),
            "accuracy": float(y[m].mean()),
            "auroc": auroc(scores[m], y[m]),
            **operating_point(scores[m], y[m], threshold),
        }
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def estimators(
    fit: Sequence[dict],
    held: Sequence[dict],
    scorer: confidence.Scorer,
    details: dict[str, Any],
    target_accuracy: float | None,
    budget: float | None,
) -> dict[str, Any]:
    """Every estimator on the same held-out items: AUROC, its threshold (from its own
    out-of-fold fit scores) and what that threshold keeps; the best single token signal."""
    y_fit, y = cal.labels(fit), cal.labels(held)
    singles = cal.oriented_single_signals(fit, held)
    best = max((k for k in singles if singles[k] is not None), key=lambda k: singles[k])
    out: dict[str, Any] = {"best single signal": {"name": best, "auroc": singles[best]}}
    held_scores: dict[str, np.ndarray] = {}
    if scorer.probe is not None:
        tokens = scorer.fallback or scorer
        held_scores["token signals"] = cal.scores_of(tokens, held)
        held_scores["probe"] = _sigmoid([scorer.probe.logit(answer_of(r).hidden) for r in held])
        held_scores["probe + token signals"] = cal.scores_of(scorer, held)
    else:
        held_scores["token signals"] = cal.scores_of(scorer, held)
    fit_scores = dict(details["oof"])
    if "probe" in fit_scores:
        fit_scores["probe"] = _sigmoid(fit_scores["probe"])
    for name, scores in held_scores.items():
        t = cal.pick_threshold(fit_scores[name], y_fit, target_accuracy, budget)
        out[name] = {
            "auroc": auroc(scores, y),
            "auroc_ci95": auroc_ci(scores, y),
            "cost": COST[name],
            **operating_point(scores, y, t),
        }
    shipped = held_scores["probe + token signals" if scorer.probe else "token signals"]
    for name, key in EXTRA.items():
        if (extra := _extra(name, key, fit, held, shipped, target_accuracy, budget)) is not None:
            out[name] = extra
    return out


def _extra(
    name: str,
    key: str,
    fit: Sequence[dict],
    held: Sequence[dict],
    shipped: np.ndarray,
    target_accuracy: float | None,
    budget: float | None,
) -> dict[str, Any] | None:
    """An estimator that only some records may carry (it costs whole passes): scored on the
    held-out items that have it, beside the shipped scorer on those same items."""
    have = np.array([key in r for r in held])
    y = cal.labels(held)[have]
    if have.sum() < MIN_COMPARED or y.all() or not y.any():
        return None
    scores = np.array([r[key] for r in held if key in r])
    fit_have = [r for r in fit if key in r]
    fit_scores = np.array([r[key] for r in fit_have])
    # Without fit items of its own it gets no threshold: keep nothing rather than guess one.
    t = (
        cal.pick_threshold(fit_scores, cal.labels(fit_have), target_accuracy, budget)
        if fit_have
        else cal.KEEP_NOTHING
    )
    seconds = [r[f"{key}_seconds"] for r in held if f"{key}_seconds" in r]
    return {
        "auroc": auroc(scores, y),
        "auroc_ci95": auroc_ci(scores, y),
        "cost": COST[name],
        "extra_ms": round(1000 * float(np.mean(seconds)), 1) if seconds else None,
        "items": int(have.sum()),
        "shipped_auroc_same_items": auroc(shipped[have], y),
        **operating_point(scores, y, t),
    }


def evaluate(
    records: list[dict],
    model: str,
    *,
    calibrate: bool = False,
    target_accuracy: float | None = None,
    budget: float | None = None,
    fit_fraction: float = 0.5,
    seed: int = 0,
    method: str = "platt",
) -> tuple[dict, confidence.Scorer | None]:
    """Judge the model's current scorer on `records`; with `calibrate`, fit a new one on a
    split, pick its threshold there, and report on the held-out rest.

    Returns:
        (report dict, the fitted scorer or None).
    """
    target = 0.9 if target_accuracy is None else target_accuracy
    if calibrate:
        fit, held = cal.split(records, fit_fraction, seed)
        scorer, details = cal.fit_gate(fit, method, seed, target_accuracy, budget)
        scores = cal.scores_of(scorer, held)
        base, _ = cal.fit_scorer(fit, names=["log_len"], method="none")
        report = summarize(held, scores, scorer.threshold, cal.scores_of(base, held))
        report["estimators"] = estimators(fit, held, scorer, details, target_accuracy, budget)
        report["by_dataset"] = by_dataset(held, scores, scorer.threshold)
        if "probe_search" in details:
            report["probe"] = details["probe_search"]["chosen"]
        fit_oof = details["oof"]["probe + token signals" if scorer.probe else "token signals"]
        report["fit"] = summarize(fit, fit_oof, scorer.threshold)
        for k in ("risk_coverage", "thresholds"):
            report["fit"].pop(k)
        report["split"] = {"fit": len(fit), "held_out": len(held), "seed": seed}
        report["verdict"] = verdict(report["operating_point"], target, model)
        scorer.meta = {
            **scorer.meta,
            "model": model,
            "items": len(records),
            "fit_items": len(fit),
            "estimator": "probe + token signals" if scorer.probe else "token signals",
            "target": {"accuracy": target_accuracy}
            if budget is None
            else {"escalation_budget": budget},
            "held_out": {
                "auroc": report["auroc"],
                "accuracy": report["accuracy"],
                "operating_point": report["operating_point"],
                "by_dataset": {
                    k: {f: v[f] for f in ("items", "accuracy", "auroc", "kept_local")}
                    for k, v in report["by_dataset"].items()
                },
                "estimators": {k: v.get("auroc") for k, v in report["estimators"].items()},
                "best_single_signal": report["estimators"]["best single signal"],
            },
            "verdict": report["verdict"],
            "baseline_length_auroc": report["baseline_length"]["auroc"],
        }
    else:
        # Records of one eval run all carry the same hidden states (or none): the first one
        # says whether the probe can read them, as it does for a live answer.
        used = confidence.load_scorer(model).for_answer(answer_of(records[0]))
        scores = cal.scores_of(used, records)
        base = np.array([-confidence.signals(answer_of(r))["log_len"] for r in records])
        report = summarize(records, scores, used.threshold, base)
        report["by_dataset"] = by_dataset(records, scores, used.threshold)
        report["verdict"] = verdict(report.get("operating_point"), target, model)
        scorer = None
    report["model"] = model
    report["target"] = (
        {"accuracy": target_accuracy} if budget is None else {"escalation_budget": budget}
    )
    return report, scorer


def plot(report: dict, path: str | Path) -> Path:
    """Risk–coverage (score vs length-only baseline) and kept share/accuracy per threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    rc = report["risk_coverage"]
    a.plot(rc["coverage"], rc["accuracy"], label=f"confidence (AUROC {_fmt(report['auroc'])})")
    if "baseline_length" in report:
        bl = report["baseline_length"]
        a.plot(
            bl["risk_coverage"]["coverage"],
            bl["risk_coverage"]["accuracy"],
            "--",
            label=f"length only (AUROC {_fmt(bl['auroc'])})",
        )
    op = report.get("operating_point")
    if op and op.get("kept_accuracy") is not None:
        a.plot(
            [op["kept_local"]], [op["kept_accuracy"]], "o", label=f"threshold {op['threshold']:.2f}"
        )
    a.set(
        xlabel="share kept local (coverage)",
        ylabel="accuracy of kept answers",
        title="risk–coverage",
        ylim=(0, 1.02),
    )
    a.legend(loc="upper right", fontsize=8)
    t = report["thresholds"]
    xs = [r["threshold"] for r in t]
    b.plot(xs, [r["kept_local"] for r in t], label="share kept local")
    b.plot(
        xs,
        [r["kept_accuracy"] if r["kept_accuracy"] is not None else np.nan for r in t],
        label="accuracy of kept",
    )
    b.set(xlabel="threshold on P(correct)", title="per threshold", ylim=(0, 1.02))
    b.legend(fontsize=8)
    fig.suptitle(f"edgeai eval · {report.get('model', '')} · {report['items']} items")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
