"""Fit a model's confidence gate from eval records: token-signal regression, a hidden-state
probe stacked on it, and the threshold that keeps local answers accurate enough.

The probe (arXiv 2304.13734, 2406.15927): a logistic regression on one decoder layer's
hidden states at the prompt's end and the answer's end, read by the decode loop itself
(`edgeai.engine.hidden`), so it costs a slice per step rather than another forward pass.
The layer and the regularization are chosen by cross-validated AUROC on the fit split; the
probe's out-of-fold logit then joins the token signals as one more feature, so the final
regression weighs it against them without trusting its in-sample fit.

Fitting needs scikit-learn (the `eval` extra); run-time scoring is numpy only
(`edgeai.routing.confidence`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from edgeai.errors import InvalidInput
from edgeai.routing import confidence
from edgeai.routing.evaluate import answer_of, auroc, hidden_of

# (PCA components or 0 for none, C). Measured on Qwen2.5-Coder-1.5B eval records: a strongly
# regularized regression on the raw states beats PCA first (CV AUROC 0.80 vs 0.77).
PROBE_GRID = ((0, 0.0003), (0, 0.001), (0, 0.003), (64, 0.03))


def labels(records: Sequence[dict]) -> np.ndarray:
    return np.array([bool(r["correct"]) for r in records])


def features(
    records: Sequence[dict],
    names: Iterable[str] = confidence.FEATURES,
    probe: confidence.Probe | None = None,
    probe_values: np.ndarray | None = None,
) -> np.ndarray:
    """The signals `names` of each record; `probe` is the probe's logit on the record's hidden
    states, or `probe_values[i]` when given (out-of-fold logits while fitting)."""
    names = list(names)
    rows = []
    for i, r in enumerate(records):
        ans = answer_of(r)
        sig = confidence.signals(ans)
        if "probe" in names:
            if probe_values is not None:
                sig["probe"] = float(probe_values[i])
            else:
                assert probe is not None and ans.hidden is not None
                sig["probe"] = probe.logit(ans.hidden)
        rows.append([sig[n] for n in names])
    return np.asarray(rows, dtype=np.float64)


def _folds(y: np.ndarray, seed: int):
    from sklearn.model_selection import StratifiedKFold

    n = max(2, min(5, int(min(y.sum(), (~y).sum()))))
    # Shuffled folds: records arrive grouped by kind, and unshuffled folds would hide kinds.
    return StratifiedKFold(n, shuffle=True, random_state=seed)


def _check_both_classes(y: np.ndarray) -> None:
    if y.all() or not y.any():
        raise InvalidInput(
            "calibration needs both correct and wrong answers in the fit split",
            "use more (or more varied) questions",
        )


def fit_scorer(
    records: Sequence[dict],
    names: Iterable[str] = confidence.FEATURES,
    method: str = "platt",
    C: float | None = None,
    seed: int = 0,
    probe_values: np.ndarray | None = None,
) -> tuple[confidence.Scorer, np.ndarray]:
    """Logistic regression on standardized signals, then a calibration map fitted on
    out-of-fold logits (so the map does not learn the regression's own overfit).

    Returns:
        (the scorer, its calibrated out-of-fold P(correct) of each record: scores that did
        not see their own record, for choosing a threshold that holds on new questions)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict, cross_val_score

    names = list(names)
    X = features(records, names, probe_values=probe_values)
    y = labels(records)
    _check_both_classes(y)
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    Z = (X - mean) / scale
    cv = _folds(y, seed)
    if C is None and len(names) > 1:
        # Few positives overfit easily: choose the regularization by cross-validated AUROC.
        grid = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
        auc = [
            cross_val_score(
                LogisticRegression(C=c, max_iter=1000), Z, y, cv=cv, scoring="roc_auc"
            ).mean()
            for c in grid
        ]
        C = grid[int(np.argmax(auc))]
    lr = LogisticRegression(C=C or 1.0, max_iter=1000)
    oof = cross_val_predict(lr, Z, y, cv=cv, method="decision_function")
    lr.fit(Z, y)
    scorer = confidence.Scorer(
        features=names,
        mean=mean.tolist(),
        scale=scale.tolist(),
        coef=lr.coef_[0].tolist(),
        intercept=float(lr.intercept_[0]),
        calibration=_calibration(oof, y, method),
        meta={"C": C},
    )
    return scorer, scorer.calibrate(oof) + 1e-6 * (1 / (1 + np.exp(-oof)))


def _calibration(oof: np.ndarray, y: np.ndarray, method: str) -> dict[str, Any]:
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    if method == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(
            1 / (1 + np.exp(-oof)), y
        )
        return {
            "method": "isotonic",
            "x": [float(v) for v in iso.X_thresholds_],
            "y": [float(v) for v in iso.y_thresholds_],
        }
    if method == "platt":
        platt = LogisticRegression(C=1e6).fit(oof.reshape(-1, 1), y)
        a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
        # A calibration map must not reverse the ranking: a ≤ 0 means the fit has no signal.
        return {"method": "platt", "a": a, "b": b} if a > 0 else {"method": "none"}
    return {"method": "none"}


def scores_of(scorer: confidence.Scorer, records: Sequence[dict]) -> np.ndarray:
    """P(correct) of each record under `scorer` (its probe reads the records' hidden states)."""
    X = features(records, scorer.features, probe=scorer.probe)
    z = ((X - np.asarray(scorer.mean)) / np.asarray(scorer.scale)) @ np.asarray(
        scorer.coef
    ) + scorer.intercept
    # A tiny tie-break by the raw logit keeps isotonic plateaus ordered (AUROC, coverage).
    return scorer.calibrate(z) + 1e-6 * (1 / (1 + np.exp(-z)))


# -- the probe ----------------------------------------------------------------------------


def has_hidden(records: Sequence[dict]) -> bool:
    return bool(records) and all("hidden" in r for r in records)


def hidden_matrix(records: Sequence[dict], layers: Sequence[int]) -> np.ndarray:
    return np.stack([hidden_of(r).select(layers) for r in records])


def _probe_pipeline(k: int, C: float, n: int, width: int):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # A few hundred answers cannot fit thousands of free weights: strong L2 (small C), or PCA.
    steps = [StandardScaler()]
    if k:
        steps.append(PCA(min(k, n // 2, width), random_state=0))
    return make_pipeline(*steps, LogisticRegression(C=C, max_iter=3000))


def fit_probe(
    records: Sequence[dict], seed: int = 0
) -> tuple[confidence.Probe, np.ndarray, dict[str, Any]]:
    """The best single-layer probe by cross-validated AUROC on `records`.

    Returns:
        (the probe fitted on all of `records`, its out-of-fold logits on them, what was tried)
    """
    from sklearn.model_selection import cross_val_predict, cross_val_score

    y = labels(records)
    _check_both_classes(y)
    cv = _folds(y, seed)
    tried = []
    for layer in records[0]["hidden_layers"]:
        X = hidden_matrix(records, [layer])
        for k, C in PROBE_GRID:
            auc = cross_val_score(
                _probe_pipeline(k, C, len(y), X.shape[1]), X, y, cv=cv, scoring="roc_auc"
            ).mean()
            tried.append({"layer": layer, "components": k, "C": C, "cv_auroc": float(auc)})
    best = max(tried, key=lambda t: t["cv_auroc"])
    X = hidden_matrix(records, [best["layer"]])
    pipe = _probe_pipeline(best["components"], best["C"], len(y), X.shape[1])
    oof = cross_val_predict(pipe, X, y, cv=cv, method="decision_function")
    pipe.fit(X, y)
    # Eval records always include the last layer (depth 1.0): it tells the model's depth.
    n_layers = max(records[0]["hidden_layers"]) + 1
    return _fold(pipe, [best["layer"]], n_layers), oof, {"chosen": best, "tried": tried}


def _fold(pipe, layers: list[int], n_layers: int) -> confidence.Probe:
    """One weight vector and a bias equal to scaler → (PCA →) logistic regression."""
    scaler, lr = pipe.steps[0][1], pipe.steps[-1][1]
    direction = lr.coef_[0]  # in standardized space
    bias = float(lr.intercept_[0])
    if len(pipe.steps) == 3:
        pca = pipe.steps[1][1]
        bias -= float(pca.mean_ @ pca.components_.T @ direction)
        direction = pca.components_.T @ direction
    weights = direction / scaler.scale_
    bias -= float((scaler.mean_ / scaler.scale_) @ direction)
    return confidence.Probe(layers, weights.astype(np.float32), bias, n_layers)


def fit_gate(
    records: Sequence[dict],
    method: str = "platt",
    seed: int = 0,
    target_accuracy: float | None = None,
    budget: float | None = None,
) -> tuple[confidence.Scorer, dict[str, Any]]:
    """The scorer to ship, with its threshold: the probe stacked on the token signals when
    the records carry hidden states (with a token-signals-only fallback, thresholded too),
    else the token signals alone. Thresholds come from out-of-fold scores.

    Returns:
        (scorer, details: "oof" scores per estimator on `records`, the probe search)
    """
    y = labels(records)
    fallback, oof_tokens = fit_scorer(records, method=method, seed=seed)
    fallback.threshold = pick_threshold(oof_tokens, y, target_accuracy, budget)
    if not has_hidden(records):
        return fallback, {"oof": {"token signals": oof_tokens}}
    probe, oof_probe, search = fit_probe(records, seed)
    scorer, oof = fit_scorer(
        records, [*confidence.FEATURES, "probe"], method=method, seed=seed, probe_values=oof_probe
    )
    scorer.threshold = pick_threshold(oof, y, target_accuracy, budget)
    scorer.probe, scorer.fallback = probe, fallback
    return scorer, {
        "oof": {"token signals": oof_tokens, "probe": oof_probe, "probe + token signals": oof},
        "probe_search": search,
    }


# -- the operating point ------------------------------------------------------------------


MIN_KEPT = 10  # a threshold must keep at least this many fit answers: fewer is luck, not evidence
KEEP_NOTHING = 1.001  # above any P(correct): the threshold of a target no share reaches


def pick_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    target_accuracy: float | None = None,
    budget: float | None = None,
    min_kept: int = MIN_KEPT,
) -> float:
    """The lowest threshold whose kept answers (at least `min_kept` of them) reach
    `target_accuracy`, or the threshold that escalates at most `budget` (a share) of the
    questions. When no threshold reaches the target, one above every score: keep nothing."""
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=float)
    if budget is not None:
        return float(np.quantile(scores, budget)) if len(scores) else 0.5
    target = 0.9 if target_accuracy is None else target_accuracy
    best = KEEP_NOTHING
    for t in np.unique(scores)[::-1]:
        keep = scores >= t
        if keep.sum() >= min(min_kept, len(scores)) and labels[keep].mean() >= target:
            best = float(t)
    return best


def split(records: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified by source file, item kind and correctness, so both halves see every kind."""
    rng = random.Random(seed)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["source"].split(":")[0], r["kind"], bool(r["correct"]))
        groups.setdefault(key, []).append(r)
    fit, held = [], []
    for g in groups.values():
        rng.shuffle(g)
        k = int(round(len(g) * fraction))
        fit += g[:k]
        held += g[k:]
    return fit, held


def oriented_single_signals(fit: Sequence[dict], held: Sequence[dict]) -> dict[str, float | None]:
    """Held-out AUROC of each token signal alone, its direction taken from the fit split."""
    Xf, Xh = features(fit), features(held)
    yf, yh = labels(fit), labels(held)
    out = {}
    for j, name in enumerate(confidence.FEATURES):
        a = auroc(Xf[:, j], yf)
        sign = -1.0 if a is not None and a < 0.5 else 1.0
        out[name] = auroc(sign * Xh[:, j], yh)
    return out
