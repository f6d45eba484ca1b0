"""The estimators `edgeai eval` compares with the shipped gate by asking the model again:
P(True) against a forward pass computed by hand, sample agreement against the samples
themselves, and the eval CLI that adds them to records without losing any."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from test_eval import _edgeai, _env, synthetic_records
from tinymodel import make_tiny_model

from edgeai.engine import Engine
from edgeai.options import GenerationOptions
from edgeai.routing import evaluate as ev
from edgeai.routing import selfcheck


@pytest.fixture(scope="module")
def float_engine(tmp_path_factory):
    # Float weights, untied output: the test can set the rows of the words P(True) reads.
    path = make_tiny_model(
        tmp_path_factory.mktemp("selfcheck") / "tiny-float", quantize=False, tie=False
    )
    eng = Engine.load(path, kernel="builtin")
    eng.prompt_cache.max_bytes = 0
    return eng


def _ids(engine: Engine, text: str) -> list[int]:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, text
    return ids


def test_p_true_is_the_yes_share_of_the_first_tokens_top_20(float_engine):
    eng = float_engine
    q, a = "who wrote hamlet", "Shakespeare"
    msgs = [{"role": "user", "content": selfcheck.ASK.format(question=q, answer=a)}]
    ids = eng.prompt_ids(msgs)
    head = eng.model.lm_head
    logits = eng.model(mx.array([ids]))[0, -1]
    top = np.argsort(-np.array(logits))
    # The tiny vocabulary spells words byte by byte: "y" and "n" stand for Yes and No, given
    # the rows of the two most likely tokens, so both land in the top 20 with known weight.
    y, n = _ids(eng, "y")[0], _ids(eng, "n")[0]
    w = np.array(head.weight)
    w[y], w[n] = w[top[0]], w[top[1]] * 0.9
    head.weight = mx.array(w)
    try:
        lp = np.array(mx.log(mx.softmax(eng.model(mx.array([ids]))[0, -1].astype(mx.float32))))
        top20 = np.argsort(-lp)[:20]
        word = {t: eng.tokenizer.decode([int(t)]).strip().lower() for t in top20}
        p_yes = sum(math.exp(lp[t]) for t in top20 if word[t] == "y")
        p_no = sum(math.exp(lp[t]) for t in top20 if word[t] == "n")
        assert p_yes > 0 and p_no > 0
        got = selfcheck.p_true(eng, q, a, yes=("y",), no=("n",))
        assert got == pytest.approx(p_yes / (p_yes + p_no), abs=1e-4)
        assert 0.5 < got < 1  # the "yes" row is the top token's, the "no" row a weaker copy
        # Neither word among the alternatives: no evidence either way.
        assert selfcheck.p_true(eng, q, a, yes=("no such word",), no=("nor this",)) == 0.5
    finally:
        head.weight = mx.array(np.array(w))  # rows stay edited: the fixture is this file's


@pytest.mark.parametrize(
    "a, b, kind, want",
    [
        ("Paris", "It is Paris.", "alias", 2 * (1 / 1) * (1 / 3) / (1 + 1 / 3)),  # "it is paris"
        ("the Eiffel Tower", "Eiffel tower", "alias", 1.0),  # articles and case normalized away
        ("Las Vegas", "It is in Las Vegas, Nevada", "alias", 2 * 1 * (2 / 6) / (1 + 2 / 6)),
        ("Paris", "Lyon", "alias", 0.0),
        ("", "", "alias", 1.0),
        ("Paris", "", "alias", 0.0),
        ("so 3 + 4 = 7.0", "The answer is 7", "number", 1.0),
        ("The answer is 1,200", "it makes 1200.", "number", 1.0),
        ("The answer is 7", "The answer is 8", "number", 0.0),
        ("no number", "no number either", "number", 0.0),
    ],
)
def test_similarity(a, b, kind, want):
    assert selfcheck.similarity(a, b, kind) == pytest.approx(want)
    assert selfcheck.similarity(b, a, kind) == pytest.approx(want)


def test_sample_agreement_is_the_mean_similarity_of_seeded_samples(float_engine):
    eng = float_engine
    item = ev.Item("the cat sat on", "alias", ["mat"], "t")
    k, n = 5, 3
    samples = []
    for seed in range(k):
        opts = GenerationOptions(
            max_tokens=n, temperature=selfcheck.SAMPLE_TEMPERATURE, seed=seed, stop=["\n"]
        )
        samples.append("".join(e.text for e in eng.generate(item.messages(), opts)))
    assert len(set(samples)) > 1  # a random model sampled does not repeat itself
    for text in (samples[1], samples[3], "no sample says this"):
        rec = {"question": item.question, "kind": "alias", "gold": ["mat"], "source": "t"}
        want = sum(selfcheck.similarity(s, text, "alias") for s in samples) / k
        got = selfcheck.sample_agreement(eng, {**rec, "text": text}, k, n, n)
        assert got == pytest.approx(want)
    assert want == 0.0


def test_eval_adds_both_estimators_and_keeps_the_files_other_records(tmp_path, tiny_model):
    recs = synthetic_records(60, seed=5)
    other = {**synthetic_records(1, seed=9)[0], "question": "a record of another run"}
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*recs, other]))
    data = tmp_path / "syn.jsonl"
    data.write_text(
        "".join(json.dumps({"question": r["question"], "answer": ["x"]}) + "\n" for r in recs)
    )
    args = ["eval", str(data), "--model", str(tiny_model), "--records", str(path)]
    args += ["--max-tokens", "3", "--max-tokens-math", "3", "--calibrate", "--no-save"]
    args += ["--p-true", "--samples", "2", "--plot", str(tmp_path / "p.png"), "--json"]
    p = _edgeai(args, _env(tmp_path))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    saved = ev.load_records(path)
    assert len(saved) == 61 and saved[-1]["question"] == "a record of another run"
    mine = saved[:60]
    assert all(0 <= r["p_true"] <= 1 and 0 <= r["agreement"] <= 1 for r in mine)
    assert all(r["p_true_seconds"] > 0 and r["agreement_seconds"] > 0 for r in mine)
    held = report["split"]["held_out"]
    for name in ("P(True)", "sample agreement"):
        est = report["estimators"][name]
        assert est["items"] == held and est["extra_ms"] > 0
        assert est["shipped_auroc_same_items"] == pytest.approx(report["auroc"], abs=1e-3)
