"""One call from prompt to answer: route, generate, score, escalate — streamed.

`respond(messages, options, policy=..., engine=...)` returns a `Response`: iterate it for the
`Event`s to show, then read `response.answer` (an `Answer` with tier, confidence, threshold,
route, reasons, signals and decision). `edgeai run` and `edgeai serve` both call it.

Streaming, by decision (the tier decisions themselves are made in `edgeai.routing.router`):

| decision        | what the caller sees                                                  |
|-----------------|-----------------------------------------------------------------------|
| local-only      | local tokens live; scored afterwards (informational, never escalated) |
| route → remote  | remote tokens live; on failure before the first token, local live     |
| auto, gated     | the local answer is generated and scored *before* any token is shown: |
|                 | kept → its tokens are released at once; escalated → remote tokens     |
|                 | live; remote failure → the held local tokens, flagged low-confidence  |

Holding the gated local answer back is deliberate: showing it and then replacing it would
make the user read an answer we already decided not to trust. Gating happens only when a
remote tier is configured; prompts that matched a local route escalate only on a hard flag
(see `edgeai.routing.router.should_escalate`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from edgeai.config import load_config
from edgeai.options import GenerationOptions, Message
from edgeai.routing import cloud, confidence
from edgeai.routing.router import Decision, Router, policy_from_config, should_escalate
from edgeai.types import Answer, Event

EngineLike = Any  # edgeai.engine.Engine, or a zero-argument callable returning one


class Response:
    """The stream of Events for one request; `answer` is set once the stream ends.

    Attributes:
        decision: the router's decision made before generating.
        answer: the final Answer (None until the iteration finished).
    """

    def __init__(self, run: Callable[[Response], Iterator[Event]], decision: Decision):
        self.decision = decision
        self.answer: Answer | None = None
        self._run = run

    def __iter__(self) -> Iterator[Event]:
        yield from self._run(self)

    def result(self) -> Answer:
        """Drain the stream (if not yet) and return the Answer."""
        if self.answer is None:
            for _ in self:
                pass
        assert self.answer is not None
        return self.answer


def respond(
    messages: Sequence[Message | dict] | str,
    options: GenerationOptions | None = None,
    *,
    policy: str | None = None,
    engine: EngineLike = None,
    config: dict[str, Any] | None = None,
    router: Router | None = None,
    scorer: confidence.Scorer | None = None,
    threshold: float | None = None,
    transport=None,
    cancel: threading.Event | None = None,
    adapter: str | None = None,
) -> Response:
    """Answer `messages` under `policy`, streaming Events (see the module docstring).

    Args:
        messages: chat messages, or a single user prompt string.
        options: generation options (defaults from `GenerationOptions`).
        policy: "local-only", "auto" or "remote" (default: config [policy].mode or auto).
        engine: the local Engine, or a callable that loads it on first need.
        config: the parsed config.toml (default: `load_config()`).
        router: a Router (default: from config; never built under local-only).
        scorer: the confidence scorer (default: for the engine's model).
        threshold: escalation threshold (default: config [policy].threshold, else the
            scorer's calibrated one).
        transport: httpx transport for remote calls (tests).
        cancel: stops local generation when set.
        adapter: a stored LoRA adapter for the local model (see edgeai.engine.lora).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    options = options or GenerationOptions()
    cfg = load_config() if config is None else config
    pol = policy_from_config(cfg, policy)
    if pol == "local-only":
        # Nothing that could reach the network is even constructed.
        decision = Decision(pol, "local", gate=False, remote=None, reasons=["policy local-only"])
    elif pol == "auto" and not cfg.get("tiers") and router is None:
        # Nowhere to escalate: skip the router and stream live (scored afterwards).
        decision = Decision(
            pol,
            "local",
            gate=False,
            remote=None,
            reasons=["no remote tier configured: answered locally, scored"],
        )
    else:
        router = router or Router.from_config(cfg)
        decision = router.decide(_last_user_text(messages), pol)
    tiers = cloud.tiers_from_config(cfg) if pol != "local-only" else {}
    if threshold is None:
        threshold = (cfg.get("policy") or {}).get("threshold")
    ctx = _Context(list(messages), options, engine, tiers, scorer, threshold, transport, cancel)
    ctx.adapter = adapter
    return Response(lambda resp: _run(resp, ctx), decision)


class _Context:
    def __init__(self, messages, options, engine, tiers, scorer, threshold, transport, cancel):
        self.messages, self.options, self._engine = messages, options, engine
        self.tiers, self._scorer, self.threshold = tiers, scorer, threshold
        self.transport, self.cancel = transport, cancel
        self.adapter: str | None = None

    def engine(self):
        if self._engine is None:
            raise cloud.EdgeAIError("no local model loaded", "pass a model to answer locally")
        if callable(self._engine) and not hasattr(self._engine, "generate"):
            self._engine = self._engine()
        return self._engine

    def scorer(self) -> confidence.Scorer:
        if self._scorer is None:
            eng = self.engine()
            # A real engine is tapped for the probe here; the server's taps at model load.
            tap = getattr(eng, "tap_hidden", None)
            self._scorer = confidence.tap_for_gate(eng) if tap else confidence.load_scorer(eng.name)
        return self._scorer

    def local(self) -> Iterator[Event]:
        self.scorer()  # before generating: the scorer decides what the decode loop records
        # Two alternatives per token give the first-token margin signal.
        opts = self.options.model_copy(update={"top_logprobs": max(self.options.top_logprobs, 2)})
        extra = {"adapter": self.adapter} if self.adapter else {}
        return self.engine().generate(self.messages, opts, cancel=self.cancel, **extra)

    def model_of(self, tier: str) -> str:
        return self.tiers[tier].model if tier in self.tiers else tier

    def remote(self, name: str) -> Iterator[Event]:
        if name not in self.tiers:
            raise cloud.RemoteError(
                f"remote tier {name!r} is not configured", f"add [tiers.{name}] to config.toml"
            )
        return cloud.stream(self.tiers[name], self.messages, self.options, transport=self.transport)


def _run(resp: Response, ctx: _Context) -> Iterator[Event]:
    d = resp.decision
    reasons = list(d.reasons)
    if d.tier != "local":
        shown: list[Event] = []
        try:
            for ev in ctx.remote(d.tier):
                shown.append(ev)
                yield ev
            resp.answer = _finish(shown, ctx.model_of(d.tier), d, reasons, "remote")
            return
        except cloud.RemoteError as e:
            reasons.append(f"remote tier {d.tier} failed: {e.message}")
            if any(ev.text for ev in shown):
                yield Event(finish_reason="error", tier=d.tier)
                resp.answer = _finish(
                    shown + [Event(finish_reason="error", tier=d.tier)],
                    ctx.model_of(d.tier),
                    d,
                    reasons,
                    "remote",
                )
                return
        yield from _live_local(resp, ctx, d, reasons, "fallback-local")
        return
    if not d.gate:
        yield from _live_local(resp, ctx, d, reasons, "local")
        return
    yield from _gated(resp, ctx, d, reasons)


def _live_local(
    resp: Response, ctx: _Context, d: Decision, reasons: list[str], decision: str
) -> Iterator[Event]:
    """Stream the local answer as it comes; score it once it is complete."""
    local: list[Event] = []
    for ev in ctx.local():
        local.append(ev)
        yield ev
    resp.answer = _scored(local, ctx, d, reasons, decision)


def _gated(resp: Response, ctx: _Context, d: Decision, reasons: list[str]) -> Iterator[Event]:
    held = list(ctx.local())  # scored before anything is shown
    ans = _scored(held, ctx, d, reasons, "kept-local")
    flags = confidence.hard_flags(ans.signals)
    if ans.finish_reason == "cancelled":
        escalate, why = False, "cancelled"
    else:
        escalate, why = should_escalate(d, ans.confidence, ans.threshold, flags)
    ans.reasons.append(why)
    if not escalate:
        yield from held
        resp.answer = ans
        return
    shown: list[Event] = []
    try:
        for ev in ctx.remote(d.remote):
            shown.append(ev)
            yield ev
    except cloud.RemoteError as e:
        if any(ev.text for ev in shown):  # the remote stream broke midway: keep what was shown
            ans.reasons.append(
                f"remote tier {d.remote} failed: {e.message}; keeping its partial answer"
            )
            yield Event(finish_reason="error", tier=d.remote)
            resp.answer = _finish(
                shown + [Event(finish_reason="error", tier=d.remote)],
                ctx.model_of(d.remote),
                d,
                ans.reasons,
                "escalated",
                ans,
            )
            return
        ans.reasons.append(
            f"remote tier {d.remote} failed: {e.message}; "
            "returning the local answer (low confidence)"
        )
        ans.decision = "fallback-local"
        yield from held
        resp.answer = ans
        return
    resp.answer = _finish(shown, ctx.model_of(d.remote), d, ans.reasons, "escalated", ans)


def _scored(
    events: list[Event], ctx: _Context, d: Decision, reasons: list[str], decision: str
) -> Answer:
    eng = ctx.engine()
    ans = Answer.from_events(events, eng.name)
    adapter = ctx.adapter or getattr(eng, "adapter", None)  # the server's engine carries it
    why = confidence.score_answer(ans, ctx.scorer(), ctx.threshold, adapter=adapter)
    ans.route, ans.decision = d.route, decision
    ans.reasons = list(reasons) + why
    return ans


def _finish(
    events: list[Event],
    model: str,
    d: Decision,
    reasons: list[str],
    decision: str,
    local: Answer | None = None,
) -> Answer:
    ans = Answer.from_events(events, model)  # its tier comes from the events
    ans.route, ans.decision, ans.reasons = d.route, decision, list(reasons)
    if local is not None:  # keep what the gate saw
        ans.confidence, ans.threshold, ans.signals = (
            local.confidence,
            local.threshold,
            local.signals,
        )
        ans.explanation = list(local.explanation)
    return ans


def _last_user_text(messages: Sequence[Message | dict]) -> str:
    for m in reversed(messages):
        role = m.role if isinstance(m, Message) else m.get("role")
        if role == "user":
            return m.content if isinstance(m, Message) else str(m.get("content", ""))
    return ""
