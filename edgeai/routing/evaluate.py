"""Run the local model over questions with gold answers; judge and calibrate the confidence score.

Data files (one or more, mixed freely):

- JSONL, one item per line: `{"question", "answer"}` where `answer` is a list of aliases
  (NQ-open), a string whose final number follows `####` (GSM8K), or a letter with
  `"choices": [...]` (multiple choice); `"answer": null` or `"answerable": false` marks an
  unanswerable item (correct only if the model abstains).
- SelfAware-style JSON: `{"example": [{"question", "answer", "answerable"}, …]}`.

Labels: alias match after normalising case, punctuation and articles (an alias counts when it
appears as a whole phrase in the answer — generative models answer in sentences); last number
for GSM8K; first standalone letter for multiple choice; abstention for unanswerable items.

Each generation is saved as a *record* (question, gold, text, finish reason, per-token
logprobs/entropies/top-logprobs, correct) in a JSONL file so that calibration can be refit
without regenerating. Fitting uses scikit-learn; run-time scoring only numpy
(`edgeai.routing.confidence.Scorer`).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeai.errors import InvalidInput
from edgeai.options import GenerationOptions
from edgeai.routing import confidence
from edgeai.types import Answer, Stats

SYSTEM = "Answer in a few words. If nobody can know, say you don't know."
SYSTEM_MATH = "Solve the problem. Finish with 'The answer is N'."
SYSTEM_CHOICE = "Answer with the letter of the correct choice."


@dataclass
class Item:
    """One question with its gold answer.

    Attributes:
        question: the question text.
        kind: "alias", "number", "choice" or "unanswerable".
        gold: aliases, the number, or the letter (empty when unanswerable).
        source: the file (and sub-source) it came from.
        choices: multiple-choice options, if any.
    """

    question: str
    kind: str
    gold: list[str]
    source: str
    choices: list[str] = field(default_factory=list)

    def messages(self) -> list[dict]:
        if self.kind == "number":
            system = SYSTEM_MATH
        elif self.kind == "choice":
            system = SYSTEM_CHOICE
        else:
            system = SYSTEM
        q = self.question
        if self.choices:
            q += "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(self.choices))
        return [{"role": "system", "content": system}, {"role": "user", "content": q}]


# -- loading ------------------------------------------------------------------------------


def load_items(path: str | Path) -> list[Item]:
    """Items from a JSONL file (NQ / GSM8K / multiple choice / unanswerable) or SelfAware JSON."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(
            f"no such data file: {path}", "give a .jsonl file of {question, answer} items"
        )
    text = path.read_text()
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
            rows = doc["example"] if isinstance(doc, dict) else doc
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InvalidInput(
            f"{path} is not a JSONL/JSON file of questions: {e}", "see `edgeai eval --help`"
        ) from e
    items = [_item(r, path.stem) for r in rows]
    if not items:
        raise InvalidInput(f"{path} has no questions")
    return items


def _item(r: dict, source: str) -> Item:
    if "question" not in r:
        raise InvalidInput(
            f"an item in {source} has no 'question' field", "each item needs question and answer"
        )
    q, ans = str(r["question"]), r.get("answer")
    src = f"{source}:{r['source']}" if r.get("source") else source
    if ans is None or r.get("answerable") is False:
        return Item(q, "unanswerable", [], src)
    if r.get("choices"):
        return Item(
            q, "choice", [str(ans).strip().upper()[:1]], src, [str(c) for c in r["choices"]]
        )
    if isinstance(ans, list):
        return Item(q, "alias", [str(a) for a in ans], src)
    ans = str(ans)
    if "####" in ans:
        return Item(q, "number", [_number(ans.split("####")[-1]) or ans], src)
    return Item(q, "alias", [ans], src)


def mix(files: Iterable[str | Path], limit: int | None, seed: int = 0) -> list[Item]:
    """Up to `limit` items per file, sampled with a fixed seed, interleaved."""
    rng = random.Random(seed)
    out: list[Item] = []
    for f in files:
        items = load_items(f)
        if limit and len(items) > limit:
            items = rng.sample(items, limit)
        out.extend(items)
    rng.shuffle(out)
    return out


# -- labelling ----------------------------------------------------------------------------


