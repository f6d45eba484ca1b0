"""LoRA adapters: the store checks them, the engine hot-swaps them per generation.

Adapters are made here in mlx-lm's own format: mlx-lm's `linear_to_lora_layers` puts LoRA
layers on the tiny model, the LoRA matrices get known random values, and the trainable
parameters are saved exactly as `mlx_lm.lora` saves them. mlx-lm itself
(`mlx_lm.utils.load(path, adapter_path=...)`) is the reference the outputs must equal.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import run_cli
from tinymodel import make_tiny_model

from edgeai.errors import InvalidInput, ModelNotFound
from edgeai.options import GenerationOptions
from edgeai.store import adapters

PROMPT = "the cat sat on the mat and then"
GREEDY = GenerationOptions(max_tokens=12, temperature=0.0)


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    rank: int = 4,
    scale: float = 10.0,
    num_layers: int = 2,
    keys: list[str] | None = None,
) -> Path:
    """Write an mlx-lm LoRA adapter for `base` with random (non-zero) A and B."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(base))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    weights = {
        k: mx.random.normal(v.shape) * 0.2 for k, v in tree_flatten(model.trainable_parameters())
    }
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    cfg = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
        "model": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def mlx_lm_tokens(base: Path, adapter_dir: Path | None, n: int) -> list[int]:
    """Greedy token ids from stock mlx-lm with the adapter loaded its own way."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    model, tok = load(str(base), adapter_path=str(adapter_dir) if adapter_dir else None)
    ids = mx.array(tok.encode(PROMPT))
    out = []
    for token, _ in generate_step(
        ids, model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
    ):
        out.append(int(token))
    return out


def tokens(engine, adapter: str | None, prompt: str = PROMPT) -> list[int]:
    return [
        e.token for e in engine.generate(prompt, GREEDY, adapter=adapter) if e.token is not None
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A store with a tiny base model and two adapters (A on every linear, B on q/v only)."""
    root = tmp_path_factory.mktemp("adapters")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEAI_HOME", str(root / "home"))
    base = make_tiny_model(root / "models" / "tiny")
    src_a = make_adapter(base, root / "src" / "a", seed=1)
    src_b = make_adapter(
        base,
        root / "src" / "b",
        seed=2,
        rank=2,
        scale=5.0,
        num_layers=1,
        keys=["self_attn.q_proj", "self_attn.v_proj"],
    )
    adapters.add(src_a, str(base), name="ad-a")
    adapters.add(src_b, str(base), name="ad-b")
    yield {"root": root, "base": base, "a": src_a, "b": src_b}
    mp.undo()


@pytest.fixture(scope="module")
def engine(env):
    from edgeai.engine import Engine

    return Engine.load(env["base"], name="tiny", kernel="builtin")


@pytest.fixture(scope="module")
def reference(env):
    """Greedy token ids from mlx-lm: base, with A, with B."""
    n = GREEDY.max_tokens
    return {
        None: mlx_lm_tokens(env["base"], None, n),
        "ad-a": mlx_lm_tokens(env["base"], env["a"], n),
        "ad-b": mlx_lm_tokens(env["base"], env["b"], n),
    }


def same_prefix(ours: list[int], ref: list[int]) -> bool:
    # The engine stops at end-of-sequence (the eos token is its last event); mlx-lm runs on.
    return len(ours) > 0 and ours == ref[: len(ours)]


def test_adapter_output_equals_mlx_lm_and_differs_from_base(engine, reference):
    base, a, b = tokens(engine, None), tokens(engine, "ad-a"), tokens(engine, "ad-b")
    assert same_prefix(base, reference[None])
    assert same_prefix(a, reference["ad-a"])
    assert same_prefix(b, reference["ad-b"])
    assert a != base and b != base and a != b


def test_switching_a_b_a_matches_single_adapter_runs(engine, reference):
    runs = [
        (name, tokens(engine, name))
        for name in ("ad-a", "ad-b", "ad-a", None, "ad-b", "ad-b", None)
    ]
    for name, got in runs:
        assert same_prefix(got, reference[name]), name
    # Switching reads nothing from disk: both adapters stay in the LRU.
    loads = engine.adapters.loads
    tokens(engine, "ad-a"), tokens(engine, "ad-b")
    assert engine.adapters.loads == loads


