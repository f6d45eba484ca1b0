"""Estimators that ask the model again, for `edgeai eval` to weigh against the shipped gate.

- P(True) self-evaluation (Kadavath et al. 2022, arXiv 2207.05221): the model is shown the
  question and its own answer and asked whether it is correct; the score is the probability
  it puts on "Yes" against "No" for the first token. One more pass over question + answer.
- Sample agreement (self-consistency; SelfCheckGPT, arXiv 2303.08896; the lexical-similarity
  baseline of arXiv 2305.19187): k answers sampled from the same prompt; the score is their
  mean word-overlap F1 with the greedy answer. k more generations.

Both cost whole extra passes, which is why the shipped gate reads the hidden-state probe
from the answer's own decode steps instead; `edgeai eval --p-true / --samples K` measures
what they would buy.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeai.options import GenerationOptions
from edgeai.routing.evaluate import answer_options, item_of, load_records, normalize, number_in

ASK = (
    "Question: {question}\nProposed answer: {answer}\n"
    "Is the proposed answer correct? Reply with Yes or No only."
)
# Below 1: at 1 a small model's samples wander off even when its greedy answer is right.
SAMPLE_TEMPERATURE = 0.7


YES, NO = ("yes", "true"), ("no", "false")


def p_true(
    engine: Any, question: str, answer: str, yes: Sequence[str] = YES, no: Sequence[str] = NO
) -> float:
    """P("Yes") / (P("Yes") + P("No")) for the model judging `answer` to `question`: the
    first token's top-20 alternatives, a token counting as the word it spells (any case)."""
    msgs = [{"role": "user", "content": ASK.format(question=question, answer=answer.strip())}]
    opts = GenerationOptions(max_tokens=1, temperature=0.0, top_logprobs=20)
    p_yes = p_no = 0.0
    for ev in engine.generate(msgs, opts):
        for tok, lp in ev.top_logprobs:
            word = engine.tokenizer.decode([tok]).strip().lower()
            if word in yes:
                p_yes += math.exp(lp)
            elif word in no:
                p_no += math.exp(lp)
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5


def similarity(a: str, b: str, kind: str) -> float:
    """How far two answers to one question say the same, 0–1: for maths whether the last
    numbers are equal; else the word-overlap F1 of the normalized answers (SQuAD's), which
    credits "Las Vegas" = "It is in Las Vegas, Nevada" in part, where exact match would not."""
    if kind == "number":
        n = number_in(a)
        return float(n is not None and n == number_in(b))
    x, y = normalize(a).split(), normalize(b).split()
    if not x or not y:
        return float(x == y)
    common = sum((Counter(x) & Counter(y)).values())
    if not common:
        return 0.0
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


def sample_agreement(
    engine: Any, record: dict, k: int, max_tokens: int, max_tokens_math: int
) -> float:
    """Mean `similarity` of `k` answers sampled (seeds 0…k−1) to the record's greedy answer."""
    item = item_of(record)
    total = 0.0
    for seed in range(k):
        opts = answer_options(
            item, max_tokens, max_tokens_math, temperature=SAMPLE_TEMPERATURE, seed=seed
        )
        text = "".join(ev.text for ev in engine.generate(item.messages(), opts))
        total += similarity(text, record["text"], item.kind)
    return total / k


def add_estimate(
    records: Sequence[dict],
    key: str,
    estimate: Callable[[dict], float],
    path: Path | None = None,
    done: Callable[[int], None] | None = None,
) -> list[dict]:
    """Give each record `key` = estimate(record) and `{key}_seconds` (records that have them
    keep them); rewrite `path` with them every 50 records and at the end (atomically), so an
    interrupted run loses little and resumes."""
    out = []
    for i, r in enumerate(records):
        if key not in r:
            t0 = time.perf_counter()
            r = {**r, key: estimate(r)}
            r[f"{key}_seconds"] = round(time.perf_counter() - t0, 4)
        out.append(r)
        if done is not None:
            done(i + 1)
        if path is not None and (i % 50 == 49 or i == len(records) - 1):
            _write(path, out + list(records[i + 1 :]))
    return out


def _write(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """`records` into the file at `path`, by question: the file's other records stay."""
    mine = {r["question"]: r for r in records}
    kept = [mine.pop(r["question"], r) for r in load_records(path)] if path.exists() else []
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in [*kept, *mine.values()]))
    os.replace(tmp, path)