def normalize(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (NQ-open / SQuAD style)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _number(s: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", s)
    if not nums:
        return None
    n = nums[-1].replace(",", "").rstrip(".")
    return n[:-2] if n.endswith(".0") else n


def is_correct(item: Item, text: str) -> bool:
    """Whether `text` answers `item` correctly (see the module docstring)."""
    if item.kind == "unanswerable":
        sig = confidence.signals(Answer(text=text, model=""))
        return bool(sig["idk"] or sig["refusal"])
    if item.kind == "number":
        return _number(text) == item.gold[0]
    if item.kind == "choice":
        m = re.search(r"\b([A-J])\b", text)
        return bool(m) and m.group(1) == item.gold[0]
    ans = f" {normalize(text)} "
    return any(g and f" {g} " in ans for g in (normalize(a) for a in item.gold))


# -- generation ---------------------------------------------------------------------------


def record(item: Item, answer: Answer) -> dict[str, Any]:
    """A JSON-able record of one generation, enough to recompute every signal."""
    return {
        "question": item.question,
        "kind": item.kind,
        "gold": item.gold,
        "source": item.source,
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "tokens": answer.tokens,
        "logprobs": answer.logprobs,
        "entropies": answer.entropies,
        "top_logprobs": [list(map(list, t)) for t in answer.top_logprobs],
        "generation_tokens": answer.stats.generation_tokens,
        "correct": is_correct(item, answer.text),
    }


def answer_of(rec: dict[str, Any]) -> Answer:
    """Rebuild the Answer a record was made from (for signals)."""
    return Answer(
        text=rec["text"],
        model="",
        finish_reason=rec["finish_reason"],
        tokens=rec["tokens"],
        logprobs=rec["logprobs"],
        entropies=rec["entropies"],
        top_logprobs=[tuple(tuple(p) for p in t) for t in rec["top_logprobs"]],
        stats=Stats(generation_tokens=rec.get("generation_tokens", len(rec["tokens"]))),
    )


def generate_records(
    engine,
    items: list[Item],
    max_tokens: int,
    max_tokens_math: int,
    out: Path | None = None,
    done: Callable[[int], None] | None = None,
) -> Iterator[dict]:
    """Generate (greedy, top-5 logprobs) for each item; append each record to `out` as made.

    Records already in `out` for the same question are reused, so an interrupted run resumes.
    """
    seen: dict[str, dict] = {}
    if out is not None and out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                seen[r["question"]] = r
    fh = out.open("a") if out is not None else None
    try:
        for i, item in enumerate(items):
            if item.question in seen:
                rec = seen[item.question]
            else:
                n = max_tokens_math if item.kind == "number" else max_tokens
                # Short answers end at the first line break; maths needs several lines.
                stop = [] if item.kind == "number" else ["\n"]
                opts = GenerationOptions(max_tokens=n, temperature=0.0, top_logprobs=5, stop=stop)
                ans = Answer.from_events(engine.generate(item.messages(), opts), engine.name)
                rec = record(item, ans)
                if fh is not None:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
            if done is not None:
                done(i + 1)
            yield rec
    finally:
        if fh is not None:
            fh.close()


def load_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# -- metrics ------------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for `labels` (None when only one class)."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def auroc_ci(
    scores: np.ndarray, labels: np.ndarray, n: int = 300, seed: int = 0
) -> list[float] | None:
    """95% bootstrap interval of the AUROC (small eval sets make it wide; say so)."""
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(scores), len(scores))
        a = auroc(scores[i], labels[i])
        if a is not None:
            vals.append(a)
    return (
        [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]
        if len(vals) > 20
        else None
    )


def risk_coverage(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (share kept, most confident first) and accuracy of what is kept."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept = np.asarray(labels, dtype=float)[order]
    n = np.arange(1, len(kept) + 1)
    return n / len(kept), np.cumsum(kept) / n


def threshold_table(
    scores: np.ndarray, labels: np.ndarray, thresholds: Iterable[float]
) -> list[dict]:
    """For each threshold: share kept local (score ≥ t), accuracy of kept, of escalated."""
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=bool)
    rows = []
    for t in thresholds:
        keep = scores >= t
        rows.append(
            {
                "threshold": round(float(t), 4),
                "kept_local": float(keep.mean()) if len(keep) else 0.0,
                "kept_accuracy": float(labels[keep].mean()) if keep.any() else None,
                "escalated_accuracy": float(labels[~keep].mean()) if (~keep).any() else None,
            }
        )
    return rows


def features(records: list[dict], names: Iterable[str] = confidence.FEATURES) -> np.ndarray:
    names = list(names)
    rows = []
    for r in records:
        sig = confidence.signals(answer_of(r))
        rows.append([sig[n] for n in names])
    return np.asarray(rows, dtype=np.float64)


