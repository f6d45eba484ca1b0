"""A desktop app's view of `edgeai serve`: the official openai SDK over the Unix socket.

    edgeai serve &                       # once; keeps the model loaded
    python examples/client.py "Why is the sky blue?"

Nothing here is edgeai-specific except the socket path and the optional `edgeai` field
(which tier answered, and how confident the local model was).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import openai


def socket_path() -> Path:
    """Where `edgeai serve` listens by default (same rule as edgeai.server.transport)."""
    if os.environ.get("EDGEAI_SOCKET"):
        return Path(os.environ["EDGEAI_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "edgeai" / "edgeai.sock"
    return Path(f"/tmp/edgeai-{os.getuid()}") / "edgeai.sock"


def client(sock: Path) -> openai.OpenAI:
    # The base URL's host is ignored: every request goes through the socket.
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=120)
    return openai.OpenAI(
        base_url="http://localhost/v1", api_key="not-needed-on-the-socket", http_client=http
    )


def main() -> None:
    prompt = " ".join(sys.argv[1:]) or "Say hello in five words."
    ai = client(socket_path())
    model = ai.models.list().data[0].id
    stream = ai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )
    info, usage = None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        info = (chunk.model_extra or {}).get("edgeai") or info
        if chunk.usage:
            usage = chunk.usage
    print()
    if info:
        conf = info.get("confidence")
        tokens = usage.completion_tokens if usage else "?"
        print(
            f"[{info['tier']}, confidence {conf if conf is not None else 'n/a'}, {tokens} tokens]",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
