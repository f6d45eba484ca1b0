"""`edgeai doctor` in a subprocess: platform, backend, store, models and the active kernel."""

from __future__ import annotations

import json

from conftest import run_cli
from ggufmaker import make_gguf


def test_doctor_reports_machine_store_models_and_kernel(edgeai_env, tmp_path):
    r = run_cli(["doctor", "--json"], edgeai_env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["platform"]["backend"] in ("cpu", "metal", "cuda")
    assert rep["platform"]["memory"]["total"] > 0
    assert rep["store"]["path"].startswith(edgeai_env["EDGEAI_HOME"])
    assert rep["models"] == []
    assert rep["kernels"]["kernel"] and "backend" in rep["kernels"]

    src = tmp_path / "mini.gguf"
    make_gguf(src)
    assert run_cli(["import", str(src), "--name", "mini"], edgeai_env).returncode == 0
    rep = json.loads(run_cli(["doctor", "--json"], edgeai_env).stdout)
    (m,) = rep["models"]
    assert m["name"] == "mini" and m["ok"] and m["fits"] is True and m["size"] > 0
    assert rep["store"]["size"] >= m["size"]

    text = run_cli(["doctor"], edgeai_env)
    assert text.returncode == 0 and "mini" in text.stdout and "kernel" in text.stdout