def fit_scorer(
    records: list[dict],
    names: Iterable[str] = confidence.FEATURES,
    method: str = "platt",
    C: float | None = None,
    seed: int = 0,
) -> confidence.Scorer:
    """Logistic regression on standardized signals, then a calibration map fitted on
    out-of-fold logits (so the map does not learn the regression's own overfit)."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    names = list(names)
    X = features(records, names)
    y = np.array([bool(r["correct"]) for r in records])
    if y.all() or not y.any():
        raise InvalidInput(
            "calibration needs both correct and wrong answers in the fit split",
            "use more (or more varied) questions",
        )
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    Z = (X - mean) / scale
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = max(2, min(5, int(min(y.sum(), (~y).sum()))))
    # Shuffled folds: records arrive grouped by kind, and unshuffled folds would hide whole kinds.
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
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
    if method == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(
            1 / (1 + np.exp(-oof)), y
        )
        cal = {
            "method": "isotonic",
            "x": [float(v) for v in iso.X_thresholds_],
            "y": [float(v) for v in iso.y_thresholds_],
        }
    elif method == "platt":
        platt = LogisticRegression(C=1e6).fit(oof.reshape(-1, 1), y)
        a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
        # A calibration map must not reverse the ranking: a ≤ 0 means the fit has no signal.
        cal = {"method": "platt", "a": a, "b": b} if a > 0 else {"method": "none"}
    else:
        cal = {"method": "none"}
    return confidence.Scorer(
        features=names,
        mean=mean.tolist(),
        scale=scale.tolist(),
        coef=lr.coef_[0].tolist(),
        intercept=float(lr.intercept_[0]),
        calibration=cal,
        meta={"C": C},
    )


def scores_of(scorer: confidence.Scorer, records: list[dict]) -> np.ndarray:
    X = features(records, scorer.features)
    z = ((X - np.asarray(scorer.mean)) / np.asarray(scorer.scale)) @ np.asarray(
        scorer.coef
    ) + scorer.intercept
    # A tiny tie-break by the raw logit keeps isotonic plateaus ordered (AUROC, coverage).
    return scorer.calibrate(z) + 1e-6 * (1 / (1 + np.exp(-z)))


def pick_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    target_accuracy: float | None = None,
    budget: float | None = None,
) -> float:
    """The lowest threshold whose kept answers reach `target_accuracy`, or the threshold that
    escalates at most `budget` (a share) of the questions."""
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=float)
    if budget is not None:
        return float(np.quantile(scores, budget)) if len(scores) else 0.5
    target = 0.9 if target_accuracy is None else target_accuracy
    best = float(scores.max()) + 1e-9 if len(scores) else 1.0  # keep nothing if unreachable
    for t in np.unique(scores)[::-1]:
        keep = scores >= t
        if labels[keep].mean() >= target:
            best = float(t)
    return best


def split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified by item kind and correctness, so both halves see every kind."""
    rng = random.Random(seed)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["kind"], bool(r["correct"])), []).append(r)
    fit, held = [], []
    for g in groups.values():
        rng.shuffle(g)
        k = int(round(len(g) * fraction))
        fit += g[:k]
        held += g[k:]
    return fit, held


def summarize(
    records: list[dict],
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
        keep = scores >= threshold
        out["operating_point"] = {
            "threshold": float(threshold),
            "kept_local": float(keep.mean()),
            "kept_accuracy": float(y[keep].mean()) if keep.any() else None,
            "answerable_kept_local": float(keep[answerable].mean()) if answerable.any() else None,
        }
    return out


# -- the whole evaluation -----------------------------------------------------------------


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
    if calibrate:
        fit, held = split(records, fit_fraction, seed)
        scorer = fit_scorer(fit, method=method, seed=seed)
        fit_scores = scores_of(scorer, fit)
        scorer.threshold = pick_threshold(
            fit_scores, [r["correct"] for r in fit], target_accuracy, budget
        )
        base = fit_scorer(fit, names=["log_len"], method="none")
        report = summarize(held, scores_of(scorer, held), scorer.threshold, scores_of(base, held))
        report["fit"] = summarize(fit, fit_scores, scorer.threshold)
        for k in ("risk_coverage", "thresholds"):
            report["fit"].pop(k)
        report["split"] = {"fit": len(fit), "held_out": len(held), "seed": seed}
        scorer.meta = {
            **scorer.meta,
            "model": model,
            "items": len(records),
            "fit_items": len(fit),
            "target": {"accuracy": target_accuracy}
            if budget is None
            else {"escalation_budget": budget},
            "held_out": {k: report.get(k) for k in ("auroc", "accuracy", "operating_point")},
            "baseline_length_auroc": report["baseline_length"]["auroc"],
        }
    else:
        scorer_now = confidence.load_scorer(model)
        base = np.array([-confidence.signals(answer_of(r))["log_len"] for r in records])
        report = summarize(records, scores_of(scorer_now, records), scorer_now.threshold, base)
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
