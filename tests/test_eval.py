"""`edgeai eval`: labelling, metrics, calibration, and the CLI end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeai.routing import calibrate as cal
from edgeai.routing import evaluate as ev
from edgeai.routing import gate_report


def test_load_all_shapes(tmp_path):
    f = tmp_path / "mix.jsonl"
    rows = [
        {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
        {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "Which is a mammal?", "choices": ["trout", "whale"], "answer": "B"},
        {"question": "What is the meaning of life?", "answer": None},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    items = ev.load_items(f)
    assert [i.kind for i in items] == ["alias", "number", "choice", "unanswerable"]
    assert (
        items[1].gold == ["7"]
        and items[2].gold == ["B"]
        and "B. whale" in items[2].messages()[-1]["content"]
    )
    sa = tmp_path / "sa.json"
    sa.write_text(
        json.dumps(
            {
                "example": [
                    {"question": "q1", "answer": ["x"], "answerable": True, "source": "squad"},
                    {"question": "q2", "answer": None, "answerable": False},
                ]
            }
        )
    )
    assert [i.kind for i in ev.load_items(sa)] == ["alias", "unanswerable"]


def test_labels():
    alias = ev.Item("q", "alias", ["The Beatles", "Beatles"], "t")
    assert ev.is_correct(alias, "It was the Beatles!")
    assert not ev.is_correct(alias, "Beatlesque music")  # whole phrase only
    num = ev.Item("q", "number", ["1248"], "t")
    assert ev.is_correct(num, "First 12 x 100 = 1,200, plus 48 gives 1,248.")
    assert not ev.is_correct(
        num, "The answer is 1248 dollars, or 1250 rounded."
    )  # the last number counts
    mc = ev.Item("q", "choice", ["B"], "t")
    assert ev.is_correct(mc, "B. whale") and not ev.is_correct(mc, "A")
    un = ev.Item("q", "unanswerable", [], "t")
    assert ev.is_correct(un, "I don't know; nobody can know that.") and not ev.is_correct(
        un, "It is 42."
    )


def test_metrics():
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    # 9 correct/wrong pairs, 8 ordered right.
    assert ev.auroc(s, y) == pytest.approx(8 / 9)
    assert ev.auroc(s, np.ones(6)) is None
    cov, acc = ev.risk_coverage(s, y)
    assert cov[-1] == 1 and acc[0] == 1 and acc[-1] == pytest.approx(0.5)
    t = ev.threshold_table(s, y, [0.5])[0]
    assert t["kept_local"] == pytest.approx(4 / 6) and t["kept_accuracy"] == pytest.approx(0.75)
    assert cal.pick_threshold(s, y, target_accuracy=1.0, min_kept=2) == pytest.approx(0.8)
    # Two right answers are not evidence enough by default: keep nothing.
    assert cal.pick_threshold(s, y, target_accuracy=1.0, min_kept=3) == cal.KEEP_NOTHING
    assert cal.pick_threshold(s, y, budget=0.5) == pytest.approx(np.quantile(s, 0.5))


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Records whose token log-probabilities are higher when the answer is correct."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        kind = rng.choice(["alias", "alias", "number", "unanswerable"])
        correct = rng.random() < 0.4
        k = rng.randint(3, 12)
        mu = -0.3 if correct else -1.6
        lps = [min(0.0, rng.gauss(mu, 0.5)) for _ in range(k)]
        recs.append(
            {
                "question": f"synthetic question {seed}-{i}",
                "kind": kind,
                "gold": ["x"],
                "source": "syn",
                "text": "answer " * k,
                "finish_reason": "stop",
                "tokens": list(range(k)),
                "logprobs": lps,
                "entropies": [-lp + 0.1 for lp in lps],
                "top_logprobs": [[[0, lps[0]], [1, lps[0] - 1]]] + [[]] * (k - 1),
                "generation_tokens": k,
                "correct": correct,
            }
        )
    return recs


def test_calibration_on_held_out_split():
    recs = synthetic_records(300)
    report, scorer = gate_report.evaluate(recs, "syn", calibrate=True, target_accuracy=0.8, seed=1)
    assert report["split"]["held_out"] + report["split"]["fit"] == 300
    assert report["auroc"] > 0.85  # the signal is strong by construction
    assert report["baseline_length"]["auroc"] < report["auroc"]
    op = report["operating_point"]
    assert op["threshold"] == scorer.threshold and 0 < op["kept_local"] < 1
    probs = cal.scores_of(scorer, recs)
    assert probs.min() >= 0 and probs.max() <= 1 + 1e-5


def _env(tmp_path) -> dict:
    return dict(
        os.environ,
        EDGEAI_HOME=str(tmp_path / "home"),
        EDGEAI_CONFIG_DIR=str(tmp_path / "config"),
        HF_HUB_OFFLINE="1",
        NO_COLOR="1",
        COLUMNS="160",
        PYTHONPATH=str(Path(__file__).parents[1]),
    )


def _edgeai(args, env):
    return subprocess.run(
        [sys.executable, "-m", "edgeai", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def test_eval_cli_end_to_end(tmp_path, tiny_model):
    data = tmp_path / "small.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"question": "who wrote hamlet", "answer": ["Shakespeare"]},
                {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"},
                {"question": "What is the meaning of life?", "answer": None},
            ]
        )
    )
    png, recs = tmp_path / "out" / "plot.png", tmp_path / "recs.jsonl"
    p = _edgeai(
        [
            "eval",
            str(data),
            "--model",
            str(tiny_model),
            "--max-tokens",
            "4",
            "--max-tokens-math",
            "4",
            "--records",
            str(recs),
            "--plot",
            str(png),
            "--json",
        ],
        _env(tmp_path),
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["items"] == 3 and set(report["by_kind"]) == {"alias", "number", "unanswerable"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(ev.load_records(recs)) == 3
    # Plain mode renders tables.
    p = _edgeai(
        ["eval", str(data), "--model", str(tiny_model), "--records", str(recs), "--plot", str(png)],
        _env(tmp_path),
    )
    assert p.returncode == 0 and "AUROC" in p.stdout and "per threshold" in p.stdout


def test_eval_cli_calibrate_saves_user_config(tmp_path, tiny_model):
    recs = synthetic_records(120, seed=3)
    data = tmp_path / "syn.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": r["question"], "answer": ["x"]}) for r in recs)
    )
    (tmp_path / "recs.jsonl").write_text(
        "\n".join(json.dumps(r) for r in recs)
    )  # reused, not regenerated
    env = _env(tmp_path)
    p = _edgeai(
        [
            "eval",
            str(data),
            "--model",
            str(tiny_model),
            "--records",
            str(tmp_path / "recs.jsonl"),
            "--calibrate",
            "--budget",
            "0.5",
            "--plot",
            str(tmp_path / "c.png"),
            "--json",
        ],
        env,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    saved = json.loads(Path(report["saved_to"]).read_text())
    entry = saved["models"][Path(tiny_model).name]
    assert entry["threshold"] == report["operating_point"]["threshold"]
    assert report["operating_point"]["kept_local"] == pytest.approx(0.5, abs=0.1)
    # Refit from the records alone: no data files, no model loaded.
    p = _edgeai(
        [
            "eval",
            "--records",
            str(tmp_path / "recs.jsonl"),
            "--model",
            "syn-model",
            "--calibrate",
            "--no-save",
            "--plot",
            str(tmp_path / "d.png"),
            "--json",
        ],
        env,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert (
        report["model"] == "syn-model"
        and report["split"]["fit"] + report["split"]["held_out"] == 120
    )
    assert "saved_to" not in report
    bad = _edgeai(["eval", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model)], env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "missing.jsonl" in bad.stderr
