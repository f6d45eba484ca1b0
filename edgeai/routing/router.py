"""Routes and policy → which tier answers. The only place in edgeai that decides tiers.

Two decisions, both here:

1. `Router.decide(prompt, policy)` — before generating: the policy and, in `auto`, the
   route whose example utterances are most similar to the prompt (MiniLM embeddings,
   cosine, best example per route) say where to start: `local` or a remote tier.
2. `should_escalate(decision, score, threshold, flags)` — after a gated local answer:
   escalate on a hard flag (cut at max tokens, repetition loop), or when no route claimed
   the prompt and P(correct) < threshold — if a remote tier exists. Prompts that matched a
   local route are trusted to the local model (the score is reported, not applied).

Policies: `local-only` (nothing leaves the machine: no router model download, no remote
call), `auto` (router, then confidence gate), `remote` (always the remote tier).

Config (config.toml; all optional — shipped routes live in `edgeai/routing/data/routes.json`)::

    [policy]
    mode = "auto"                 # local-only | auto | remote   (CLI --policy wins)
    remote_tier = "cloud"         # a [tiers.<name>] table, see edgeai.routing.cloud
    threshold = 0.5               # escalate below this P(correct) (default: calibrated)

    [router]
    min_similarity = 0.40         # below this, no route matches: start local, gate

    [routes.legal]                # add a route, or replace a shipped one by its name
    tier = "remote"               # "local", "remote" (= policy.remote_tier) or a tier name
    examples = ["Is this clause in my lease enforceable?", "..."]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from edgeai.config import cache_dir, load_config
from edgeai.errors import InvalidInput

POLICIES = ("local-only", "auto", "remote")


@dataclass
class Route:
    name: str
    tier: str
    examples: list[str]


@dataclass
class Decision:
    """Where to start and whether to gate.

    Attributes:
        policy: the policy in force.
        tier: "local" or the remote tier name to generate with first.
        gate: score the local answer before showing it and escalate if needed.
        remote: the remote tier escalation would use (None: none configured / allowed).
        route: the matched route name, if any.
        similarity: cosine similarity to the route's closest example.
        reasons: why, in words.
    """

    policy: str
    tier: str
    gate: bool
    remote: str | None
    route: str | None = None
    similarity: float | None = None
    reasons: list[str] = field(default_factory=list)


def shipped_routes() -> tuple[dict[str, Route], float]:
    data = json.loads(resources.files("edgeai.routing").joinpath("data/routes.json").read_text())
    routes = {n: Route(n, r["tier"], list(r["examples"])) for n, r in data["routes"].items()}
    return routes, float(data["min_similarity"])


def routes_from_config(cfg: dict[str, Any]) -> tuple[dict[str, Route], float]:
    """Shipped routes, overridden/extended by config.toml's [routes.*]; and min similarity."""
    routes, min_sim = shipped_routes()
    for name, r in (cfg.get("routes") or {}).items():
        if not isinstance(r, dict) or not r.get("examples"):
            raise InvalidInput(
                f"config: routes.{name} needs a list of examples",
                "see `edgeai.routing.router` docs",
            )
        routes[name] = Route(name, str(r.get("tier", "remote")), [str(e) for e in r["examples"]])
    min_sim = float((cfg.get("router") or {}).get("min_similarity", min_sim))
    return routes, min_sim