def test_base_weights_untouched_and_no_selection_leaks(engine):
    before = {
        k: v
        for k, v in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(
            engine.model.parameters()
        )
    }
    tokens(engine, "ad-a")
    after = dict(
        __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(engine.model.parameters())
    )
    assert before.keys() == after.keys()
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)
    assert not any(k.endswith(("lora_a", "lora_b")) for k in after)
    assert engine.adapters.selection is None


def test_concurrent_requests_with_different_adapters_do_not_interfere(engine, reference):
    names = ["ad-a", "ad-b", None, "ad-a", "ad-b", None]
    results: dict[int, list[int]] = {}
    errors = []
    start = threading.Barrier(len(names))

    def worker(i: int, name: str | None) -> None:
        try:
            start.wait()
            results[i] = tokens(engine, name)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i, name in enumerate(names):
        assert same_prefix(results[i], reference[name]), (i, name)


def test_interleaved_streams_each_keep_their_adapter(engine, reference):
    """Two streams pulled token by token in turns from two threads: each sees only its adapter."""
    got = {"ad-a": [], "ad-b": []}

    def pull(name):
        for e in engine.generate(PROMPT, GREEDY, adapter=name):
            if e.token is not None:
                got[name].append(e.token)

    ts = [threading.Thread(target=pull, args=(n,)) for n in got]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert same_prefix(got["ad-a"], reference["ad-a"]) and same_prefix(
        got["ad-b"], reference["ad-b"]
    )


def test_per_row_selection_in_one_batch_equals_single_rows(engine):
    """A batched forward pass with a different adapter per row equals each row run alone."""
    ids = mx.array([engine.encode(PROMPT)] * 3)
    rows = ["ad-a", None, "ad-b"]
    with engine.lock, engine.adapters.use_rows(rows):
        batched = engine.model(ids)
    for i, name in enumerate(rows):
        with engine.lock, engine.adapters.use(name):
            single = engine.model(ids[i : i + 1])
        assert mx.allclose(batched[i : i + 1], single, atol=1e-4).item(), name
    assert not mx.allclose(batched[0], batched[1], atol=1e-3).item()


def test_lru_evicts_least_recently_used(env):
    from edgeai.engine import Engine
    from edgeai.engine.lora import store_set

    eng = Engine.load(env["base"], name="tiny", kernel="builtin")
    eng.adapters = store_set(eng.model, "tiny", capacity=1)
    ref_a = tokens(eng, "ad-a")
    tokens(eng, "ad-b")
    assert eng.adapters.cached == ["ad-b"]
    assert tokens(eng, "ad-a") == ref_a
    assert eng.adapters.loads == 3


def test_unknown_adapter_is_refused(engine):
    with pytest.raises(ModelNotFound, match="no adapter named 'nope'"):
        tokens(engine, "nope")
    assert tokens(engine, None)  # the engine still works and is unlocked


def test_adapter_for_other_base_is_refused_at_run(env, engine):
    other = make_tiny_model(env["root"] / "models" / "tiny2", seed=5)
    adapters.add(env["a"], str(other), name="for-tiny2")  # same shapes, other weights
    with pytest.raises(InvalidInput, match="added for base model 'tiny2', not 'tiny'"):
        tokens(engine, "for-tiny2")
    assert other.exists()


