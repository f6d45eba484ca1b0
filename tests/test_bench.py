"""`edgeai bench` end to end on the tiny model, in a real subprocess."""

from __future__ import annotations

import csv
import io
import json

import pytest
from conftest import run_cli

ARGS = ["-p", "16", "-n", "8", "-r", "2"]


def test_json_all_kernels(tiny_model, edgeai_env):
    p = run_cli(["bench", str(tiny_model), *ARGS, "--kernel", "all", "--json"], edgeai_env)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    head = data["header"]
    assert (
        head["backend"]
        and head["threads"] >= 1
        and head["model"] == tiny_model.name
        and head["machine"]
    )
    rows = data["results"]
    assert [(r["kernel"], r["test"]) for r in rows] == [
        ("builtin", "pp16"),
        ("builtin", "tg8"),
        ("custom", "pp16"),
        ("custom", "tg8"),
    ]
    for r in rows:
        assert r["tok_s"] > 0 and r["tok_s_sd"] >= 0 and len(r["samples"]) == 2 and r["reps"] == 2
        assert r["peak_memory_bytes"] > 0
        assert (r["ttft_s"] is not None) == r["test"].startswith("pp")
    assert rows[0]["kernel_detail"] == "builtin"
    assert rows[2]["kernel_detail"].startswith("edgeai-cpu") and rows[2]["kernel_detail"].endswith(
        " fast"
    )
    # which kernel won each test, and by how much over MLX's own
    for test in ("pp16", "tg8"):
        best = max((r for r in rows if r["test"] == test), key=lambda r: r["tok_s"])
        assert data["fastest"][test].startswith(best["kernel_detail"] + " (")
        assert ("x MLX's kernel" in data["fastest"][test]) == (best["kernel"] != "builtin")


def test_both_precisions(tiny_model, edgeai_env):
    p = run_cli(
        ["bench", str(tiny_model), *ARGS, "--kernel", "custom", "--precision", "all", "--json"],
        edgeai_env,
    )
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["results"]
    assert [(r["kernel_detail"].split()[-1], r["test"]) for r in rows] == [
        ("fast", "pp16"),
        ("fast", "tg8"),
        ("accurate", "pp16"),
        ("accurate", "tg8"),
    ]


def test_markdown_default_and_csv(tiny_model, edgeai_env):
    p = run_cli(["bench", str(tiny_model), *ARGS, "--kernel", "builtin"], edgeai_env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("machine:") and "threads:" in lines[0] and "backend:" in lines[0]
    table = [ln for ln in lines if ln.startswith("|")]
    assert (
        table[0].startswith("| model | kernel | test | t/s") and len(table) == 4
    )  # header, rule, pp, tg
    assert "±" in table[2]
    p = run_cli(
        ["bench", str(tiny_model), *ARGS, "--kernel", "builtin", "-n", "0", "--csv"], edgeai_env
    )
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert len(rows) == 1 and rows[0]["test"] == "pp16" and float(rows[0]["tok_s"]) > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--kernel", "fastest"], "unknown kernel"),
        (["--precision", "fastest"], "unknown precision"),
        (["-p", "0", "-n", "0"], "nothing to measure"),
        (["--json", "--csv"], "exclusive"),
    ],
)
def test_user_mistakes_are_one_line(tiny_model, edgeai_env, args, words):
    p = run_cli(["bench", str(tiny_model), *args], edgeai_env)
    assert p.returncode != 0
    assert words in p.stderr and "Traceback" not in p.stderr


def test_unknown_model_is_a_clear_error(edgeai_env):
    p = run_cli(["bench", "no-such-model-xyz", "-r", "1"], edgeai_env)
    assert p.returncode != 0 and "Traceback" not in p.stderr
