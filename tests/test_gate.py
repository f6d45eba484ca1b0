"""The confidence gate's hidden-state probe: the tap reads the decode steps' own states (in
`run` and in the server's batches), the probe and its fit are the linear maps they claim to
be, calibrations round-trip, aliases get their model's scorer, and the gate says plainly
when it cannot keep anything local.
"""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli

from edgeai.engine import Engine
from edgeai.engine.hidden import RowStates, States
from edgeai.options import GenerationOptions
from edgeai.routing import calibrate as cal
from edgeai.routing import confidence, gate_report
from edgeai.server import batching
from edgeai.types import Answer

PROMPTS = ("the cat sat on", "a dog ran to", "in the house the old")


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine.load(tiny_model, kernel="builtin")  # float32: states comparable to 1e-4
    eng.prompt_cache.max_bytes = 0  # every prompt computed afresh
    return eng


def _layer_outputs(engine: Engine, ids: list[int]) -> list[mx.array]:
    """Each decoder layer's output over `ids` in one causal forward pass (no cache)."""
    inner = engine.model.model
    h = inner.embed_tokens(mx.array([ids]))
    outs = []
    for layer in inner.layers:
        h = layer(h, "causal", None)
        outs.append(h[0])
    return outs


def test_tap_reads_the_steps_own_states(engine):
    engine.tap_hidden([0, -1])
    opts = GenerationOptions(max_tokens=6, temperature=0.0)
    ids = engine.prompt_ids(PROMPTS[0])
    ans = Answer.from_events(engine.generate(ids, opts), "tiny")
    n = len(ans.tokens)
    assert ans.hidden is not None and ans.hidden.layers == [0, engine.layer_count - 1]
    # Hand-computed: the prompt's last position gives the first token; the position of the
    # next-to-last answer token gives the last one.
    full = _layer_outputs(engine, ids + ans.tokens)
    p = len(ids)
    for j, layer in enumerate(ans.hidden.layers):
        np.testing.assert_allclose(ans.hidden.values[0, j], np.array(full[layer][p - 1]), atol=1e-4)
        np.testing.assert_allclose(
            ans.hidden.values[1, j], np.array(full[layer][p + n - 2]), atol=1e-4
        )


def test_no_tap_no_states_and_same_tokens(tiny_model):
    plain = Engine.load(tiny_model, kernel="builtin")
    opts = GenerationOptions(max_tokens=8)
    before = Answer.from_events(plain.generate(PROMPTS[1], opts), "t")
    assert before.hidden is None
    plain.tap_hidden([1])
    after = Answer.from_events(plain.generate(PROMPTS[1], opts), "t")
    assert after.tokens == before.tokens and after.hidden.values.shape == (2, 1, 64)


def test_batched_rows_carry_their_single_stream_states(engine):
    engine.tap_hidden([0, 1])
    n = 6
    prompts = [engine.prompt_ids(p) for p in PROMPTS]
    single = [
        Answer.from_events(engine.generate(p, GenerationOptions(max_tokens=n)), "t")
        for p in prompts
    ]
    states = RowStates(lambda: engine.tap)
    gen = batching.for_engine(
        engine, lambda uid: None, states, completion_batch_size=4, prefill_batch_size=4
    )
    uids = gen.insert(prompts, max_tokens=[n] * len(prompts))
    count = dict.fromkeys(uids, 0)
    got: dict[int, States] = {}
    while len(got) < len(uids):
        _, responses = gen.next()
        for r in responses:
            if r.uid in got:
                continue
            states.token(r.uid)
            count[r.uid] += 1
            if count[r.uid] == len(single[uids.index(r.uid)].tokens):
                got[r.uid] = states.states(r.uid)
    for uid, one in zip(uids, single):
        np.testing.assert_allclose(got[uid].values, one.hidden.values, rtol=1e-3, atol=1e-3)


