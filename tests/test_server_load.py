"""`edgeai serve` under load: many clients, a full queue, disconnects, and nothing leaked."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest
from serverproc import start_server
from tinymodel import SPECIALS

# The tiny model's special tokens (end of text/turn) come first in its vocabulary: banning
# them makes a long generation really long.
NO_EOS = {str(i): -100 for i in range(len(SPECIALS))}


def _chat(n: int, stream: bool, max_tokens: int = 24) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"client {n}"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 0.7,
        "seed": n,
        "logit_bias": NO_EOS,
    }


def _one_client(srv, n: int, out: dict, max_tokens: int = 24) -> None:
    """Run one request; record 'ok', 'refused' (clean 503) or what went wrong."""
    stream = n % 2 == 0
    try:
        with srv.client(timeout=120) as c:
            if not stream:
                r = c.post("/v1/chat/completions", json=_chat(n, False, max_tokens))
                if r.status_code == 200:
                    out[n] = (
                        "ok"
                        if r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                        else r.text
                    )
                elif (
                    r.status_code == 503
                    and int(r.headers["retry-after"]) >= 1
                    and r.json()["error"]
                ):
                    out[n] = "refused"
                else:
                    out[n] = f"{r.status_code} {r.text}"
                return
            with c.stream("POST", "/v1/chat/completions", json=_chat(n, True, max_tokens)) as r:
                if r.status_code == 503:
                    r.read()
                    out[n] = (
                        "refused"
                        if int(r.headers["retry-after"]) >= 1
                        else "503 without Retry-After"
                    )
                    return
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                finished = any(
                    json.loads(ln[6:])["choices"][0]["finish_reason"]
                    for ln in lines[:-1]
                    if json.loads(ln[6:]).get("choices")
                )
                out[n] = (
                    "ok" if lines[-1] == "data: [DONE]" and finished else f"bad stream {lines[-3:]}"
                )
    except Exception as e:  # recorded, so the test reports it instead of a thread dying silently
        out[n] = f"{type(e).__name__}: {e}"


def _run_clients(srv, count: int, max_tokens: int = 24) -> dict:
    out: dict = {}
    threads = [
        threading.Thread(target=_one_client, args=(srv, n, out, max_tokens)) for n in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def _resources(pid: int) -> tuple[int, int]:
    p = psutil.Process(pid)
    return p.num_threads(), p.num_fds()


def _settle(srv, baseline: tuple[int, int], timeout: float = 10) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    now = _resources(srv.proc.pid)
    while time.monotonic() < deadline and (now[0] > baseline[0] or now[1] > baseline[1]):
        time.sleep(0.2)
        now = _resources(srv.proc.pid)
    return now


@pytest.fixture(scope="module")
def small_server(tiny_model, tmp_path_factory):
    # A small batch and queue so 24 clients overflow it.
    srv = start_server(
        tiny_model,
        tmp_path_factory.mktemp("load"),
        "--name",
        "tiny",
        "--max-batch",
        "4",
        "--max-queue",
        "4",
    )
    yield srv
    assert srv.stop() == 0, srv.output()


def test_sixteen_clients_all_complete(tiny_model, tmp_path):
    srv = start_server(tiny_model, tmp_path, "--name", "tiny")
    try:
        _run_clients(srv, 1)  # load the model, warm up
        seen, done = [], threading.Event()

        def watch() -> None:
            with srv.client() as c:
                while not done.is_set():
                    seen.append(c.get("/api/ps").json()["active"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        out = _run_clients(srv, 16, max_tokens=64)
        done.set()
        watcher.join()
        assert sorted(set(out.values())) == ["ok"], out
        assert len(out) == 16
        assert max(seen) > 1  # they were decoded together, not one after another
    finally:
        assert srv.stop() == 0, srv.output()


def test_overload_is_refused_cleanly_and_nothing_leaks(small_server):
    srv = small_server
    _run_clients(srv, 2)  # warm: model loaded, worker threads started
    baseline = _settle(srv, _resources(srv.proc.pid), 2)
    out = _run_clients(srv, 24, max_tokens=200)  # long enough that the 24 overlap anywhere
    assert len(out) == 24
    assert set(out.values()) <= {"ok", "refused"}, {
        k: v for k, v in out.items() if v not in ("ok", "refused")
    }
    assert list(out.values()).count("ok") >= 8  # batch + queue were used to the full
    assert "refused" in out.values()
    threads, fds = _settle(srv, baseline)
    assert threads <= baseline[0] and fds <= baseline[1], (baseline, (threads, fds))
    with srv.client() as c:  # still serving, queue empty
        assert c.post("/v1/chat/completions", json=_chat(0, False)).status_code == 200
        ps = c.get("/api/ps").json()
        assert ps["active"] == 0 and ps["waiting"] == 0


def _wait_idle(srv, timeout: float = 5) -> float:
    t0 = time.monotonic()
    with srv.client() as c:
        while time.monotonic() - t0 < timeout:
            if c.get("/api/ps").json()["active"] == 0:
                return time.monotonic() - t0
            time.sleep(0.02)
    raise AssertionError("generation still running after the client left")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation(small_server, stream):
    srv = small_server
    before = srv.metric("edgeai_cancelled_total")
    tokens_before = srv.metric("edgeai_generation_tokens_total")
    body = {
        "model": "tiny",
        "prompt": "once upon a time",
        "max_tokens": 20000,
        "stream": stream,
        "temperature": 1.0,
        "seed": 1,
        "logit_bias": NO_EOS,
    }
    client = srv.client(timeout=120)
    if stream:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        client.close()  # the app hangs up mid-stream
    else:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body, timeout=1.0)
        client.close()
    _wait_idle(srv)
    assert srv.metric("edgeai_cancelled_total") == before + 1
    generated = srv.metric("edgeai_generation_tokens_total") - tokens_before
    assert generated < 20000
    time.sleep(0.3)  # and nothing keeps generating afterwards
    assert srv.metric("edgeai_generation_tokens_total") - tokens_before == generated


def test_idle_model_unloads_after_keep_alive(tiny_model, tmp_path):
    srv = start_server(tiny_model, tmp_path, "--name", "tiny", "--keep-alive", "0.5")
    try:
        with srv.client() as c:
            assert c.get("/api/ps").json()["models"] == []  # loaded on first request, not before
            c.post("/v1/chat/completions", json=_chat(1, False)).raise_for_status()
            assert c.get("/api/ps").json()["models"][0]["name"] == "tiny"
            deadline = time.monotonic() + 10
            while c.get("/api/ps").json()["models"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.get("/api/ps").json()["models"] == []
            c.post(
                "/v1/chat/completions", json=_chat(2, False)
            ).raise_for_status()  # and loads again
        assert srv.metric("edgeai_model_loads_total") == 2
    finally:
        assert srv.stop() == 0, srv.output()


def test_client_that_gives_up_while_queued_is_never_generated(small_server):
    srv = small_server
    long = {
        "model": "tiny",
        "prompt": "hold the batch",
        "max_tokens": 20000,
        "stream": True,
        "temperature": 1.0,
        "logit_bias": NO_EOS,
    }
    with srv.client() as c:
        p = c.post("/v1/completions", json={**long, "stream": False, "max_tokens": 1}).json()[
            "usage"
        ]["prompt_tokens"]
    before = srv.metric("edgeai_prompt_tokens_total")
    clients = [srv.client(timeout=120) for _ in range(4)]
    streams = [c.stream("POST", "/v1/completions", json=long) for c in clients]
    try:
        lines = [s.__enter__().iter_lines() for s in streams]  # kept: a dropped iterator hangs up
        for it in lines:  # the batch (4) is full once each has sent a token
            next(it)
        with srv.client() as c:
            assert c.get("/api/ps").json()["active"] == 4
        with srv.client() as c, pytest.raises(httpx.ReadTimeout):
            c.post(
                "/v1/completions", json={**long, "prompt": "queued", "stream": False}, timeout=0.5
            )
    finally:
        for s, c in zip(streams, clients):
            s.__exit__(None, None, None)
            c.close()
    _wait_idle(srv)
    time.sleep(0.3)
    assert (
        srv.metric("edgeai_prompt_tokens_total") - before == 4 * p
    )  # the queued one never started
    with srv.client() as c:
        assert c.get("/api/ps").json()["waiting"] == 0
