"""config.toml and models.toml mistakes: one line naming the file, the key and the expected type."""

from __future__ import annotations

import pytest
from conftest import run_cli

from edgeai import config
from edgeai.errors import EdgeAIError

TIER = '[tiers.cloud]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "big"\n'

BAD_CONFIG = {
    "invalid-utf8": (b'default_model = "\xff"\n', "not valid UTF-8"),
    "policy-not-a-table": (b'policy = "local-only"\n', "policy"),
    "tiers-not-a-table": (b'tiers = "x"\n', "tiers"),
    "default-model-number": (b"default_model = 5\n", "default_model"),
    "tier-not-a-table": (b"[tiers]\ncloud = 1\n", "tiers.cloud"),
    "timeout-text": ((TIER + 'timeout = "fast"\n').encode(), "tiers.cloud.timeout"),
    "timeout-negative": ((TIER + "timeout = -1\n").encode(), "tiers.cloud.timeout"),
    "max-tokens-text": ((TIER + 'max_tokens = "lots"\n').encode(), "tiers.cloud.max_tokens"),
    "retries-negative": ((TIER + "retries = -1\n").encode(), "tiers.cloud.retries"),
    "retries-float": ((TIER + "retries = 1.5\n").encode(), "tiers.cloud.retries"),
    "base-url-not-http": (
        TIER.replace("http://127.0.0.1:9/v1", "file:///etc").encode(),
        "tiers.cloud.base_url",
    ),
    "kind-unknown": (TIER.replace('"openai"', '"grpc"').encode(), "tiers.cloud.kind"),
    "threshold-text": (b'[policy]\nthreshold = "high"\n', "policy.threshold"),
    "threshold-nan": (b"[policy]\nthreshold = nan\n", "policy.threshold"),
    "mode-unknown": (b'[policy]\nmode = "yolo"\n', "policy.mode"),
    "typo": (b"[policy]\ntreshold = 0.5\n", "policy.treshold"),
    "routes-examples-text": (b'[routes.legal]\nexamples = "x"\n', "routes.legal.examples"),
    "min-similarity-text": (b'[router]\nmin_similarity = "high"\n', "router.min_similarity"),
}


@pytest.fixture
def cfg_dir(tmp_path, monkeypatch):
    d = tmp_path / "config"
    d.mkdir()
    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(d))
    return d


@pytest.mark.parametrize("text,key", BAD_CONFIG.values(), ids=BAD_CONFIG.keys())
def test_config_mistakes_name_file_and_key(cfg_dir, text, key):
    (cfg_dir / "config.toml").write_bytes(text)
    with pytest.raises(EdgeAIError) as ei:
        config.load_config()
    msg = ei.value.message
    assert str(cfg_dir / "config.toml") in msg and key in msg and "\n" not in msg, msg


def test_a_valid_config_loads_as_written(cfg_dir):
    text = (
        TIER + 'api_key_env = "OPENAI_API_KEY"\ntimeout = 30\nretries = 0\nmax_tokens = 100\n'
        '[policy]\nmode = "auto"\nremote_tier = "cloud"\nthreshold = 1.01\n'
        "[router]\nmin_similarity = 0.4\n"
        '[routes.legal]\ntier = "remote"\nexamples = ["a", "b"]\n'
    )
    (cfg_dir / "config.toml").write_text('default_model = "tiny"\n' + text)
    cfg = config.load_config()
    assert cfg["tiers"]["cloud"]["retries"] == 0 and cfg["policy"]["threshold"] == 1.01
    assert config.default_model() == "tiny"


def test_config_policies_match_router():
    from edgeai.routing.router import POLICIES

    assert config.POLICIES == POLICIES


@pytest.mark.parametrize(
    "key", ["policy-not-a-table", "timeout-text", "retries-negative", "invalid-utf8"]
)
def test_cli_says_one_line(tiny_model, edgeai_env, key):
    from pathlib import Path

    text, where = BAD_CONFIG[key]
    d = Path(edgeai_env["EDGEAI_CONFIG_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_bytes(text)
    r = run_cli(["run", "-m", str(tiny_model), "-n", "2", "--policy", "remote", "hi"], edgeai_env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert where in r.stderr.replace("\n", " ") or "UTF-8" in r.stderr


BAD_CATALOG = {
    "entry-not-a-table": (b"[models]\nfoo = 1\n", "foo"),
    "models-not-a-table": (b'models = "x"\n', "models"),
    "invalid-utf8": (b'[models.foo]\ndescription = "\xff"\n', "UTF-8"),
    "size-inf": (b"[models.foo]\nsize = inf\n", "size"),
    "size-negative": (b"[models.foo]\nsize = -5\n", "size"),
    "memory-nan": (b"[models.foo]\nmemory = nan\n", "memory"),
}


@pytest.mark.parametrize("text,key", BAD_CATALOG.values(), ids=BAD_CATALOG.keys())
def test_models_toml_mistakes_name_file_and_key(cfg_dir, text, key):
    from edgeai.store import catalog

    (cfg_dir / "models.toml").write_bytes(text)
    with pytest.raises(EdgeAIError) as ei:
        catalog.load_catalog()
    assert str(cfg_dir / "models.toml") in ei.value.message and key in ei.value.message, (
        ei.value.message
    )


def test_cli_list_with_a_broken_models_toml(edgeai_env):
    from pathlib import Path

    d = Path(edgeai_env["EDGEAI_CONFIG_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "models.toml").write_text("[models]\nfoo = 1\n")
    r = run_cli(["list"], edgeai_env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "models.toml" in r.stderr, r.stderr


def test_doctor_shows_a_broken_config_and_goes_on(edgeai_env):
    import json
    from pathlib import Path

    d = Path(edgeai_env["EDGEAI_CONFIG_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(
        '[tiers.cloud]\nkind = "openai"\nbase_url = "http://x"\nmodel = "m"\ntimeout = "fast"\n'
    )
    r = run_cli(["doctor", "--json"], edgeai_env)
    assert r.returncode == 0, r.stderr
    assert "tiers.cloud.timeout" in json.loads(r.stdout)["config_problem"]
    r = run_cli(["doctor"], edgeai_env)
    assert r.returncode == 0 and "tiers.cloud.timeout" in r.stdout and "kernel" in r.stdout, (
        r.stderr
    )


@pytest.mark.parametrize(
    "var,value,args",
    [
        ("EDGEAI_ADAPTER_CACHE", "x", ["run", "-n", "2", "hi"]),
        ("EDGEAI_ADAPTER_CACHE", "0", ["run", "-n", "2", "hi"]),
        ("EDGEAI_HUB_TIMEOUT", "abc", ["pull", "hf:org/name", "-q"]),
        ("EDGEAI_HUB_TIMEOUT", "nan", ["pull", "hf:org/name", "-q"]),
    ],
)
def test_numbers_from_the_environment_are_checked_by_name(tiny_model, edgeai_env, var, value, args):
    env = {**edgeai_env, var: value, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}
    if args[0] == "run":
        args = [args[0], "-m", str(tiny_model), *args[1:]]
    r = run_cli(args, env)
    assert r.returncode != 0 and "Traceback" not in r.stderr and f"${var}" in r.stderr, r.stderr