def test_probe_logit_is_a_dot_product():
    probe = confidence.Probe([2], np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32), 0.25, 4)
    st = States([0, 2], np.array([[[9, 9], [1, 2]], [[9, 9], [3, 4]]], dtype=np.float32))
    assert st.select([2]).tolist() == [1, 2, 3, 4]
    assert probe.logit(st) == pytest.approx(1 - 4 + 1.5 + 0.25)
    assert probe.fits(4) and not probe.fits(3) and not probe.fits(8)


def _records(n: int, width: int = 16, seed: int = 0) -> list[dict]:
    """Records whose hidden state (not their token signals) tells right from wrong."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    direction = gen.normal(size=width)
    recs = []
    for i in range(n):
        correct = rng.random() < 0.4
        k = rng.randint(3, 10)
        lps = [min(0.0, rng.gauss(-0.8 if correct else -1.0, 0.6)) for _ in range(k)]
        h = gen.normal(size=(2, 2, width)) + (0.5 if correct else -0.5) * direction
        rec = {
            "question": f"q{seed}-{i}",
            "kind": "alias",
            "gold": ["x"],
            "source": rng.choice(["nq", "webq"]),
            "text": "answer " * k,
            "finish_reason": "stop",
            "tokens": list(range(k)),
            "logprobs": lps,
            "entropies": [-lp for lp in lps],
            "top_logprobs": [[[0, lps[0]], [1, lps[0] - 1]]] + [[]] * (k - 1),
            "generation_tokens": k,
            "correct": correct,
        }
        rec["hidden_layers"] = [1, 3]
        rec["hidden"] = base64.b64encode(h.astype(np.float16).tobytes()).decode()
        recs.append(rec)
    return recs


def test_folded_probe_equals_its_pipeline():
    recs = _records(120)
    probe, oof, info = cal.fit_probe(recs)
    chosen = info["chosen"]
    X = cal.hidden_matrix(recs, [chosen["layer"]])
    pipe = cal._probe_pipeline(chosen["components"], chosen["C"], len(recs), X.shape[1]).fit(
        X, cal.labels(recs)
    )
    want = pipe.decision_function(X)
    got = [probe.logit(cal.hidden_of(r)) for r in recs]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert probe.n_layers == 4 and len(oof) == len(recs)


def test_gate_report_compares_estimators_and_ships_the_probe():
    recs = _records(400, seed=1)
    report, scorer = gate_report.evaluate(recs, "syn", calibrate=True, seed=0)
    est = report["estimators"]
    assert est["probe + token signals"]["auroc"] > est["token signals"]["auroc"] + 0.1
    assert est["probe"]["auroc"] > 0.9 and est["best single signal"]["auroc"] < 0.8
    assert scorer.probe is not None and scorer.fallback is not None
    assert set(report["by_dataset"]) == {"nq", "webq"}
    op = report["operating_point"]
    assert op["kept_accuracy"] >= 0.85 and op["recall"] > 0.5
    assert report["verdict"].startswith("keeps ")
    # The file round-trips: same scores after JSON.
    again = confidence.Scorer.from_dict(json.loads(json.dumps(scorer.to_dict())))
    np.testing.assert_allclose(cal.scores_of(again, recs), cal.scores_of(scorer, recs), atol=1e-5)
    # An answer without hidden states is scored by the fallback, with its threshold.
    ans = Answer(text="x", model="syn", logprobs=[-0.1, -0.2], entropies=[0.1, 0.1], tokens=[1, 2])
    assert scorer.for_answer(ans) is scorer.fallback
    confidence.score_answer(ans, scorer)
    assert ans.threshold == scorer.fallback.threshold and "probe" not in ans.signals
    ans.hidden = cal.hidden_of(recs[0])
    confidence.score_answer(ans, scorer)
    assert ans.threshold == scorer.threshold and "probe" in ans.signals
    # With a LoRA adapter the probe is left out and the answer says why.
    why = confidence.score_answer(ans, scorer, adapter="pirate")
    assert "probe" not in ans.signals and "calibrated on the base model" in why[0]


def test_gate_says_when_it_keeps_nothing():
    recs = _records(200, seed=2)
    for r in recs:  # a hopeless model: right 5% of the time, at random
        r["correct"] = random.Random(r["question"]).random() < 0.05
    report, scorer = gate_report.evaluate(recs, "weak", calibrate=True, target_accuracy=0.95)
    assert report["operating_point"]["kept_local"] == 0
    assert "weak keeps 0% local at 95%" in report["verdict"]
    assert "use a bigger model" in confidence.gate_note(scorer)


def test_explain_names_the_biggest_contributions():
    sc = confidence.Scorer(
        features=["min_logprob", "log_len", "idk"],
        mean=[-1.0, 2.0, 0.0],
        scale=[1.0, 1.0, 1.0],
        coef=[2.0, -0.5, -3.0],
        intercept=0.0,
    )
    sig = {"min_logprob": -0.1, "log_len": 2.0, "idk": 1.0}
    words = confidence.explain(sig, sc)
    # contributions: idk -3.0, min_logprob +1.8, log_len 0
    assert words == [
        "lowered confidence: said it does not know",
        "raised confidence: least likely token 90%",
    ]


def test_aliases_and_renamed_imports_get_the_models_scorer(tmp_path, monkeypatch):
    from ggufmaker import make_gguf

    from edgeai import store

    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path / "config"))
    assert store.calibration_name("smollm2") == "smollm2-135m"
    assert (
        confidence.load_scorer("smollm2").to_dict()
        == confidence.load_scorer("smollm2-135m").to_dict()
    )
    # The file the catalog's pip wheel holds, imported under a name of the user's choosing.
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    make_gguf(gguf)
    store.import_gguf(gguf, name="mine")
    assert store.calibration_name("mine") == "smollm2-135m"
    assert confidence.load_scorer("mine").meta == confidence.load_scorer("smollm2-135m").meta
    make_gguf(tmp_path / "something-else.gguf")
    store.import_gguf(tmp_path / "something-else.gguf", name="theirs")
    assert store.calibration_name("theirs") == "theirs"


def test_both_server_lanes_answer_with_the_probes_states(tiny_model, tmp_path, monkeypatch):
    import queue
    import threading
    import time

    from edgeai.server.scheduler import ADMITTED, Scheduler

    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path / "config"))
    base = confidence.load_scorer("tinyprobe")
    probe = confidence.Probe([1], np.ones(128, dtype=np.float32), 0.0, 2)
    confidence.save_user_scorer(
        "tinyprobe",
        confidence.Scorer(**{**base.__dict__, "probe": probe, "fallback": base}),
    )
    sched = Scheduler(max_batch=4, max_queue=8, keep_alive=-1)
    sched.start()

    def ask(prompt: str, n: int, cancel=None) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        opts = GenerationOptions(max_tokens=n)
        sched.submit(prompt, opts, "tinyprobe", tiny_model, q.put, cancel=cancel)
        return q

    def last(q: queue.Queue):
        while True:
            item = q.get(timeout=120)
            if item is not ADMITTED and getattr(item, "finish_reason", None) is not None:
                return item

    try:
        alone = last(ask(PROMPTS[0], 5))
        stop = threading.Event()
        blocker = ask(PROMPTS[1], 2000, cancel=stop)
        while sched.status()["lanes"]["alone"] < 2:
            time.sleep(0.005)
        batched = last(ask(PROMPTS[0], 5))
        stop.set()
        last(blocker)
        assert sched.status()["lanes"]["batched"] >= 1
    finally:
        sched.stop()
    for end in (alone, batched):
        assert end.hidden is not None and end.hidden.layers == [1]
    np.testing.assert_allclose(batched.hidden.values, alone.hidden.values, rtol=1e-2, atol=1e-2)


def test_explain_never_contradicts_its_direction():
    # A probe logit below zero that is still above the calibration average raised the score.
    sc = confidence.Scorer(features=["probe"], mean=[-2.0], scale=[1.0], coef=[1.0], intercept=0.0)
    (line,) = confidence.explain({"probe": -0.3}, sc)
    assert line.startswith("raised confidence:") and "wrong" not in line and "-0.30" in line


def test_judging_records_without_states_uses_the_fallback_and_its_threshold(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path / "config"))
    recs = _records(200, seed=4)
    _, scorer = gate_report.evaluate(recs, "syn4", calibrate=True)
    scorer.fallback.threshold = 0.37  # tell the two thresholds apart
    confidence.save_user_scorer("syn4", scorer)
    bare = [{k: v for k, v in r.items() if k not in ("hidden", "hidden_layers")} for r in recs]
    report, _ = gate_report.evaluate(bare, "syn4")
    assert report["operating_point"]["threshold"] == 0.37
    report, _ = gate_report.evaluate(recs, "syn4")
    assert report["operating_point"]["threshold"] == scorer.threshold


def test_bad_records_and_bad_calibration_files_are_one_line_errors(tmp_path, monkeypatch):
    from edgeai.errors import InvalidInput
    from edgeai.routing import evaluate as ev

    rec = _records(1)[0]
    cases = {
        "not json\n": "line 1: not JSON",
        json.dumps({"question": "q"}) + "\n": "not an eval record (no 'kind')",
        json.dumps({**rec, "hidden": "@@@"}) + "\n": "unreadable hidden states",
    }
    for i, (text, message) in enumerate(cases.items()):
        f = tmp_path / f"r{i}.jsonl"
        f.write_text(text)
        with pytest.raises(InvalidInput, match=re.escape(message)):
            [cal.hidden_of(r) for r in ev.load_records(f)]
    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "config").mkdir()
    for text, message in (
        ("{bad", "is not valid JSON"),
        ("[1, 2]", "no 'models' table"),
        ('{"models": {"smollm2-135m": {"features": 3}}}', "is not a calibration"),
    ):
        confidence.user_calibration_path().write_text(text)
        with pytest.raises(InvalidInput, match=re.escape(message)):
            confidence.load_scorer("smollm2-135m")


STORED_15B = Path.home() / ".local/share/edgeai/models/qwen2.5-coder-1.5b/model"


@pytest.mark.skipif(not STORED_15B.exists(), reason="needs `edgeai pull qwen2.5-coder-1.5b`")
def test_the_15b_keeps_an_easy_answer_local_and_escalates_arithmetic(edgeai_env, tmp_path):
    """The issue's end-to-end case, on the real model and its shipped calibration, with a
    remote tier configured (a stand-in on loopback)."""
    from fakeproviders import FakeProvider

    with FakeProvider("openai", reply="remote answer") as fp:
        cfg = Path(edgeai_env["EDGEAI_CONFIG_DIR"])
        cfg.mkdir(parents=True, exist_ok=True)
        (cfg / "config.toml").write_text(
            f'[tiers.cloud]\nkind = "openai"\nbase_url = "{fp.base_url}"\nmodel = "big"\n'
            '[policy]\nmode = "auto"\nremote_tier = "cloud"\n'
        )
        env = {**edgeai_env, "EDGEAI_HOME": str(STORED_15B.parents[2])}
        answers = {}
        for q in ("What is the capital of Japan?", "What is 4817 times 293?"):
            r = run_cli(["run", "-m", "qwen2.5-coder-1.5b", "--json", q], env)
            assert r.returncode == 0, r.stderr
            answers[q] = json.loads(r.stdout)
    easy = answers["What is the capital of Japan?"]
    assert "Tokyo" in easy["text"] and easy["tier"] == "local"
    # No route claims it: the gate's own score kept it.
    assert easy["route"] is None and easy["confidence"] >= easy["threshold"]
    assert answers["What is 4817 times 293?"]["text"] == "remote answer"