class Router:
    """Matches prompts to routes by example similarity and applies the policy.

    Args:
        routes: route name → Route.
        remote_tier: the default remote tier name (None when none is configured).
        min_similarity: below this best similarity no route applies.
        encoder: an `edgeai.routing.embed.Encoder`-like object (loaded lazily when None).
    """

    def __init__(
        self,
        routes: dict[str, Route],
        remote_tier: str | None,
        min_similarity: float = 0.4,
        encoder=None,
    ):
        self.routes = routes
        self.remote_tier = remote_tier
        self.min_similarity = min_similarity
        self._encoder = encoder
        self._matrix: np.ndarray | None = None
        self._owner: list[str] = []

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None = None, *, encoder=None) -> Router:
        """The router for config.toml (`edgeai.config.load_config()` when cfg is None)."""
        if cfg is None:
            cfg = load_config()
        routes, min_sim = routes_from_config(cfg)
        return cls(routes, remote_tier_from_config(cfg), min_sim, encoder=encoder)

    # -- matching -------------------------------------------------------------------------

    def _examples(self) -> tuple[np.ndarray, list[str]]:
        if self._matrix is None:
            owner, texts = [], []
            for r in self.routes.values():
                owner += [r.name] * len(r.examples)
                texts += r.examples
            self._matrix = _cached_embeddings(self.encoder, texts)
            self._owner = owner
        return self._matrix, self._owner

    @property
    def encoder(self):
        if self._encoder is None:
            from edgeai.routing.embed import default_encoder

            self._encoder = default_encoder()
        return self._encoder

    def match(self, text: str) -> tuple[str | None, float, dict[str, float]]:
        """(best route or None, its similarity, best similarity per route)."""
        matrix, owner = self._examples()
        q = np.asarray(self.encoder.encode([text]))[0]
        sims = matrix @ q
        per: dict[str, float] = {}
        for name, s in zip(owner, sims):
            per[name] = max(per.get(name, -1.0), float(s))
        best = max(per, key=per.get) if per else None
        if best is None or per[best] < self.min_similarity:
            return None, per.get(best, 0.0) if best else 0.0, per
        return best, per[best], per

    # -- policy ---------------------------------------------------------------------------

    def decide(self, prompt: str, policy: str) -> Decision:
        """Where the answer to `prompt` starts, under `policy` (see the module docstring)."""
        if policy not in POLICIES:
            raise InvalidInput(f"unknown policy {policy!r}", f"use one of: {', '.join(POLICIES)}")
        if policy == "local-only":
            return Decision(policy, "local", gate=False, remote=None, reasons=["policy local-only"])
        if policy == "remote":
            if not self.remote_tier:
                raise InvalidInput(
                    "policy remote needs a remote tier",
                    "add [tiers.<name>] and [policy] remote_tier to config.toml",
                )
            return Decision(
                policy,
                self.remote_tier,
                gate=False,
                remote=self.remote_tier,
                reasons=["policy remote"],
            )
        # Gating holds the local answer back until scored: pointless with nowhere to escalate.
        gate = self.remote_tier is not None
        try:
            route, sim, _ = self.match(prompt)
        except Exception as e:  # a missing encoder must not stop local answers
            return Decision(
                policy,
                "local",
                gate=gate,
                remote=self.remote_tier,
                reasons=[f"router unavailable ({type(e).__name__}); confidence gate only"],
            )
        if route is None:
            return Decision(
                policy,
                "local",
                gate=gate,
                remote=self.remote_tier,
                route=None,
                similarity=sim,
                reasons=[
                    f"no route matched (best similarity {sim:.2f} < {self.min_similarity:.2f})"
                ],
            )
        tier = self.routes[route].tier
        tier = self.remote_tier if tier == "remote" else tier
        why = f"route {route} (similarity {sim:.2f})"
        if tier and tier != "local":
            return Decision(
                policy,
                tier,
                gate=False,
                remote=tier,
                route=route,
                similarity=sim,
                reasons=[f"{why} → {tier}"],
            )
        reason = (
            f"{why} → local"
            if tier
            else f"{why} wants a remote tier but none is configured → local"
        )
        return Decision(
            policy,
            "local",
            gate=gate,
            remote=self.remote_tier,
            route=route,
            similarity=sim,
            reasons=[reason],
        )


def remote_tier_from_config(cfg: dict[str, Any]) -> str | None:
    """[policy].remote_tier, or the only declared tier, or None."""
    tiers = cfg.get("tiers") or {}
    name = (cfg.get("policy") or {}).get("remote_tier")
    if name:
        if name not in tiers:
            raise InvalidInput(
                f"config: policy.remote_tier is {name!r} but there is no [tiers.{name}]"
            )
        return name
    return next(iter(tiers)) if len(tiers) == 1 else None


def policy_from_config(cfg: dict[str, Any], override: str | None = None) -> str:
    policy = override or (cfg.get("policy") or {}).get("mode") or "auto"
    if policy not in POLICIES:
        raise InvalidInput(f"unknown policy {policy!r}", f"use one of: {', '.join(POLICIES)}")
    return policy


def should_escalate(
    decision: Decision, score: float, threshold: float, flags: list[str]
) -> tuple[bool, str]:
    """After a gated local answer: escalate or keep it, and why.

    A prompt that matched a *local* route (chit-chat, rewriting, extraction) is trusted to the
    local model: only a hard flag escalates it. The score threshold gates the rest — open
    questions no route claims — which is what the score was calibrated on (`edgeai eval`).
    """
    if not decision.gate:
        return False, "not gated"
    low = score < threshold and decision.route is None
    if not (low or flags):
        if decision.route is not None:
            return (
                False,
                f"route {decision.route} is trusted locally "
                f"(score {score:.2f} reported only) → kept local",
            )
        return False, f"score {score:.2f} ≥ threshold {threshold:.2f} → kept local"
    why = (
        f"score {score:.2f} < threshold {threshold:.2f}"
        if low
        else "hard flag: " + ", ".join(flags)
    )
    if not decision.remote:
        return False, f"{why}, but no remote tier is configured → kept local (low confidence)"
    return True, f"{why} → escalated to {decision.remote}"


def _cached_embeddings(encoder, texts: list[str]) -> np.ndarray:
    """Embeddings of the route examples, cached on disk by content hash (they rarely change)."""
    h = hashlib.sha256(("\x00".join(texts) + type(encoder).__name__).encode()).hexdigest()[:16]
    path = cache_dir() / "router" / f"{h}.npy"
    if path.exists():
        m = np.load(path)
        if m.shape[0] == len(texts):
            return m
    m = np.asarray(encoder.encode(texts), dtype=np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, m)
    except OSError:
        pass  # a read-only home only costs re-embedding
    return m
