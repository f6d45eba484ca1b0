"""`edgeai run` exercised as a user would: real subprocesses on real models."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import default_sigint, run_cli


def _json_run(tiny_model, env, *args, input=None):
    r = run_cli(["run", "-m", str(tiny_model), "--json", *args], env, input=input)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_streams_answer_and_prints_stats(tiny_model, edgeai_env):
    r = run_cli(["run", "-m", str(tiny_model), "-n", "12", "hello there"], edgeai_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "peak memory" in r.stderr
    assert "Traceback" not in r.stderr


def test_json_has_text_tokens_timings_model(tiny_model, edgeai_env):
    out = _json_run(tiny_model, edgeai_env, "-n", "9", "hello")
    assert out["model"] == tiny_model.name
    assert out["tier"] == "local"
    assert out["tokens"] == out["stats"]["generation_tokens"] <= 9
    assert out["stats"]["prompt_tokens"] > 0 and out["stats"]["prompt_tps"] > 0
    assert isinstance(out["text"], str)


def test_stdin_is_context_for_the_prompt(tiny_model, edgeai_env):
    alone = _json_run(tiny_model, edgeai_env, "-n", "2", "find the root cause")
    piped = _json_run(
        tiny_model,
        edgeai_env,
        "-n",
        "2",
        "find the root cause",
        input="ERROR disk full at /var/log\n" * 5,
    )
    assert piped["stats"]["prompt_tokens"] > alone["stats"]["prompt_tokens"] + 40
    only_stdin = _json_run(tiny_model, edgeai_env, "-n", "2", input="summarise this")
    assert only_stdin["stats"]["prompt_tokens"] > 0


def test_stop_string_cuts_the_answer(tiny_model, edgeai_env):
    full = _json_run(tiny_model, edgeai_env, "-n", "40", "hello")["text"]
    assert len(full) > 10
    stop = full[5:8]
    cut = _json_run(tiny_model, edgeai_env, "-n", "40", "--stop", stop, "hello")
    assert cut["text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_seed_makes_sampling_repeatable(tiny_model, edgeai_env):
    args = ["-n", "24", "--temperature", "1.0", "--seed"]
    a = _json_run(tiny_model, edgeai_env, *args, "7", "hi")["text"]
    b = _json_run(tiny_model, edgeai_env, *args, "7", "hi")["text"]
    c = _json_run(tiny_model, edgeai_env, *args, "8", "hi")["text"]
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", ""], "prompt is empty"),
        (["run", "hi", "--temperature", "-1"], "--temperature"),
        (["run", "hi", "--max-tokens", "0"], "--max-tokens"),
        (["run", "hi", "--top-p", "2"], "--top-p"),
        (["run", "hi", "-t", "0.7", "--seed", str(2**64)], "--seed"),
        (["run", "hi", "-t", "0.7", "--seed", "-1"], "--seed"),
        (["run", "hi", "-t", "nan"], "--temperature"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(tiny_model, edgeai_env, args, message):
    r = run_cli([args[0], "-m", str(tiny_model), *args[1:]], edgeai_env)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}


def test_json_schema_file_constrains_the_answer(tiny_model, edgeai_env, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    for seed in ("1", "2"):
        out = _json_run(
            tiny_model,
            edgeai_env,
            "-n",
            "60",
            "-t",
            "1",
            "--seed",
            seed,
            "--json-schema",
            str(schema),
            "pick a color",
        )
        assert out["finish_reason"] == "stop"
        answer = json.loads(out["text"])
        assert answer["color"] in ("red", "green", "blue") and 1 <= answer["count"] <= 9


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read the schema file"),
        ("{oops", "is not JSON"),
        ('{"not": {"type": "string"}}', 'Unimplemented keys: ["not"]'),
        ("[1]", "must be a JSON object"),
    ],
)
def test_bad_schema_file_is_one_line(tiny_model, edgeai_env, tmp_path, content, message):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    r = run_cli(["run", "-m", str(tiny_model), "--json-schema", str(path), "hi"], edgeai_env)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_prompt_longer_than_context_is_refused(tiny_model, edgeai_env):
    r = run_cli(["run", "-m", str(tiny_model), "-n", "4"], edgeai_env, input="word " * 3000)
    assert r.returncode == 2
    assert "accepts at most 2047" in r.stderr  # one token of room for the answer
    assert "Traceback" not in r.stderr


def test_interactive_chat_keeps_history(tiny_model, edgeai_env):
    from edgeai.engine import Engine
    from edgeai.options import GenerationOptions

    # What the model answers (greedy) with and without the earlier turns in front.
    eng = Engine.load(tiny_model)

    def reply(*turns: str) -> str:
        roles = ("user", "assistant")
        msgs = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
        return "".join(e.text for e in eng.generate(msgs, GenerationOptions(max_tokens=4)))

    first = reply("hello")
    second = reply("hello", first, "how are you")
    assert second != reply("how are you")  # the history changes this answer
    after_clear = reply("again")
    assert after_clear != reply("hello", first, "how are you", second, "again")

    script = "hello\nhow are you\n/clear\nagain\n/bye\n"
    r = run_cli(["run", "-m", str(tiny_model), "-i", "-n", "4", "--json"], edgeai_env, input=script)
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr
    assert "Traceback" not in r.stderr
    # the second turn saw the first; the turn after /clear saw nothing before it
    assert r.stdout == f"{first}\n{second}\n{after_clear}\n"


def test_ctrl_c_stops_generation_cleanly(tiny_model, edgeai_env):
    proc = subprocess.Popen(
        # MLX's own kernel: slow, and its greedy text for this prompt runs on without an
        # end-of-text token
        [
            sys.executable,
            "-m",
            "edgeai",
            "run",
            "-m",
            str(tiny_model),
            "--kernel",
            "builtin",
            "-n",
            "100000",
            "tell me a story",
        ],
        env=edgeai_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    )
    first = proc.stdout.read(1)  # generation has started
    assert first
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert b"stopped: cancelled" in err


@pytest.mark.slow
def test_real_model_answers_paris_from_the_cli(smollm_dir, edgeai_env):
    r = run_cli(
        ["run", "-m", str(smollm_dir), "--json", "-n", "24", "What is the capital of France?"],
        edgeai_env,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]


def test_user_text_is_never_read_as_rich_markup(tiny_model, edgeai_env, tmp_path):
    """`edgeai show 'foo[/]'` crashed with MarkupError, and hints lost their bracketed parts."""
    r = run_cli(["show", "foo[/]"], edgeai_env)
    assert (
        r.returncode == 2 and "Traceback" not in r.stderr and "unknown model 'foo[/]'" in r.stderr
    ), r.stderr
    r = run_cli(["run", "-m", str(tiny_model), "--policy", "remote", "-n", "2", "hi"], edgeai_env)
    assert (
        "Traceback" not in r.stderr and "add [tiers.<name>] and [policy] remote_tier" in r.stderr
    ), r.stderr
    # Names and paths from the user's files are shown as written, in every command.
    import shutil
    from pathlib import Path

    odd = tmp_path / "odd[bold]dir"
    model = shutil.copytree(tiny_model, odd / "m[red]")
    cfg = Path(edgeai_env["EDGEAI_CONFIG_DIR"])
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "models.toml").write_text(
        f'[models."x[/]y"]\ndescription = "d[/]"\n[models.ok]\nlicense = "[bold]"\n'
        f'sources = [{{ kind = "file", path = "{model}" }}]\n'
    )
    env = {**edgeai_env, "EDGEAI_HOME": str(odd / "home")}
    cases = [
        (["list"], 0, "x[/]y"),
        (["show", "x[/]y"], 0, "d[/]"),
        (["pull", "x[/]y"], 2, "x[/]y"),
        (["pull", "ok"], 0, "m[red]"),
        (["show", "ok"], 0, "m[red]"),
        (["doctor"], 0, "odd[bold]dir"),
        (["run", "-m", str(tiny_model), "-i", "-n", "2"], 0, "/what[/]"),
    ]
    for args, code, shown in cases:
        r = run_cli(args, env, input="/what[/]\n/bye\n" if "-i" in args else None)
        assert r.returncode == code and "Traceback" not in r.stderr, (args, r.stderr)
        assert shown in (r.stdout + r.stderr).replace("\n", ""), (args, r.stdout, r.stderr)
