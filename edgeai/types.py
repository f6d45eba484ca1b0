"""The one result type: token events streamed by every tier, and the answer they add up to.

The engine and the remote providers yield `Event`s; the server serializes them; the CLI,
bench and eval render them. `Answer` is the same information gathered after the stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stats:
    """Counts and timings of one generation (seconds, bytes)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    ttft_seconds: float = 0.0
    peak_memory_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache instead of prefilled

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # The first token comes out of prefill; the rest are timed as decoding.
        n = self.generation_tokens - 1
        return n / self.generation_seconds if n > 0 and self.generation_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tps"] = round(self.prompt_tps, 3)
        d["generation_tps"] = round(self.generation_tps, 3)
        return d


@dataclass
class Event:
    """One streamed piece of an answer.

    Attributes:
        text: new text since the previous event (may be empty while a multi-byte
            character or a possible stop string is held back).
        token: the token id, or None for remote tiers that do not expose ids.
        logprob: log-probability of the sampled token under the model (natural log).
        entropy: entropy (nats) of the next-token distribution at this step.
        top_logprobs: the most likely alternatives as (token id, logprob) pairs.
        finish_reason: set on the last event only: "stop", "length" or "cancelled".
        stats: set on the last event only.
        tier: which tier produced it ("local" or a remote tier name).
        hidden: on the last event of a local answer whose confidence probe reads hidden
            states: the tapped layers' states (numpy float32; see edgeai.engine.hidden).
    """

    text: str = ""
    token: int | None = None
    logprob: float | None = None
    entropy: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    stats: Stats | None = None
    tier: str = "local"
    hidden: Any = None


@dataclass
class Answer:
    """A finished answer, whichever tier produced it, and why that tier.

    Attributes:
        text: the full answer text.
        model: the model that produced it.
        tier: "local" or the remote tier name.
        finish_reason: "stop", "length" or "cancelled".
        stats: token counts, timings and peak memory.
        logprobs: per-token log-probabilities (empty for tiers without them).
        entropies: per-token entropies.
        tokens: per-token ids (local tier).
        confidence: calibrated P(correct) of the local answer, when scored.
        threshold: the escalation threshold in force, when scored.
        route: the router's route name, when routed.
        reasons: human-readable reasons for the tier decision.
        signals: the raw confidence signals, when scored.
        explanation: the signals that moved the confidence most, in words, when scored.
        decision: what the policy did: "local", "kept-local", "escalated", "remote",
            "fallback-local" (remote failed) — see edgeai.routing.respond.
    """

    text: str
    model: str
    tier: str = "local"
    finish_reason: str = "stop"
    stats: Stats = field(default_factory=Stats)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    confidence: float | None = None
    threshold: float | None = None
    route: str | None = None
    reasons: list[str] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)
    decision: str | None = None
    explanation: list[str] = field(default_factory=list)
    hidden: Any = None  # the finishing Event's hidden states (not serialized)

    @classmethod
    def from_events(cls, events: Iterable[Event], model: str) -> Answer:
        """Drain an event stream into an Answer."""
        ans = cls(text="", model=model)
        parts: list[str] = []
        for ev in events:
            parts.append(ev.text)
            ans.tier = ev.tier
            if ev.token is not None:
                ans.tokens.append(ev.token)
            if ev.logprob is not None:
                ans.logprobs.append(ev.logprob)
                ans.entropies.append(ev.entropy if ev.entropy is not None else 0.0)
                ans.top_logprobs.append(ev.top_logprobs)
            if ev.finish_reason is not None:
                ans.finish_reason = ev.finish_reason
            if ev.stats is not None:
                ans.stats = ev.stats
            if ev.hidden is not None:
                ans.hidden = ev.hidden
        ans.text = "".join(parts)
        return ans

    def to_dict(self, *, include_tokens: bool = False) -> dict:
        d = {
            "text": self.text,
            "model": self.model,
            "tier": self.tier,
            "finish_reason": self.finish_reason,
            "tokens": self.stats.generation_tokens,
            "stats": self.stats.to_dict(),
            "confidence": self.confidence,
            "threshold": self.threshold,
            "route": self.route,
            "reasons": list(self.reasons),
            "signals": dict(self.signals),
            "explanation": list(self.explanation),
            "decision": self.decision,
        }
        if include_tokens:
            d["token_ids"] = list(self.tokens)
            d["logprobs"] = list(self.logprobs)
        return d
