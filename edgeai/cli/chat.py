"""A conversation with a local model: stream one answer, or keep history in a REPL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from edgeai.cli import render
from edgeai.options import GenerationOptions, Message
from edgeai.types import Answer, Event

REPL_HELP = (
    "commands: /clear forgets the conversation, /bye (or Ctrl-D) quits, Ctrl-C stops an answer"
)


def messages_for(
    text: str, system: str | None = None, history: Iterable[Message] = ()
) -> list[Message]:
    msgs = [Message(role="system", content=system)] if system else []
    msgs.extend(history)
    msgs.append(Message(role="user", content=text))
    return msgs


def stream_to_console(events: Iterator[Event], model: str, *, stream: bool = True) -> Answer:
    """Print text as it arrives; Ctrl-C ends the answer cleanly as 'cancelled'."""
    collected: list[Event] = []
    try:
        for ev in events:
            collected.append(ev)
            if stream and ev.text:
                render.out.print(ev.text, end="", markup=False)
                render.out.file.flush()
    except KeyboardInterrupt:
        close = getattr(events, "close", None)
        if close:
            close()
        collected.append(Event(finish_reason="cancelled"))
    answer = Answer.from_events(collected, model)
    if stream:
        render.out.print()
    return answer


def answer(
    engine,
    messages: list[Message],
    options: GenerationOptions,
    *,
    stream: bool = True,
    adapter: str | None = None,
) -> Answer:
    """Generate one answer locally (with a stored LoRA `adapter`), streaming it when `stream`."""
    return stream_to_console(
        engine.generate(messages, options, adapter=adapter), engine.name, stream=stream
    )


def print_stats(ans: Answer) -> None:
    s = ans.stats
    render.err.print(
        f"[dim]{render.esc(ans.model)} · {render.esc(ans.tier)} · "
        f"{s.prompt_tokens} prompt tokens at {s.prompt_tps:.1f} tok/s · "
        f"{s.generation_tokens} generated at {s.generation_tps:.1f} tok/s · "
        f"peak memory {render.human_bytes(s.peak_memory_bytes)}"
        + (f" · stopped: {ans.finish_reason}" if ans.finish_reason != "stop" else "")
        + "[/]"
    )


def repl(
    engine,
    options: GenerationOptions,
    *,
    system: str | None = None,
    first: str | None = None,
    adapter: str | None = None,
) -> None:
    """Interactive chat that keeps history until /clear or exit."""
    import sys

    history: list[Message] = []
    render.err.print(f"[dim]{render.esc(engine.name)} · {REPL_HELP}[/]")
    pending = first
    while True:
        if pending is None:
            try:
                if sys.stdin.isatty():
                    line = render.out.input("[bold]>>> [/]")
                else:
                    line = sys.stdin.readline()
                    if not line:
                        raise EOFError
            except EOFError:
                render.out.print()
                return
            except KeyboardInterrupt:
                render.out.print()
                continue
        else:
            line, pending = pending, None
        line = line.strip()
        if not line:
            continue
        if line in ("/bye", "/exit", "/quit"):
            return
        if line == "/clear":
            history.clear()
            render.err.print("[dim]conversation cleared[/]")
            continue
        if line.startswith("/"):
            render.err.print(f"[dim]unknown command {render.esc(line.split()[0])}; {REPL_HELP}[/]")
            continue
        msgs = messages_for(line, system, history)
        ans = answer(engine, msgs, options, adapter=adapter)
        history += [Message(role="user", content=line), Message(role="assistant", content=ans.text)]
