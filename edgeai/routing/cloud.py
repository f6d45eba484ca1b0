"""Remote tiers: OpenAI-compatible chat endpoints and Anthropic's Messages API, streamed.

A tier is configured in config.toml; its API key is read from the environment variable the
tier names, at call time, and never written anywhere (errors are scrubbed of it)::

    [tiers.cloud]                      # the tier's name, used by routes and the policy
    kind = "openai"                    # "openai" (any OpenAI-compatible server) or "anthropic"
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"     # name of the env var holding the key (optional for
                                       # keyless servers such as a local vLLM / Ollama)
    timeout = 30                       # seconds per read / connect
    retries = 2                        # extra attempts on connect errors, timeouts, 429, 5xx
    max_tokens = 1024                  # cap on the remote answer (default: the request's)

Providers yield the same `Event`s as the local engine (tier = the tier name; no logprobs),
so everything downstream renders either the same way. Retries happen only before the first
token: a stream that breaks midway raises `RemoteError`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from edgeai.errors import EdgeAIError
from edgeai.keys import clean, scrub
from edgeai.options import GenerationOptions, Message
from edgeai.types import Event, Stats

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}


class RemoteError(EdgeAIError):
    """A remote tier failed (after retries). The message never contains the API key."""

    exit_code = 6


@dataclass(frozen=True)
class Tier:
    """One remote tier from config.toml (see the module docstring)."""

    name: str
    kind: str
    base_url: str
    model: str
    api_key_env: str | None = None
    timeout: float = 30.0
    retries: int = 2
    max_tokens: int | None = None
    backoff: float = 0.5

    def api_key(self) -> str | None:
        """The key from `api_key_env`, stripped (None when unset or blank).

        Raises:
            RemoteError: it holds a character an HTTP header cannot carry (the message names
                the variable, never the value).
        """
        raw = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not raw:
            return None
        return clean(raw, f"environment variable {self.api_key_env}", RemoteError) or None


def tiers_from_config(cfg: dict[str, Any]) -> dict[str, Tier]:
    """The remote tiers declared under `[tiers.<name>]` in config.toml (each checked against
    `edgeai.config.TierConfig`, also when `cfg` did not come from `load_config`)."""
    from pydantic import ValidationError

    from edgeai.config import TierConfig, schema_error

    out: dict[str, Tier] = {}
    for name, t in (cfg.get("tiers") or {}).items():
        try:
            tc = TierConfig.model_validate(t)
        except ValidationError as e:
            raise schema_error(e, "config", ("tiers", name)) from None
        out[name] = Tier(
            name=name,
            kind=tc.kind,
            base_url=tc.base_url.rstrip("/"),
            model=tc.model,
            api_key_env=tc.api_key_env,
            timeout=tc.timeout,
            retries=tc.retries,
            max_tokens=tc.max_tokens,
            backoff=tc.backoff,
        )
    return out


def stream(
    tier: Tier,
    messages: Sequence[Message | dict],
    options: GenerationOptions,
    transport: httpx.BaseTransport | None = None,
) -> Iterator[Event]:
    """Stream the tier's answer to `messages` as Events (the last has finish_reason, stats).

    Args:
        tier: the remote tier.
        messages: the chat so far.
        options: sampling options (max_tokens, temperature, top_p, stop are forwarded).
        transport: an httpx transport (tests).

    Raises:
        RemoteError: the endpoint failed after the allowed retries, or the stream broke.
    """
    raw = os.environ.get(tier.api_key_env) if tier.api_key_env else None
    key = tier.api_key()
    if tier.api_key_env and not key:
        raise RemoteError(
            f"remote tier {tier.name!r}: environment variable {tier.api_key_env} is not set",
            f"export {tier.api_key_env}=… or use --policy local-only",
        )
    msgs = [m.model_dump() if isinstance(m, Message) else dict(m) for m in messages]
    url, headers, body = (_anthropic if tier.kind == "anthropic" else _openai)(
        tier, msgs, options, key
    )
    parse = _parse_anthropic if tier.kind == "anthropic" else _parse_openai
    timeout = httpx.Timeout(tier.timeout, connect=min(tier.timeout, 10.0))
    try:
        with httpx.Client(timeout=timeout, transport=transport) as client:
            yield from _with_retries(client, tier, url, headers, body, parse)
    except RemoteError as e:
        raise RemoteError(scrub(e.message, raw, key), e.hint and scrub(e.hint, raw, key)) from None
    except Exception as e:  # anything else from the HTTP stack or a malformed reply: one line too
        raise RemoteError(
            scrub(f"remote tier {tier.name!r}: {type(e).__name__}: {e}", raw, key)
        ) from None


def _with_retries(
    client: httpx.Client, tier: Tier, url: str, headers: dict, body: dict, parse
) -> Iterator[Event]:
    retries = max(0, tier.retries)  # at least one attempt, whatever a caller built
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            with client.stream("POST", url, headers=headers, json=body) as resp:
                if resp.status_code != 200:
                    detail = _error_detail(resp)
                    if resp.status_code in _RETRY_STATUS and not last:
                        _sleep(tier, attempt, resp.headers.get("retry-after"))
                        continue
                    hint = (
                        "check the key in $" + tier.api_key_env
                        if resp.status_code in (401, 403) and tier.api_key_env
                        else None
                    )
                    raise RemoteError(
                        f"remote tier {tier.name!r}: HTTP {resp.status_code}: {detail}", hint
                    )
                yield from _events(tier, resp, parse)
                return
        except httpx.HTTPError as e:  # transport trouble: connect, read, timeouts, broken streams
            if not last and not isinstance(e, _MidStream):
                _sleep(tier, attempt, None)
                continue
            raise RemoteError(
                f"remote tier {tier.name!r}: {type(e).__name__}: {e}",
                "check the tier's base_url and that the server is up",
            ) from None


class _MidStream(httpx.RemoteProtocolError):
    """The stream broke after tokens were yielded: not retryable."""


def _events(tier: Tier, resp: httpx.Response, parse) -> Iterator[Event]:
    stats = Stats()
    t0 = time.perf_counter()
    finish = None
    n = 0
    try:
        for data in _sse(resp):
            text, fin, usage = parse(data)
            if usage:
                stats.prompt_tokens = usage.get(
                    "prompt_tokens", usage.get("input_tokens", stats.prompt_tokens)
                )
                stats.generation_tokens = usage.get(
                    "completion_tokens", usage.get("output_tokens", 0)
                )
            if text:
                if n == 0:
                    stats.ttft_seconds = stats.prompt_seconds = time.perf_counter() - t0
                n += 1
                yield Event(text=text, tier=tier.name)
            finish = fin or finish
    except (httpx.TimeoutException, httpx.TransportError) as e:
        if n:
            raise _MidStream(f"stream broke after {n} chunks: {type(e).__name__}") from None
        raise
    if finish is None:
        raise RemoteError(f"remote tier {tier.name!r}: the stream ended without a finish reason")
    stats.generation_tokens = stats.generation_tokens or n
    stats.generation_seconds = time.perf_counter() - t0 - stats.prompt_seconds
    yield Event(finish_reason=finish, stats=stats, tier=tier.name)


def _sse(resp: httpx.Response) -> Iterator[dict]:
    """The JSON payloads of a server-sent-event stream (`data:` lines; `[DONE]` ends it)."""
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except json.JSONDecodeError:
            raise RemoteError(f"malformed event in the stream: {payload[:80]!r}") from None


# -- wire formats -------------------------------------------------------------------------


def _openai(tier: Tier, msgs: list[dict], o: GenerationOptions, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, Any] = {
        "model": tier.model,
        "messages": msgs,
        "stream": True,
        "max_tokens": min(o.max_tokens, tier.max_tokens or o.max_tokens),
        "temperature": o.temperature,
        "top_p": o.top_p,
        "stream_options": {"include_usage": True},
    }
    if o.stop:
        body["stop"] = o.stop
    return f"{tier.base_url}/chat/completions", headers, body


def _parse_openai(d: dict) -> tuple[str, str | None, dict | None]:
    if "error" in d:
        raise RemoteError(f"remote error: {str(d['error'])[:200]}")
    text, fin = "", None
    for ch in d.get("choices") or []:
        text += (ch.get("delta") or {}).get("content") or ""
        if ch.get("finish_reason"):
            fin = "length" if ch["finish_reason"] == "length" else "stop"
    return text, fin, d.get("usage")


def _anthropic(tier: Tier, msgs: list[dict], o: GenerationOptions, key: str | None):
    system = "\n".join(m["content"] for m in msgs if m["role"] == "system")
    headers = {"anthropic-version": "2023-06-01"}
    if key:
        headers["x-api-key"] = key
    body: dict[str, Any] = {
        "model": tier.model,
        "stream": True,
        "messages": [m for m in msgs if m["role"] != "system"],
        "max_tokens": min(o.max_tokens, tier.max_tokens or o.max_tokens),
        "temperature": min(o.temperature, 1.0),
    }
    if system:
        body["system"] = system
    if o.stop:
        body["stop_sequences"] = o.stop
    return f"{tier.base_url}/v1/messages", headers, body


def _parse_anthropic(d: dict) -> tuple[str, str | None, dict | None]:
    kind = d.get("type")
    if kind == "error":
        raise RemoteError(f"remote error: {str(d.get('error'))[:200]}")
    if kind == "content_block_delta":
        return (d.get("delta") or {}).get("text") or "", None, None
    if kind == "message_start":
        return "", None, (d.get("message") or {}).get("usage")
    if kind == "message_delta":
        reason = (d.get("delta") or {}).get("stop_reason")
        fin = None if reason is None else ("length" if reason == "max_tokens" else "stop")
        return "", fin, d.get("usage")
    return "", None, None


# -- helpers ------------------------------------------------------------------------------


def _error_detail(resp: httpx.Response) -> str:
    try:
        resp.read()
        d = resp.json()
        err = d.get("error", d)
        msg = err.get("message") if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, ValueError, AttributeError, httpx.HTTPError):
        msg = resp.reason_phrase
    return str(msg)[:200]


def _sleep(tier: Tier, attempt: int, retry_after: str | None) -> None:
    """Exponential backoff with jitter; honour a short Retry-After."""
    delay = tier.backoff * (2**attempt) * (0.5 + random.random())
    if retry_after:
        try:
            delay = max(delay, min(float(retry_after), 10.0))
        except ValueError:
            pass
    time.sleep(delay)
