"""503s through the HTTP API (the app served over loopback HTTP in-process, on the real
scheduler and tiny model): a model larger than the free memory, and requests that arrive
while the server stops."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import uvicorn

from edgeai.server.app import Settings, build_app
from edgeai.server.models import ModelRegistry
from edgeai.server.scheduler import Scheduler


def _body(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


@pytest.fixture
def served(tiny_model, tmp_path, monkeypatch):
    """(app, scheduler) serving "tiny", "huge" (the tiny model next to a weights shard larger
    than this machine's memory: a sparse file, nothing is really written) and "long"."""
    monkeypatch.setenv("EDGEAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGEAI_CONFIG_DIR", str(tmp_path / "config"))
    huge = tmp_path / "huge"
    shutil.copytree(tiny_model, huge)
    with open(huge / "model-00002-of-00002.safetensors", "wb") as f:
        f.truncate(2 * psutil.virtual_memory().total)
    long = tmp_path / "long"  # the tiny model with room for answers longer than a test waits
    shutil.copytree(tiny_model, long)
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1 << 20}))
    scheduler = Scheduler(max_batch=4, max_queue=8, keep_alive=-1)
    models = {"tiny": tiny_model, "huge": huge, "long": long}
    app = build_app(
        scheduler,
        ModelRegistry(models, use_store=False),
        settings=Settings(policy="local-only"),
        manage_scheduler=False,
    )
    scheduler.start()
    yield app, scheduler
    scheduler.stop()


@contextlib.contextmanager
def http(app) -> Iterator[httpx.Client]:
    """The app served by uvicorn on a loopback port in a thread: real HTTP, real streaming."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(10)


def test_model_larger_than_free_memory_is_503_insufficient_memory(served):
    app, _ = served
    with http(app) as c:
        huge = c.post("/v1/chat/completions", json=_body("huge"))
        tiny = c.post("/v1/chat/completions", json=_body("tiny"))
    assert huge.status_code == 503, huge.text
    err = huge.json()["error"]
    assert err["code"] == "insufficient_memory" and "GB available" in err["message"]
    assert huge.headers["retry-after"] == "30"
    assert tiny.status_code == 200  # the refusal is that request's alone


def test_requests_while_stopping_are_503_and_running_ones_end(served):
    app, scheduler = served
    with http(app) as c:
        assert (
            c.post("/v1/chat/completions", json=_body("long")).status_code == 200
        )  # loaded, serving
        # no end-of-text token (<|im_end|> is id 2): minutes of answer, unless stopped
        endless = _body("long", max_tokens=100000, stream=True, logit_bias={"2": -100})
        with c.stream("POST", "/v1/chat/completions", json=endless) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            while not next(lines).startswith("data: {"):  # a token has arrived
                pass
            t0 = time.monotonic()
            scheduler.stop()  # as the app's lifespan does on shutdown
            rest = [line for line in lines if line]
        assert time.monotonic() - t0 < 15  # the running answer was ended, not left to run
        late = c.post("/v1/chat/completions", json=_body("long"))
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason": "stop"' in rest[-2], rest[-2:]  # how the API reports "cancelled"
    assert late.status_code == 503, late.text
    assert late.json()["error"]["type"] == "server_busy" and late.headers["retry-after"] == "5"
