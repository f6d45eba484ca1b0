"""`edgeai run` (one-shot or chat) and `edgeai doctor`."""

from __future__ import annotations

import sys

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
    from edgeai import store
    from edgeai.engine import Engine

    with render.progress() as on_progress:
        name, model_dir = store.locate(model, on_progress)
    with render.err.status(f"loading {render.esc(name)}…"):
        return Engine.load(model_dir, name=name, kernel=kernel)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        prompt: str | None = typer.Argument(
            None, help="The prompt. Omit it for an interactive chat."
        ),
        model: str | None = typer.Option(
            None, "--model", "-m", help="Model name or MLX directory [default: smollm2-135m]"
        ),
        system: str | None = typer.Option(None, "--system", "-s", help="System prompt"),
        max_tokens: int | None = typer.Option(
            None, "--max-tokens", "-n", help="Most tokens to generate [default: 512]"
        ),
        temperature: float | None = typer.Option(
            None, "--temperature", "-t", help="0 = greedy [default: 0]"
        ),
        top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass"),
        top_k: int | None = typer.Option(None, "--top-k", help="Keep the k most likely tokens"),
        min_p: float | None = typer.Option(
            None, "--min-p", help="Drop tokens below min_p × top probability"
        ),
        seed: int | None = typer.Option(None, "--seed", help="Random seed"),
        stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)"),
        json_out: bool = typer.Option(
            False, "--json", help="Print one JSON object instead of streaming"
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No stats line"),
        interactive: bool = typer.Option(
            False, "--interactive", "-i", help="Chat even if stdin is not a terminal"
        ),
        kernel: str | None = typer.Option(None, "--kernel", help="auto, builtin or custom"),
        adapter: str | None = typer.Option(
            None, "--adapter", help="A stored LoRA adapter (see `edgeai adapter list`)"
        ),
        policy: str | None = typer.Option(
            None, "--policy", help="local-only, auto or remote [default: config, else auto]"
        ),
        explain: bool = typer.Option(
            False, "--explain", help="Show the route, signals, score, threshold and decision"
        ),
        json_schema: str | None = typer.Option(
            None,
            "--json-schema",
            help="Answer with JSON valid against this JSON Schema file (local model)",
        ),
        json_object: bool = typer.Option(
            False, "--json-object", help="Answer with one JSON object (local model)"
        ),
    ) -> None:
        """Answer a prompt with a local model, streaming tokens as they come."""
        from edgeai.cli import chat

        opts = _options(max_tokens, temperature, top_p, top_k, min_p, seed, stop)
        constraint = _constraint(json_schema, json_object)
        chatting = interactive or (prompt is None and sys.stdin is not None and sys.stdin.isatty())
        if constraint is not None and chatting:
            from edgeai.errors import InvalidInput

            raise InvalidInput(
                "--json-schema/--json-object answer one prompt, not a chat",
                'give the prompt, e.g. edgeai run --json-object "List three colors"',
            )
        if interactive or (prompt is None and sys.stdin is not None and sys.stdin.isatty()):
            engine = load_engine(model, kernel)
            if adapter:
                engine.adapters.get(adapter)  # refuse an unknown or mismatched adapter up front
            chat.repl(engine, opts, system=system, first=prompt, adapter=adapter)
            return
        text = build_prompt(prompt, _read_stdin())
        if not text:
            from edgeai.errors import InvalidInput

            raise InvalidInput(
                "the prompt is empty", 'give a prompt, e.g. edgeai run "Why is the sky blue?"'
            )
        from edgeai.routing.respond import respond

        messages = chat.messages_for(text, system)
        if constraint is not None:  # the grammar needs the local model's tokens: no routing
            from edgeai.engine import constrain

            engine = load_engine(model, kernel)
            events = constrain.generate(engine, messages, opts, constraint, adapter)
            answer = chat.stream_to_console(events, engine.name, stream=not json_out)
        else:
            # The local model loads only if the router or a fallback needs it.
            resp = respond(
                messages,
                opts,
                policy=policy,
                engine=lambda: load_engine(model, kernel),
                adapter=adapter,
            )
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


def _constraint(schema_path: str | None, json_object: bool):
    """The grammar --json-schema / --json-object ask for (None without either)."""
    if schema_path is None and not json_object:
        return None
    from edgeai.engine import constrain
    from edgeai.errors import InvalidInput

    if schema_path is not None and json_object:
        raise InvalidInput("--json-schema and --json-object exclude each other", "give one of them")
    if schema_path is not None:
        return constrain.schema_file(schema_path)
    return constrain.json_object()


def _options(max_tokens, temperature, top_p, top_k, min_p, seed, stop):
    """Only the options the user gave; the schema supplies every default."""
    from pydantic import ValidationError

    from edgeai.errors import InvalidInput
    from edgeai.options import GenerationOptions

    given = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        stop=stop or None,
    )
    try:
        return GenerationOptions(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = "--" + str(err["loc"][0]).replace("_", "-")
        raise InvalidInput(f"{field}: {err['msg']}") from None