@pytest.mark.parametrize("case", ["shapes", "names", "other_base", "not_lora", "missing_files"])
def test_mismatched_adapter_is_refused_at_add(env, tmp_path, case):
    src = tmp_path / "bad"
    if case == "shapes":  # made for a model with another hidden size
        wide = make_tiny_model(tmp_path / "wide", hidden=96)
        make_adapter(wide, src, seed=3)
        expect = (
            "does not fit base model 'tiny'.*down_proj: "
            "adapter maps 192 -> 96, the base layer 128 -> 64"
        )
    elif case == "names":  # layer 3 does not exist in a 2-layer model
        make_adapter(env["base"], src, seed=3)
        w = mx.load(str(src / "adapters.safetensors"))
        w = {k.replace("layers.1.", "layers.3."): v for k, v in w.items()}
        mx.save_safetensors(str(src / "adapters.safetensors"), w)
        expect = "model.layers.3.* no such layer in the base model"
    elif case == "other_base":  # a deeper model: its adapter names layers the tiny one lacks
        deep = make_tiny_model(tmp_path / "deep", layers=4)
        make_adapter(deep, src, seed=3, num_layers=4)
        expect = "no such layer in the base model"
    elif case == "not_lora":
        make_adapter(env["base"], src, seed=3)
        cfg = json.loads((src / "adapter_config.json").read_text())
        (src / "adapter_config.json").write_text(json.dumps({**cfg, "fine_tune_type": "dora"}))
        expect = "'dora' fine-tune; only LoRA"
    else:
        src.mkdir()
        expect = "not an mlx-lm adapter directory"
    with pytest.raises(InvalidInput, match=expect):
        adapters.add(src, str(env["base"]), name="bad")
    assert not (adapters.adapters_dir() / "bad").exists()
    assert not [p for p in adapters.adapters_dir().iterdir() if p.name.startswith(".")]


def test_store_add_list_rm(env):
    info = adapters.add(env["a"], str(env["base"]), name="tmp-a")
    assert (info.name, info.base, info.rank, info.scale) == ("tmp-a", "tiny", 4, 10.0)
    assert info.layers == 14  # 7 linear layers per block x 2 blocks
    assert "tmp-a" in [a.name for a in adapters.list_adapters()]
    with pytest.raises(InvalidInput, match="exists already"):
        adapters.add(env["b"], str(env["base"]), name="tmp-a")
    assert adapters.add(env["b"], str(env["base"]), name="tmp-a", force=True).rank == 2
    adapters.remove("tmp-a")
    assert "tmp-a" not in [a.name for a in adapters.list_adapters()]
    with pytest.raises(ModelNotFound):
        adapters.remove("tmp-a")


def test_works_over_custom_kernel_layers(env, reference):
    """With the custom matmul kernels swapped in, the wrapper calls them and adds the delta."""
    from edgeai.engine import Engine
    from edgeai.engine.lora import LoRASwitch

    eng = Engine.load(env["base"], name="tiny", kernel="custom")
    if eng.kernel.name == "builtin":
        pytest.skip(f"custom kernels unavailable here: {eng.kernel.reason}")
    base, a = tokens(eng, None), tokens(eng, "ad-a")
    assert a != base
    wrapped = [m for _, m in eng.model.named_modules() if isinstance(m, LoRASwitch)]
    assert wrapped and not any(type(m.base).__name__ == "QuantizedLinear" for m in wrapped)
    ids = mx.array([eng.encode(PROMPT)])
    from mlx_lm.utils import load

    ref_model, _ = load(str(env["base"]), adapter_path=str(env["a"]))
    # Float32 activations, as prompts' last steps run (fast mode fills prompts in int8).
    with eng.lock, eng.adapters.use("ad-a"), eng.hooks.prompt_context():
        ours = eng.model(ids)
    assert mx.allclose(ours, ref_model(ids), atol=2e-2, rtol=1e-3).item()


def test_unquantized_base_matches_mlx_lm(tmp_path, monkeypatch):
    """nn.Linear layers (no quantization) are wrapped the same way."""
    from edgeai.engine import Engine

    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    base = make_tiny_model(tmp_path / "plain", quantize=False, seed=3)
    src = make_adapter(base, tmp_path / "ad", seed=4)
    adapters.add(src, str(base), name="p")
    eng = Engine.load(base, name="plain", kernel="builtin")
    got = tokens(eng, "p")
    assert same_prefix(got, mlx_lm_tokens(base, src, GREEDY.max_tokens))
    assert got != tokens(eng, None)


