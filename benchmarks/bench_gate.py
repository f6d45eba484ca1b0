"""What each confidence estimator adds to the cost of an answer, on a real model.

For N questions of the shared eval data (the same prompts `edgeai eval` uses), interleaved
so that machine load hits every variant alike:

- plain: the answer alone (greedy, top-5 logprobs: the token signals come free with it);
- probe: the same answer with the decode loop tapped for the probe's layer, plus scoring;
- P(True): the extra pass that asks the model to judge its own answer.

Prints ms per answer for each and the overhead as a ratio of the plain answer.

    python benchmarks/bench_gate.py [--model qwen2.5-coder-1.5b] [--questions 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--data", type=Path, default=DATA / "nq-open-dev.jsonl")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgeai import store
    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions
    from edgeai.routing import confidence, evaluate
    from edgeai.routing.ptrue import p_true
    from edgeai.types import Answer

    name, path = store.locate(args.model)
    plain = Engine.load(path, name=name)
    tapped = Engine.load(path, name=name)
    scorer = confidence.tap_for_gate(tapped)
    if scorer.probe is None:
        sys.exit(f"{name}'s shipped scorer has no probe: nothing to time")
    for eng in (plain, tapped):
        eng.prompt_cache.max_bytes = 0  # every prompt computed afresh, as new questions are
    items = evaluate.mix([args.data], args.questions, seed=1)
    opts = GenerationOptions(max_tokens=24, temperature=0.0, top_logprobs=5, stop=["\n"])
    ms: dict[str, list[float]] = {"plain": [], "probe": [], "P(True)": []}
    same = 0
    for item in [items[0], *items]:  # the first one warms both engines up, untimed
        t0 = time.perf_counter()
        a = Answer.from_events(plain.generate(item.messages(), opts), name)
        t1 = time.perf_counter()
        b = Answer.from_events(tapped.generate(item.messages(), opts), name)
        confidence.score_answer(b, scorer)
        t2 = time.perf_counter()
        p_true(plain, item.question, a.text)
        t3 = time.perf_counter()
        if item is items[0] and not ms["plain"]:
            continue
        same += a.tokens == b.tokens
        ms["plain"].append(1000 * (t1 - t0))
        ms["probe"].append(1000 * (t2 - t1))
        ms["P(True)"].append(1000 * (t3 - t2))
    med = {k: statistics.median(v) for k, v in ms.items()}
    out = {
        "model": name,
        "questions": len(ms["plain"]),
        "same_tokens": same,
        "ms_per_answer": {k: round(v, 1) for k, v in med.items()},
        "extra_ms": {
            "token signals": 0.0,
            "probe": round(med["probe"] - med["plain"], 1),
            "P(True)": round(med["P(True)"], 1),
        },
        "extra_ratio": {
            "probe": round(med["probe"] / med["plain"] - 1, 3),
            "P(True)": round(med["P(True)"] / med["plain"], 3),
        },
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{name}: {out['questions']} questions, median ms per answer")
    print(f"  answer alone (token signals free)  {med['plain']:8.1f}")
    print(
        f"  answer with the probe              {med['probe']:8.1f}  "
        f"({100 * out['extra_ratio']['probe']:+.1f}%)"
    )
    print(
        f"  P(True) extra pass                 {med['P(True)']:8.1f}  "
        f"(+{100 * out['extra_ratio']['P(True)']:.0f}% of an answer)"
    )
    print(f"  probe answers equal to plain ones: {same}/{out['questions']}")


if __name__ == "__main__":
    main()
