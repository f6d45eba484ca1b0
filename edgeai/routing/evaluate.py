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

import base64
import json
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeai.engine.hidden import States, layer_index
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
        return Item(q, "number", [number_in(ans.split("####")[-1]) or ans], src)
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


def number_in(s: str) -> str | None:
    """The last number in `s`, without thousands separators or a trailing ".0"."""
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
        return number_in(text) == item.gold[0]
    if item.kind == "choice":
        m = re.search(r"\b([A-J])\b", text)
        return bool(m) and m.group(1) == item.gold[0]
    ans = f" {normalize(text)} "
    return any(g and f" {g} " in ans for g in (normalize(a) for a in item.gold))


# -- generation ---------------------------------------------------------------------------


# Decoder layers whose hidden states eval records (depth fractions), for the probe to choose
# from: the middle-to-upper layers carry the most of what a model "knows" (SAPLMA, SEP).
PROBE_DEPTHS = (0.5, 0.625, 0.75, 0.875, 1.0)


def probe_layers(n_layers: int) -> list[int]:
    return sorted({layer_index(f, n_layers) for f in PROBE_DEPTHS})


def record(item: Item, answer: Answer) -> dict[str, Any]:
    """A JSON-able record of one generation, enough to recompute every signal (and the
    probe's input: the tapped layers' hidden states, float16, base64)."""
    rec = {
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
        "seconds": round(answer.stats.prompt_seconds + answer.stats.generation_seconds, 4),
        "correct": is_correct(item, answer.text),
    }
    if item.choices:
        rec["choices"] = item.choices
    if answer.hidden is not None:
        rec["hidden_layers"] = list(answer.hidden.layers)
        rec["hidden"] = base64.b64encode(answer.hidden.values.astype(np.float16).tobytes()).decode()
    return rec


def hidden_of(rec: dict[str, Any]) -> States | None:
    """A record's hidden states (None if it has none)."""
    if "hidden" not in rec:
        return None
    try:
        layers = [int(i) for i in rec["hidden_layers"]]
        raw = base64.b64decode(rec["hidden"], validate=True)
        h = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        return States(layers, h.reshape(2, len(layers), -1))
    except (KeyError, TypeError, ValueError) as e:  # binascii.Error is a ValueError
        raise InvalidInput(
            f"the record of {rec.get('question', '?')!r} has unreadable hidden states ({e})",
            "regenerate it: delete the line and run `edgeai eval` again",
        ) from None


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
        hidden=hidden_of(rec),
    )


def answer_options(
    item: Item, max_tokens: int, max_tokens_math: int, **sampling: Any
) -> GenerationOptions:
    """How an eval question is answered (greedy unless `sampling` says otherwise)."""
    n = max_tokens_math if item.kind == "number" else max_tokens
    # Short answers end at the first line break; maths needs several lines.
    stop = [] if item.kind == "number" else ["\n"]
    return GenerationOptions(max_tokens=n, stop=stop, **{"temperature": 0.0, **sampling})


def item_of(rec: dict[str, Any]) -> Item:
    """The question a record answered."""
    return Item(
        rec["question"], rec["kind"], list(rec["gold"]), rec["source"], rec.get("choices", [])
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
    seen = {r["question"]: r for r in load_records(out)} if out and out.exists() else {}
    layers = probe_layers(engine.layer_count)
    engine.tap_hidden(layers)
    fh = out.open("a") if out is not None else None
    try:
        for i, item in enumerate(items):
            if item.question in seen:
                rec = seen[item.question]
            else:
                opts = answer_options(item, max_tokens, max_tokens_math, top_logprobs=5)
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


# What calibration reads of a record (`record` writes these and more).
RECORD_KEYS = (
    "question",
    "kind",
    "source",
    "text",
    "finish_reason",
    "tokens",
    "logprobs",
    "entropies",
    "top_logprobs",
    "correct",
)


def load_records(path: str | Path) -> list[dict]:
    """The records in a file, one per question (a question written twice keeps its last).

    Raises:
        InvalidInput: a line that is not JSON, or not a record `edgeai eval` wrote.
    """
    path = Path(path)
    hint = "give a --records file written by `edgeai eval`"
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}, line {n}: not JSON ({e.msg})", hint) from None
        missing = [k for k in RECORD_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise InvalidInput(f"{path}, line {n}: not an eval record (no {missing[0]!r})", hint)
        recs.append(rec)
    return list({r["question"]: r for r in recs}.values())


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
