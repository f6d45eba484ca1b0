"""Start a real `edgeai serve` subprocess on a Unix socket, for the server tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerProc:
    """A running `python -m edgeai serve` and a client over its socket."""

    def __init__(self, proc: subprocess.Popen, socket: Path, log: Path):
        self.proc, self.socket, self.log = proc, socket, log

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://localhost",
            timeout=timeout,
        )

    def metric(self, name: str) -> float:
        """The value of an unlabelled Prometheus sample (e.g. edgeai_cancelled_total)."""
        with self.client() as c:
            for line in c.get("/metrics").text.splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_server(
    model_dir: Path,
    workdir: Path,
    *args: str,
    env: dict | None = None,
    socket: Path | None = None,
    home: Path | None = None,
    wait: float = 60,
) -> ServerProc:
    """Start `edgeai serve --model model_dir` with its store/config under `workdir`.

    `home` overrides $EDGEAI_HOME (e.g. to keep the router's embedding cache across runs).
    """
    rundir = workdir / "run"
    rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket or rundir / "edgeai.sock"
    full_env = dict(env or os.environ)
    full_env.update(
        EDGEAI_HOME=str(home or workdir / "home"),
        EDGEAI_CONFIG_DIR=str(workdir / "config"),
        HF_HUB_OFFLINE="1",
        NO_COLOR="1",
    )
    log = workdir / f"server-{time.monotonic_ns()}.log"
    cmd = [
        sys.executable,
        "-m",
        "edgeai",
        "serve",
        "--model",
        str(model_dir),
        "--socket",
        str(sock),
        "--policy",
        "local-only",
        "--no-store",
        *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    srv = ServerProc(proc, sock, log)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{srv.output()}")
        if sock.exists():
            try:
                with srv.client(timeout=5) as c:
                    if c.get("/health").status_code == 200:
                        return srv
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    srv.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not come up:\n{srv.output()}")
