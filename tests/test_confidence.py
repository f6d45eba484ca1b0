"""Confidence signals, hard flags and the calibrated scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeai.options import GenerationOptions
from edgeai.routing import confidence
from edgeai.types import Answer


def _answer(lps, text="Paris.", finish="stop", tops=None, tokens=None):
    return Answer(
        text=text,
        model="m",
        finish_reason=finish,
        logprobs=list(lps),
        entropies=[0.5] * len(lps),
        tokens=tokens or list(range(len(lps))),
        top_logprobs=tops or [()] * len(lps),
    )


def test_signal_values():
    lps = [-0.01, -2.0, -0.5, -1.0]
    tops = [((1, -0.01), (2, -5.0))] + [()] * 3
    s = confidence.signals(_answer(lps, tops=tops))
    assert s["mean_logprob"] == pytest.approx(np.mean(lps))
    assert s["min_logprob"] == -2.0
    assert s["p10_logprob"] == pytest.approx(np.percentile(lps, 10))
    assert s["mean_entropy"] == pytest.approx(0.5)
    assert s["log_len"] == pytest.approx(math.log(5))
    # The first token (-0.01) is near-certain filler; the margin is read where it is informative.
    assert s["first_logprob"] == -2.0 and s["first_margin"] == 0.0
    s = confidence.signals(_answer([-0.3, -0.1], tops=[((1, -0.3), (2, -1.8))] + [()]))
    assert s["first_margin"] == pytest.approx(1.5)
    assert s["truncated"] == 0 and s["repetition"] == 0 and s["refusal"] == 0 and s["idk"] == 0


def test_hard_flags():
    assert confidence.signals(_answer([-0.1] * 5, finish="length"))["truncated"] == 1
    loop = [5, 6, 7] * 5
    assert confidence.signals(_answer([-0.1] * 15, tokens=[1, 2] + loop))["repetition"] == 1
    assert not confidence.is_repetitive(list(range(40)))
    assert not confidence.is_repetitive([1, 1])  # a short doubled token is not a loop
    assert confidence.is_repetitive([9] * 10)
    assert confidence.hard_flags({"truncated": 1.0, "repetition": 0.0, "idk": 1.0}) == ["truncated"]


@pytest.mark.parametrize(
    "text,flag",
    [
        ("I don't know who won that match.", "idk"),
        ("Nobody knows the exact number; it is unknown.", "idk"),
        ("There is no definitive answer to that.", "idk"),
        ("I'm sorry, but I can't help with that request.", "refusal"),
        ("As an AI, I cannot browse the internet.", "refusal"),
    ],
)
def test_abstention_and_refusal(text, flag):
    assert confidence.signals(_answer([-0.2] * 4, text=text))[flag] == 1


@pytest.mark.parametrize("text", ["The capital of France is Paris.", "Knowledge is power.", "42"])
def test_plain_answers_are_not_abstentions(text):
    s = confidence.signals(_answer([-0.2] * 4, text=text))
    assert s["idk"] == 0 and s["refusal"] == 0


def test_signals_from_real_generation(tiny_model):
    from edgeai.engine import Engine

    eng = Engine.load(tiny_model)
    ans = Answer.from_events(
        eng.generate("hello", GenerationOptions(max_tokens=6, top_logprobs=3)), eng.name
    )
    s = confidence.signals(ans)
    assert all(math.isfinite(v) for v in s.values())
    assert s["truncated"] == 1 and ans.finish_reason == "length"
    assert (
        s["min_logprob"] <= s["mean_logprob"] <= 0
        and s["first_margin"] >= 0
        and s["mean_entropy"] > 0
    )


def test_scorer_orders_and_calibrates():
    sc = confidence.load_scorer("no-such-model")  # the shipped "default" entry
    sure = confidence.signals(_answer([-0.02] * 5, tops=[((1, -0.02), (2, -6.0))] + [()] * 4))
    unsure = confidence.signals(_answer([-2.5] * 5, tops=[((1, -0.7), (2, -0.8))] + [()] * 4))
    assert 0 <= sc.score(unsure) < sc.score(sure) <= 1
    iso = confidence.Scorer(
        features=["x"],
        mean=[0],
        scale=[1],
        coef=[1],
        intercept=0,
        calibration={"method": "isotonic", "x": [0.2, 0.8], "y": [0.1, 0.9]},
    )
    assert iso.score({"x": -10}) == pytest.approx(0.1) and iso.score({"x": 10}) == pytest.approx(
        0.9
    )
    platt = confidence.Scorer(
        features=["x"],
        mean=[0],
        scale=[1],
        coef=[1],
        intercept=0,
        calibration={"method": "platt", "a": 2.0, "b": 0.0},
    )
    assert platt.score({"x": 1.0}) == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_user_calibration_takes_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path))
    mine = confidence.Scorer(
        features=["log_len"], mean=[0], scale=[1], coef=[-1], intercept=0, threshold=0.42
    )
    path = confidence.save_user_scorer("smollm2-135m", mine)
    assert path.parent == tmp_path
    assert confidence.load_scorer("smollm2-135m").threshold == 0.42
    assert confidence.load_scorer("other-model").threshold != 0.42 or confidence.load_scorer(
        "other-model"
    ).features != ["log_len"]


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_shipped_calibrations_cover_the_catalog_chat_models(model):
    from edgeai.routing.calibrate import KEEP_NOTHING

    sc = confidence._shipped()["models"]
    assert "default" in sc and model in sc
    s = confidence.Scorer.from_dict(sc[model])
    assert len(s.coef) == len(s.features) == len(s.mean) == len(s.scale)
    assert s.features[-1] == "probe" and s.probe is not None and s.fallback is not None
    assert s.probe.weights.size % 2 == 0 and s.probe.fits(s.probe.n_layers)
    held = s.meta["held_out"]
    assert s.meta["items"] > 0 and 0.5 < held["auroc"] <= 1
    # A threshold that keeps nothing says so in words; any other keeps something.
    if s.threshold == KEEP_NOTHING:
        assert held["operating_point"]["kept_local"] == 0
        assert "keeps 0% local" in confidence.gate_note(s)
    else:
        assert 0 < s.threshold < 1 and held["operating_point"]["kept_local"] > 0


@pytest.mark.slow
def test_real_model_scores_its_answer(smollm_engine):
    from edgeai.routing.respond import respond

    resp = respond(
        "What is the capital of France?",
        GenerationOptions(max_tokens=16),
        policy="local-only",
        engine=smollm_engine,
        config={},
    )
    ans = resp.result()
    assert ans.tier == "local" and ans.decision == "local"
    assert 0.0 <= ans.confidence <= 1.0 and ans.threshold is not None
    assert ans.signals["first_margin"] > 0 and ans.signals["mean_logprob"] < 0