def test_cli_add_list_rm(env, edgeai_env, tmp_path):
    home = Path(edgeai_env["EDGEAI_HOME"])
    base = make_tiny_model(tmp_path / "tiny")
    r = run_cli(
        ["adapter", "add", str(env["a"]), "--base", str(base), "--name", "cli-a"], edgeai_env
    )
    assert r.returncode == 0, r.stderr
    assert (home / "adapters" / "cli-a" / "adapters.safetensors").is_file()
    r = run_cli(["adapter", "list", "--json"], edgeai_env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(a["name"], a["base"], a["rank"]) for a in rows] == [("cli-a", "tiny", 4)]
    r = run_cli(["adapter", "list"], edgeai_env)
    assert "cli-a" in r.stdout and "tiny" in r.stdout
    # A mismatched adapter: one line with the cause and a hint, no traceback, exit != 0.
    wide = make_tiny_model(tmp_path / "wide", hidden=96)
    bad = make_adapter(wide, tmp_path / "bad", seed=3)
    r = run_cli(["adapter", "add", str(bad), "--base", str(base)], edgeai_env)
    assert (
        r.returncode != 0 and "does not fit base model" in r.stderr and "Traceback" not in r.stderr
    )
    # `edgeai run --adapter`: the answer equals the library's with that adapter, not the base's.
    from edgeai.cli import chat
    from edgeai.engine import Engine

    run = ["run", "-m", str(base), "--kernel", "builtin", "--json", "-n", "10"]
    r = run_cli([*run, "--adapter", "cli-a", "hello there"], edgeai_env)
    assert r.returncode == 0, r.stderr
    eng = Engine.load(base, kernel="builtin")
    msgs = chat.messages_for("hello there")
    want = "".join(
        e.text for e in eng.generate(msgs, GenerationOptions(max_tokens=10), adapter="cli-a")
    )
    plain = "".join(e.text for e in eng.generate(msgs, GenerationOptions(max_tokens=10)))
    assert json.loads(r.stdout)["text"] == want != plain
    r = run_cli([*run, "--adapter", "nope", "hello"], edgeai_env)
    assert (
        r.returncode != 0 and "no adapter named 'nope'" in r.stderr and "Traceback" not in r.stderr
    )
    r = run_cli(["adapter", "rm", "cli-a"], edgeai_env)
    assert r.returncode == 0, r.stderr
    assert not (home / "adapters" / "cli-a").exists()
    r = run_cli(["adapter", "rm", "cli-a"], edgeai_env)
    assert r.returncode != 0 and "no adapter named 'cli-a'" in r.stderr


def test_continuous_batching_routes_each_row_to_its_adapter(engine):
    """mlx-lm's BatchGenerator (the server's batching) with mixed adapters in one batch,
    requests joining mid-flight: every request gets exactly its single-request tokens."""
    from mlx_lm.generate import BatchGenerator

    from edgeai.server.batching import calling_batch

    prompts = [PROMPT, "a dog ran to the", PROMPT, "then the bird", "in the house the"]
    names = ["ad-a", "ad-b", None, "ad-b", "ad-a"]
    expected = [tokens(engine, n, p) for p, n in zip(prompts, names)]
    adapter_of: dict[int, object] = {}
    got: dict[int, list[int]] = {}
    eos = [[int(t)] for t in engine.tokenizer.eos_token_ids]
    with engine.lock:
        routed = engine.adapters.routed(lambda n: [adapter_of[u] for u in calling_batch(n)[1]])
        gen = BatchGenerator(routed, stop_tokens=eos, completion_batch_size=8, prefill_batch_size=2)

        def insert(i: int) -> int:
            (uid,) = gen.insert([engine.encode(prompts[i])], max_tokens=[GREEDY.max_tokens])
            # As the server does: resolve the adapter once at admission (some rows by name).
            adapter_of[uid] = engine.adapters.get(names[i]) if names[i] and i % 2 else names[i]
            got[uid] = []
            return uid

        uids = [insert(0), insert(1), insert(2)]
        steps = 0
        while steps < 200:
            if steps == 3:  # later requests join a batch already decoding
                uids += [insert(3), insert(4)]
            _, responses = gen.next()
            for r in responses:
                got[r.uid].append(r.token)
            steps += 1
            if all(len(got[u]) >= len(e) for u, e in zip(uids, expected)) and len(uids) == 5:
                break
        gen.close()
    for u, e, n in zip(uids, expected, names):
        assert got[u][: len(e)] == e, n


