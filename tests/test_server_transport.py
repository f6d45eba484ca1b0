"""Where `edgeai serve` listens: socket permissions, stale sockets, TCP guard, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import stat

import httpx
import pytest
from serverproc import start_server

from edgeai.errors import EdgeAIError
from edgeai.server.transport import bind_unix, default_socket_path


def _private(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


def test_socket_is_0600_in_a_private_dir_it_creates(tmp_path):
    path = tmp_path / "fresh" / "sub" / "s.sock"
    os.chmod(tmp_path, 0o700)
    sock = bind_unix(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        sock.close()


def test_stale_socket_is_replaced_live_one_refused(tmp_path):
    path = _private(tmp_path) / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a crashed server's leftover
    live = bind_unix(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(EdgeAIError, match="already listening"):
            bind_unix(path)
        assert path.exists()  # the live server's socket was left alone
    finally:
        live.close()


def test_non_socket_path_and_open_directory_refused(tmp_path):
    d = _private(tmp_path)
    (d / "file.sock").write_text("not a socket")
    with pytest.raises(EdgeAIError, match="not a socket"):
        bind_unix(d / "file.sock")
    assert (d / "file.sock").read_text() == "not a socket"
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(EdgeAIError, match="open to other users"):
        bind_unix(shared / "s.sock")
    with pytest.raises(EdgeAIError, match="Unix sockets allow"):
        bind_unix(d / ("x" * 120))


def test_default_socket_path_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEAI_SOCKET", str(tmp_path / "a.sock"))
    assert default_socket_path() == tmp_path / "a.sock"
    monkeypatch.delenv("EDGEAI_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == tmp_path / "edgeai" / "edgeai.sock"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_socket(tiny_model, tmp_path, sig):
    srv = start_server(tiny_model, tmp_path)
    with srv.client() as c:
        assert (
            c.post(
                "/v1/completions", json={"model": tiny_model.name, "prompt": "a", "max_tokens": 3}
            ).status_code
            == 200
        )
    rc = srv.stop(sig)
    assert rc in (0, 130), srv.output()
    assert not srv.socket.exists()
    assert "Traceback" not in srv.output()


def test_second_server_on_same_socket_is_refused(tiny_model, tmp_path):
    srv = start_server(tiny_model, tmp_path)
    try:
        import subprocess
        import sys

        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgeai",
                "serve",
                "--model",
                str(tiny_model),
                "--socket",
                str(srv.socket),
                "--policy",
                "local-only",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "EDGEAI_HOME": str(tmp_path / "home"), "NO_COLOR": "1"},
        )
        assert r.returncode != 0 and "already listening" in r.stderr and "Traceback" not in r.stderr
        with srv.client() as c:  # the first one still serves
            assert c.get("/health").status_code == 200
    finally:
        assert srv.stop() == 0


def _tcp_port(srv) -> int:
    line = next(ln for ln in srv.output().splitlines() if "http://127.0.0.1:" in ln)
    return int(line.split("http://127.0.0.1:")[1].split()[0].rstrip(",;"))


def test_tcp_host_check_and_token(tiny_model, tmp_path):
    srv = start_server(
        tiny_model, tmp_path, "--host", "127.0.0.1", "--port", "0", "--token", "s3cret"
    )
    try:
        base = f"http://127.0.0.1:{_tcp_port(srv)}"
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/health", headers=ok).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 401
        assert (
            httpx.get(f"{base}/health", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        rebound = httpx.get(f"{base}/health", headers={**ok, "Host": "evil.example:80"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
        with srv.client() as c:  # the socket needs no token: its 0600 mode is the check
            assert c.get("/health").status_code == 200
    finally:
        assert srv.stop() == 0


def test_tcp_refuses_cross_site_requests(tiny_model, tmp_path):
    """A web page can make a browser POST to 127.0.0.1 (text/plain, form bodies: no preflight);
    over TCP a foreign Origin is refused, and a POST body must be declared application/json
    (which no page can send cross-site without a CORS preflight, which the server never grants)."""
    import openai

    srv = start_server(tiny_model, tmp_path, "--name", "tiny", "--host", "127.0.0.1", "--port", "0")
    body = '{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
    try:
        port = _tcp_port(srv)
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/v1/completions"
        for origin in (
            "https://evil.example",
            "null",
            f"http://evil.example:{port}",
            "http://127.0.0.1:1",
        ):
            for ctype in ("text/plain", "application/json"):
                r = httpx.post(url, content=body, headers={"Origin": origin, "Content-Type": ctype})
                assert r.status_code == 403, (origin, ctype, r.text)
                assert r.json()["error"]["code"] == "origin_not_allowed"
        assert (
            httpx.get(f"{base}/v1/models", headers={"Origin": "https://evil.example"}).status_code
            == 403
        )
        for ctype in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            None,
        ):
            r = httpx.post(url, content=body, headers={"Content-Type": ctype} if ctype else {})
            assert r.status_code == 415, (ctype, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
        assert srv.metric("edgeai_generation_tokens_total") == 0  # none of the above generated
        for headers in (
            {"Content-Type": "application/json"},
            {"Content-Type": "Application/JSON; charset=utf-8", "Origin": base},
        ):
            assert httpx.post(url, content=body, headers=headers).status_code == 200
        ai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert (
            ai.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text
            is not None
        )
        with srv.client() as c:  # the socket: unreachable from a browser, curl -d keeps working
            r = c.post(
                "/v1/completions",
                content=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert r.status_code == 200, r.text
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("token", ["s3cr\r\net-token", "s3cr\u00e9t-token"])
def test_token_that_no_header_can_carry_is_refused_by_name(tiny_model, tmp_path, token):
    r = _serve(
        tiny_model,
        tmp_path,
        "--port",
        "0",
        "--policy",
        "local-only",
        env={"EDGEAI_SERVER_TOKEN": token},
    )
    assert r.returncode != 0 and "EDGEAI_SERVER_TOKEN" in r.stderr and "Traceback" not in r.stderr
    assert "et-token" not in r.stderr + r.stdout


@pytest.mark.parametrize(
    "args",
    [["--port", "99999"], ["--port", "-5"], ["--keep-alive", "nan"], ["--keep-alive", "inf"]],
)
def test_serve_option_out_of_range_is_one_line(tiny_model, tmp_path, args):
    r = _serve(tiny_model, tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and args[0] in r.stderr, r.stderr


def _serve(model, tmp_path, *args: str, env: dict | None = None):
    """`edgeai serve` on a private socket as a user runs it, for a refusal that ends it."""
    from conftest import run_cli

    home = {"EDGEAI_HOME": str(tmp_path / "home"), "EDGEAI_CONFIG_DIR": str(tmp_path / "config")}
    sock = str(_private(tmp_path) / "s.sock")
    return run_cli(
        ["serve", "--model", str(model), "--socket", sock, *args],
        {**os.environ, **home, **(env or {})},
        timeout=60,
    )
