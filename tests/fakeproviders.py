"""Stand-in OpenAI-compatible and Anthropic servers on 127.0.0.1: real HTTP, real SSE streaming.

`FakeProvider(kind)` runs a starlette app under uvicorn in a thread on a free loopback port.
Its behaviour is set by attributes (reply text, failures before success, a fixed error status,
breaking the stream midway, answering late or stalling midway) and every request it gets is
recorded (headers and JSON body).
Run as a script (`python tests/fakeproviders.py openai|anthropic`) it serves until killed and
prints its base URL on stdout — for subprocess tests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


class FakeProvider:
    def __init__(
        self, kind: str = "openai", reply: str = "Remote says: Paris is the capital of France."
    ):
        self.kind = kind
        self.reply = reply
        self.fail_first = 0  # answer the first N requests with fail_status
        self.fail_status = 503
        self.status = 200  # a fixed status for every request (e.g. 401)
        self.break_after = None  # close the stream after this many chunks
        self.delay = 0.0  # seconds to wait before answering at all
        self.stall_after = None  # after this many chunks, send nothing for `stall` seconds
        self.stall = 0.0
        self.requests: list[dict] = []
        path = "/v1/messages" if kind == "anthropic" else "/v1/chat/completions"
        self.app = Starlette(routes=[Route(path, self._handle, methods=["POST"])])
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        root = f"http://127.0.0.1:{self.port}"
        return root if self.kind == "anthropic" else root + "/v1"

    def start(self) -> FakeProvider:
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _handle(self, request: Request):
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        await asyncio.sleep(self.delay)
        key = request.headers.get("authorization", "").removeprefix(
            "Bearer "
        ) or request.headers.get("x-api-key", "")
        if self.status != 200 or len(self.requests) <= self.fail_first:
            status = self.status if self.status != 200 else self.fail_status
            # Like real providers, echo (part of) the key back in the error message.
            return JSONResponse(
                {"error": {"message": f"failure for key {key}", "type": "fake"}}, status_code=status
            )
        chunks = self.reply.split(" ")
        chunks = [c + " " for c in chunks[:-1]] + chunks[-1:]
        gen = (
            self._anthropic(chunks, body)
            if self.kind == "anthropic"
            else self._openai(chunks, body)
        )
        return StreamingResponse(gen, media_type="text/event-stream")

    def _cut(self, chunks: list[str]) -> tuple[list[str], bool]:
        if self.break_after is not None:
            return chunks[: self.break_after], True
        return chunks, False

    async def _stall(self, sent: int) -> None:
        if self.stall_after is not None and sent == self.stall_after:
            await asyncio.sleep(self.stall)

    async def _openai(self, chunks: list[str], body: dict):
        chunks, broken = self._cut(chunks)
        for i, c in enumerate(chunks):
            await self._stall(i)
            d = {
                "id": "x",
                "object": "chat.completion.chunk",
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(d)}\n\n"
            await asyncio.sleep(0.005)
        if broken:
            raise ConnectionError("stream cut on purpose")
        d = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(d)}\n\n"
        usage = {"prompt_tokens": 7, "completion_tokens": len(chunks)}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def _anthropic(self, chunks: list[str], body: dict):
        chunks, broken = self._cut(chunks)

        def ev(name: str, d: dict) -> str:
            return f"event: {name}\ndata: {json.dumps({'type': name, **d})}\n\n"

        yield ev(
            "message_start",
            {"message": {"id": "m", "model": body["model"], "usage": {"input_tokens": 7}}},
        )
        yield ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        for i, c in enumerate(chunks):
            await self._stall(i)
            yield ev(
                "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": c}}
            )
            await asyncio.sleep(0.005)
        if broken:
            raise ConnectionError("stream cut on purpose")
        yield ev("content_block_stop", {"index": 0})
        yield ev(
            "message_delta",
            {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": len(chunks)}},
        )
        yield ev("message_stop", {})


if __name__ == "__main__":
    fp = FakeProvider(sys.argv[1] if len(sys.argv) > 1 else "openai").start()
    print(fp.base_url, flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        fp.stop()