def test_replaced_or_removed_adapter_is_not_served_from_memory(env, engine, reference):
    engine.adapters.RECHECK_S = 0.0  # check the store on every use (default: once a second)
    adapters.add(env["a"], str(env["base"]), name="swap")
    assert same_prefix(tokens(engine, "swap"), reference["ad-a"])
    adapters.add(env["b"], str(env["base"]), name="swap", force=True)
    assert same_prefix(tokens(engine, "swap"), reference["ad-b"])
    adapters.remove("swap")
    with pytest.raises(ModelNotFound, match="no adapter named 'swap'"):
        tokens(engine, "swap")


def test_base_given_by_store_name(tmp_path, monkeypatch):
    """`--base NAME` resolves through the model store; the engine the CLI loads for NAME accepts
    it."""
    from ggufmaker import make_gguf

    from edgeai import store
    from edgeai.engine import Engine

    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    make_gguf(tmp_path / "g.gguf")
    lm = store.import_gguf(tmp_path / "g.gguf", "gtiny")
    src = make_adapter(lm.path, tmp_path / "ad", seed=7)
    info = adapters.add(src, "gtiny", name="g")
    assert (info.base, Path(info.base_path)) == ("gtiny", Path(lm.path).resolve())
    eng = Engine.load(store.resolve("gtiny"), name="gtiny", kernel="builtin")
    assert same_prefix(tokens(eng, "g"), mlx_lm_tokens(lm.path, src, GREEDY.max_tokens))
    with pytest.raises(ModelNotFound):
        adapters.add(src, "no-such-model", name="g2")


def test_server_requests_with_different_adapters_share_one_batch(tmp_path, monkeypatch):
    """Real `edgeai serve`: concurrent chat requests, each with its own `adapter` field."""
    from edgeai.server import schemas

    if "adapter" not in schemas.ChatCompletionRequest.model_fields:
        pytest.skip("the server has no per-request adapter field yet")
    from serverproc import start_server

    from edgeai.engine import Engine

    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    base = make_tiny_model(tmp_path / "tiny")
    adapters.add(make_adapter(base, tmp_path / "a", seed=1), str(base), name="ad-a")
    adapters.add(
        make_adapter(base, tmp_path / "b", seed=2, rank=2, num_layers=1), str(base), name="ad-b"
    )
    eng = Engine.load(base, name="tiny", kernel="builtin")
    msgs = [{"role": "user", "content": "tell me about the cat"}]
    names = ["ad-a", "ad-b", None, "ad-a", "ad-b", None]
    want = {
        n: "".join(e.text for e in eng.generate(msgs, GenerationOptions(max_tokens=10), adapter=n))
        for n in set(names)
    }
    assert len(set(want.values())) == 3
    srv = start_server(base, tmp_path, env={**__import__("os").environ, "EDGEAI_KERNEL": "builtin"})
    try:
        got: dict[int, object] = {}

        def ask(i: int) -> None:
            body = {"model": "tiny", "messages": msgs, "max_tokens": 10, "temperature": 0}
            if names[i]:
                body["adapter"] = names[i]
            with srv.client(timeout=120) as c:
                r = c.post("/v1/chat/completions", json=body)
                got[i] = (
                    r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
                )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert [got[i] for i in range(len(names))] == [want[n] for n in names]
        with srv.client() as c:
            r = c.post(
                "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "adapter": "nope"}
            )
        assert r.status_code in (400, 404) and "no adapter named 'nope'" in r.text
    finally:
        srv.stop()


def test_adapter_set_refuses_pairs_that_do_not_fit_the_loaded_model(engine):
    """Even past the store's checks (e.g. the base directory was overwritten), nothing bad is
    installed."""
    from edgeai.engine.lora import AdapterSet, LoadedAdapter

    bad = LoadedAdapter(
        "bad", 1.0, {"model.layers.0.self_attn.q_proj": (mx.zeros((32, 2)), mx.zeros((2, 64)))}
    )
    aset = AdapterSet(engine.model, lambda name: bad)
    with pytest.raises(
        InvalidInput, match="'bad' does not fit this model: .*q_proj: adapter maps 32 -> 64"
    ):
        aset.get("bad")
    assert aset.cached == []


