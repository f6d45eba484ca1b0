"""Damaged or foreign adapter directories: each is refused at `adapter add` with its own
one-line reason, and nothing is stored."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from conftest import run_cli
from test_adapters import make_adapter

from edgeai.errors import InvalidInput
from edgeai.store import adapters

CFG, WEIGHTS = "adapter_config.json", "adapters.safetensors"
LAYER = "model.layers.0.self_attn.q_proj"


def _bad_json(src):
    (src / CFG).write_text('{"fine_tune_type": "lora", "lora_parameters": {"rank": 4,')


def _no_scale(src):
    cfg = json.loads((src / CFG).read_text())
    del cfg["lora_parameters"]["scale"]
    (src / CFG).write_text(json.dumps(cfg))


def _scale_not_a_number(src):
    cfg = json.loads((src / CFG).read_text())
    cfg["lora_parameters"]["scale"] = "10"
    (src / CFG).write_text(json.dumps(cfg))


def _unreadable(src):
    (src / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")


def _edit_weights(src, edit):
    w = dict(mx.load(str(src / WEIGHTS)))
    edit(w)
    mx.save_safetensors(str(src / WEIGHTS), w)


def _full_weight(src):  # a DoRA magnitude / full fine-tune tensor among the LoRA pairs
    _edit_weights(src, lambda w: w.update({f"{LAYER}.weight": mx.zeros((64, 64))}))


def _lone_a(src):
    _edit_weights(src, lambda w: w.pop(f"{LAYER}.lora_b"))


def _ranks_do_not_chain(src):  # A is 64 x 4, B made 2 x 64
    _edit_weights(src, lambda w: w.update({f"{LAYER}.lora_b": mx.zeros((2, 64))}))


def _no_tensors(src):
    mx.save_safetensors(str(src / WEIGHTS), {})


CASES = [
    (_bad_json, f"{CFG} is not valid JSON"),
    (_no_scale, "lora_parameters.scale: Field required"),
    (_scale_not_a_number, "lora_parameters.scale: Input should be a valid number"),
    (_unreadable, f"{WEIGHTS} is not a readable safetensors file"),
    (_full_weight, f"{LAYER}.weight: not a LoRA tensor"),
    (_lone_a, f"{LAYER}: has only lora_a"),
    (_ranks_do_not_chain, rf"{LAYER}: lora_a \(64, 4\) and lora_b \(2, 64\) do not chain"),
    (_no_tensors, "is not a LoRA adapter: no tensors"),
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("damage, message", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_damaged_adapter_is_refused_with_its_reason(tiny_model, tmp_path, home, damage, message):
    src = make_adapter(tiny_model, tmp_path / "ad", seed=4)
    adapters.add(src, str(tiny_model), name="good")  # as made, it is accepted
    damage(src)
    with pytest.raises(InvalidInput, match=message) as e:
        adapters.add(src, str(tiny_model), name="bad")
    assert e.value.hint and "\n" not in e.value.message
    assert [a.name for a in adapters.list_adapters()] == ["good"]
    assert not [p for p in adapters.adapters_dir().iterdir() if p.name.startswith(".")]


def test_cli_refuses_a_damaged_adapter_in_one_line(tiny_model, tmp_path, edgeai_env):
    src = make_adapter(tiny_model, tmp_path / "ad", seed=4)
    _ranks_do_not_chain(src)
    r = run_cli(["adapter", "add", str(src), "--base", str(tiny_model)], edgeai_env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert (
        "do not chain" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    )  # the error and its hint
