"""`edgeai run` (one-shot or chat) and `edgeai doctor`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from edgeai.cli import render


def _read_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    try:
        return sys.stdin.read()
    except (OSError, ValueError):  # closed or non-readable stdin
        return ""


def build_prompt(prompt: str | None, stdin_text: str) -> str:
    """Piped text is context; the argument is the instruction that follows it."""
    parts = [p.strip("\n") for p in (stdin_text, prompt or "") if p and p.strip()]
    return "\n\n".join(parts)


def load_engine(model: str | None, kernel: str | None = None):
    """Resolve a model name (pulling it on first use) or a directory, and load it."""
    from edgeai import config
    from edgeai.engine import Engine

    name = model or config.default_model()
    path = Path(name).expanduser()
    if path.is_dir():
        return Engine.load(path, kernel=kernel)
    from edgeai import store

    model_dir = store.ensure(name, progress=True)
    with render.err.status(f"loading {render.esc(name)}…"):
        return Engine.load(model_dir, name=name, kernel=kernel)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        prompt: Optional[str] = typer.Argument(None, help="The prompt. Omit it for an interactive chat."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name or MLX directory [default: smollm2-135m]"),
        system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt"),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Most tokens to generate [default: 512]"),
        temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy [default: 0]"),
        top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass"),
        top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens"),
        min_p: Optional[float] = typer.Option(None, "--min-p", help="Drop tokens below min_p × top probability"),
        seed: Optional[int] = typer.Option(None, "--seed", help="Random seed"),
        stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)"),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No stats line"),
        interactive: bool = typer.Option(False, "--interactive", "-i", help="Chat even if stdin is not a terminal"),
        kernel: Optional[str] = typer.Option(None, "--kernel", help="auto, builtin or custom"),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="A stored LoRA adapter (see `edgeai adapter list`)"),
        policy: Optional[str] = typer.Option(None, "--policy", help="local-only, auto or remote [default: config, else auto]"),
        explain: bool = typer.Option(False, "--explain", help="Show the route, signals, score, threshold and decision"),
    ) -> None:
        """Answer a prompt with a local model, streaming tokens as they come."""
        from edgeai.cli import chat

        opts = _options(max_tokens, temperature, top_p, top_k, min_p, seed, stop)
        if interactive or (prompt is None and sys.stdin is not None and sys.stdin.isatty()):
            engine = load_engine(model, kernel)
            if adapter:
                engine.adapters.get(adapter)  # refuse an unknown or mismatched adapter up front
            chat.repl(engine, opts, system=system, first=prompt, adapter=adapter)
            return
        text = build_prompt(prompt, _read_stdin())
        if not text:
            from edgeai.errors import InvalidInput

            raise InvalidInput("the prompt is empty", 'give a prompt, e.g. edgeai run "Why is the sky blue?"')
        from edgeai.routing.respond import respond

        messages = chat.messages_for(text, system)
        # The local model loads only if the router or a fallback needs it.
        resp = respond(messages, opts, policy=policy, engine=lambda: load_engine(model, kernel), adapter=adapter)
        streamed = chat.stream_to_console(iter(resp), "", stream=not json_out)
        answer = resp.answer or streamed  # no final answer when cancelled midway
        if json_out:
            render.print_json(answer.to_dict())
        else:
            render.decision(answer, explain)
            if not quiet:
                chat.print_stats(answer)
        if answer.finish_reason == "cancelled":
            raise typer.Exit(130)

    @app.command()
    def doctor(json_out: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
        """Check this machine: platform, MLX backend, memory, store, models, kernels."""
        from edgeai.cli import doctor as doc

        report = doc.report()
        if json_out:
            render.print_json(report)
        else:
            doc.render_report(report)


def _options(max_tokens, temperature, top_p, top_k, min_p, seed, stop):
    """Only the options the user gave; the schema supplies every default."""
    from pydantic import ValidationError

    from edgeai.errors import InvalidInput
    from edgeai.options import GenerationOptions

    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                 min_p=min_p, seed=seed, stop=stop or None)
    try:
        return GenerationOptions(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = "--" + str(err["loc"][0]).replace("_", "-")
        raise InvalidInput(f"{field}: {err['msg']}") from None