@pytest.mark.slow
def test_real_135m_with_adapter_equals_mlx_lm(smollm_dir, tmp_path, monkeypatch):
    """SmolLM2-135M imported from GGUF: an adapter on its last 4 blocks, ours vs mlx-lm's."""
    from edgeai.engine import Engine

    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    src = make_adapter(smollm_dir, tmp_path / "ad", seed=11, rank=8, scale=2.0, num_layers=4)
    adapters.add(src, str(smollm_dir), name="real")
    eng = Engine.load(smollm_dir, kernel="builtin")
    ours = tokens(eng, "real")
    assert same_prefix(ours, mlx_lm_tokens(smollm_dir, src, GREEDY.max_tokens))
    assert ours != tokens(eng, None)


BAD_CONFIGS = {
    "nan-scale": '{"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": NaN}}',
    "inf-scale": '{"lora_parameters": {"rank": 4, "scale": Infinity}}',
    "inf-elsewhere": '{"lora_parameters": {"rank": 4, "scale": 10, "dropout": -Infinity}}',
    "huge-scale": '{"lora_parameters": {"rank": 4, "scale": 1e300}}',
    "overflowing-scale": '{"lora_parameters": {"rank": 4, "scale": 1e309}}',
    "overflow-elsewhere": '{"learning_rate": -1e999, "lora_parameters": {"rank": 4, "scale": 10}}',
    "rank-zero": '{"lora_parameters": {"rank": 0, "scale": 10}}',
    "a-list": "[]",
    "params-a-list": '{"lora_parameters": []}',
    "scale-text": '{"lora_parameters": {"rank": 4, "scale": "big"}}',
    "scale-bool": '{"lora_parameters": {"rank": 4, "scale": true}}',
    "type-number": '{"fine_tune_type": 5, "lora_parameters": {"scale": 1}}',
    "not-utf8": b"\xff\xfe{}",
}


@pytest.mark.parametrize("text", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_adapter_config_mistakes_are_refused_at_add(env, tmp_path, text):
    """`"scale": NaN` was accepted; its requests then answered 500 or streamed NaN."""
    src = make_adapter(env["base"], tmp_path / "src", seed=3)
    cfg = src / "adapter_config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InvalidInput, match="adapter_config.json"):
        adapters.add(src, str(env["base"]), name="bad")
    assert not (adapters.adapters_dir() / "bad").exists()


def test_non_finite_weights_are_refused_at_add(env, tmp_path):
    src = make_adapter(env["base"], tmp_path / "src", seed=3)
    w = mx.load(str(src / "adapters.safetensors"))
    first = sorted(w)[0]
    w[first] = mx.where(
        mx.arange(w[first].size).reshape(w[first].shape) == 3, mx.array(float("nan")), w[first]
    )
    mx.save_safetensors(str(src / "adapters.safetensors"), w)
    with pytest.raises(InvalidInput, match="not finite"):
        adapters.add(src, str(env["base"]), name="bad")


def test_stored_adapter_edited_to_nan_is_refused_when_used(env, engine, tmp_path):
    adapters.add(env["a"], str(env["base"]), name="edited")
    stored = adapters.adapters_dir() / "edited" / "adapter_config.json"
    cfg = json.loads(stored.read_text())
    cfg["lora_parameters"]["scale"] = float("nan")
    stored.write_text(json.dumps(cfg))  # json writes NaN
    try:
        with pytest.raises(InvalidInput, match="adapter_config.json"):
            list(engine.generate(PROMPT, GREEDY, adapter="edited"))
    finally:
        adapters.remove("edited")


def test_damaged_adapter_metadata_is_listed_and_removable(env):
    import os

    adapters.add(env["a"], str(env["base"]), name="damaged")
    (adapters.adapters_dir() / "damaged" / "edgeai.json").write_text("[]")
    listed = {a.name: a for a in adapters.list_adapters()}
    assert listed["damaged"].problem and listed["ad-a"].problem is None
    with pytest.raises(InvalidInput, match="damaged"):
        adapters.get("damaged")
    r = run_cli(["adapter", "list"], {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
    assert r.returncode == 0 and "damaged" in r.stdout and "Traceback" not in r.stderr, r.stderr
    adapters.remove("damaged")
    assert "damaged" not in [a.name for a in adapters.list_adapters()]
