"""P(True) self-evaluation (Kadavath et al. 2022, arXiv 2207.05221), as an eval estimator.

The model is shown the question and its own answer and asked whether the answer is
correct; P(True) is the probability it puts on "Yes" against "No" for the first token.
It costs one more pass over question + answer per answer, which is why the shipped gate
uses the hidden-state probe instead (`edgeai eval --p-true` compares them).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeai.options import GenerationOptions

ASK = (
    "Question: {question}\nProposed answer: {answer}\n"
    "Is the proposed answer correct? Reply with Yes or No only."
)


def p_true(engine: Any, question: str, answer: str) -> float:
    """P("Yes") / (P("Yes") + P("No")) for the model judging `answer` to `question`."""
    msgs = [{"role": "user", "content": ASK.format(question=question, answer=answer.strip())}]
    opts = GenerationOptions(max_tokens=1, temperature=0.0, top_logprobs=20)
    yes = no = 0.0
    for ev in engine.generate(msgs, opts):
        for tok, lp in ev.top_logprobs:
            word = engine.tokenizer.decode([tok]).strip().lower()
            if word in ("yes", "true"):
                yes += math.exp(lp)
            elif word in ("no", "false"):
                no += math.exp(lp)
    return yes / (yes + no) if yes + no > 0 else 0.5


def add_p_true(
    engine: Any,
    records: Sequence[dict],
    path: Path | None = None,
    done: Callable[[int], None] | None = None,
) -> list[dict]:
    """Give each record `p_true` and `p_true_seconds` (those that have them keep them);
    rewrite `path` with them (atomically), so an interrupted run loses nothing."""
    out = []
    for i, r in enumerate(records):
        if "p_true" not in r:
            t0 = time.perf_counter()
            r = {**r, "p_true": p_true(engine, r["question"], r["text"])}
            r["p_true_seconds"] = round(time.perf_counter() - t0, 4)
        out.append(r)
        if done is not None:
            done(i + 1)
        if path is not None and (i % 50 == 49 or i == len(records) - 1):
            _write(path, out + list(records[i + 1 :]))
    return out


def _write(path: Path, records: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
