"""Structured output and forced tool calls on a real model: do all answers parse and validate,
and what does the grammar's mask cost per token?

Runs N sampled generations under JSON schemas (objects, arrays, enums, numbers, nested) and
N forced tool calls (`tool_choice: "required"` over two tools), each through the same decode
loop `edgeai run` and the server's lone-request lane use, with the llguidance processor of
`edgeai.engine.constrain`. Every answer is parsed and validated with `jsonschema`. Reports
the mask's own cost (feeding the matcher + computing and applying the mask, ms/token), and
decode tokens/s with and without a constraint.

Tool calls need a template that renders tools. Without --tools-model, the model's own
weights are given Qwen2.5's tools template (tests/tinymodel.TOOLS_TEMPLATE) in a temporary
copy: SmolLM2 was not trained on that format, so this checks the grammar, not the model.

Usage:
    python benchmarks/bench_structured.py [--model smollm2-135m] [--runs 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
            "role": {"enum": ["engineer", "teacher", "doctor", "artist"]},
            "skills": {
                "type": "array",
                "items": {"type": "string", "maxLength": 20},
                "minItems": 1,
                "maxItems": 4,
            },
        },
        "required": ["name", "age", "height_m", "role", "skills"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 10},
                        "price": {"type": "number", "minimum": 0},
                    },
                    "required": ["sku", "qty", "price"],
                    "additionalProperties": False,
                },
            },
            "express": {"type": "boolean"},
        },
        "required": ["items", "express"],
        "additionalProperties": False,
    },
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]},
            "temps_c": {
                "type": "array",
                "items": {"type": "number", "minimum": -50, "maximum": 50},
                "maxItems": 5,
            },
        },
        "required": ["city", "condition", "temps_c"],
        "additionalProperties": False,
    },
    "review": {
        "type": "object",
        "properties": {
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "summary": {"type": "string", "maxLength": 60},
            "tags": {
                "type": "array",
                "items": {"enum": ["price", "quality", "service", "speed"]},
                "maxItems": 4,
            },
            "meta": {
                "type": "object",
                "properties": {
                    "verified": {"type": "boolean"},
                    "helpful": {"type": "integer", "minimum": 0},
                },
                "required": ["verified", "helpful"],
                "additionalProperties": False,
            },
        },
        "required": ["stars", "summary", "tags", "meta"],
        "additionalProperties": False,
    },
}
PROMPTS = {
    "person": "Describe a fictional person as JSON.",
    "order": "Write an example shop order as JSON.",
    "weather": "Give today's weather in a European city as JSON.",
    "review": "Write a short product review as JSON.",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 60},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["query", "max_results"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_PROMPTS = [
    "What's the weather in Lisbon?",
    "Find recent news about solar panels.",
    "Is it raining in Oslo right now?",
    "Look up the tallest building in the world.",
]


def _run(engine, prompt, constraint, seed: int, max_tokens: int, temperature: float):
    from edgeai.options import GenerationOptions

    ids = engine.prompt_ids(prompt)
    proc = (
        constraint.processor(engine.tokenizer, engine.vocab_size)
        if constraint is not None
        else None
    )
    opts = GenerationOptions(max_tokens=max_tokens, temperature=temperature, seed=seed)
    gen = engine.generation(ids, opts, processors=[proc] if proc else [])
    text, t0 = [], time.perf_counter()
    with engine.lock:
        while gen.finish is None:
            text += [e.text for e in gen.advance() if e.text]
    dt = time.perf_counter() - t0
    tokens = gen.decoder.stats.generation_tokens
    return "".join(text), gen.finish, tokens, dt, proc


def schema_runs(engine, runs: int, temperature: float) -> dict:
    import jsonschema

    from edgeai.engine import constrain

    names = list(SCHEMAS)
    cons = {n: constrain.json_schema(SCHEMAS[n]) for n in names}
    ok, bad, mask_ms, tokens, seconds = 0, [], [], 0, 0.0
    for i in range(runs):
        n = names[i % len(names)]
        text, finish, ntok, dt, proc = _run(
            engine, [{"role": "user", "content": PROMPTS[n]}], cons[n], i, 384, temperature
        )
        tokens, seconds = tokens + ntok, seconds + dt
        mask_ms.append(1000 * proc.mask_seconds / max(proc.steps, 1))
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[n])
            ok += 1
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append(
                {
                    "schema": n,
                    "seed": i,
                    "finish": finish,
                    "error": str(e)[:120],
                    "text": text[:200],
                }
            )
    return {
        "runs": runs,
        "valid": ok,
        "failures": bad,
        "mask_ms_per_token": statistics.mean(mask_ms),
        "mask_ms_p90": sorted(mask_ms)[int(0.9 * len(mask_ms))],
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
    }


def free_runs(engine, runs: int, temperature: float) -> dict:
    tokens, seconds = 0, 0.0
    for i in range(runs):
        n = list(SCHEMAS)[i % len(SCHEMAS)]
        _, _, ntok, dt, _ = _run(
            engine, [{"role": "user", "content": PROMPTS[n]}], None, i, 96, temperature
        )
        tokens, seconds = tokens + ntok, seconds + dt
    return {"runs": runs, "tokens_per_second": tokens / seconds}


def tool_runs(engine, runs: int, temperature: float) -> dict:
    import jsonschema

    from edgeai.engine import tools

    forced = tools.call_constraint(TOOLS)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    ok, bad, mask_ms = 0, [], []
    for i in range(runs):
        chat = tools.ToolChat(
            [{"role": "user", "content": TOOL_PROMPTS[i % len(TOOL_PROMPTS)]}], TOOLS
        )
        text, finish, _, _, proc = _run(engine, chat, forced, i, 160, temperature)
        mask_ms.append(1000 * proc.mask_seconds / max(proc.steps, 1))
        content, calls = tools.parse(text)
        try:
            assert len(calls) == 1 and content is None, f"{len(calls)} calls, content {content!r}"
            fn = calls[0]["function"]
            jsonschema.validate(json.loads(fn["arguments"]), params[fn["name"]])
            ok += 1
        except (AssertionError, KeyError, ValueError, jsonschema.ValidationError) as e:
            bad.append({"seed": i, "finish": finish, "error": str(e)[:120], "text": text[:200]})
    return {
        "runs": runs,
        "well_formed": ok,
        "failures": bad,
        "mask_ms_per_token": statistics.mean(mask_ms),
    }


def with_tools_template(model_dir: Path, out: Path) -> Path:
    """A copy of `model_dir` (weights linked) whose chat template is Qwen2.5's, tools included."""
    from tinymodel import TOOLS_TEMPLATE

    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TOOLS_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a store name or an MLX directory")
    ap.add_argument(
        "--tools-model", help="a model whose own template renders tools (default: see above)"
    )
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgeai import store
    from edgeai.engine import Engine

    name, model_dir = store.locate(args.model)
    engine = Engine.load(model_dir, name)
    t0 = time.perf_counter()
    from edgeai.engine import constrain

    constrain.ll_tokenizer(engine.tokenizer, engine.vocab_size)
    report = {
        "model": name,
        "vocab": engine.vocab_size,
        "tokenizer_setup_s": time.perf_counter() - t0,
        "schemas": schema_runs(engine, args.runs, args.temperature),
        "free": free_runs(engine, max(4, args.runs // 10), args.temperature),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tdir = (
            Path(store.locate(args.tools_model)[1])
            if args.tools_model
            else with_tools_template(Path(model_dir), Path(tmp) / "m")
        )
        report["tools_model"] = str(args.tools_model or f"{name} weights + Qwen2.5 tools template")
        report["tools"] = tool_runs(Engine.load(tdir, name), args.runs, args.temperature)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    s, t, f = report["schemas"], report["tools"], report["free"]
    print(
        f"model {name} (vocab {report['vocab']}), "
        f"llguidance tokenizer setup {report['tokenizer_setup_s']:.2f} s"
    )
    print(
        f"JSON schema answers: {s['valid']}/{s['runs']} parse and validate; "
        f"mask {s['mask_ms_per_token']:.3f} "
        f"ms/token (p90 {s['mask_ms_p90']:.3f}); {s['tokens_per_second']:.1f} tok/s constrained vs "
        f"{f['tokens_per_second']:.1f} free"
    )
    print(
        f"forced tool calls ({report['tools_model']}): {t['well_formed']}/{t['runs']} well-formed; "
        f"mask {t['mask_ms_per_token']:.3f} ms/token"
    )
    for fail in (s["failures"] + t["failures"])[:5]:
        print("  failure:", fail)


if __name__ == "__main__":
    main()
