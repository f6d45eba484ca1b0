"""Where the server listens: a private Unix socket, optionally loopback TCP, and clean shutdown.

The socket is created mode 0600 inside a directory only the user can enter. A socket file
left by a dead server is replaced; a live server's socket, or a path that is not a socket,
is refused. TCP (opt-in) binds to loopback, checks the Host header against DNS rebinding
and can require a bearer token. SIGINT/SIGTERM stop the server gracefully and remove the
socket.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeai.errors import EdgeAIError

# sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS (with the trailing NUL).
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def default_socket_path() -> Path:
    """$EDGEAI_SOCKET, else <user runtime dir>/edgeai/edgeai.sock."""
    env = os.environ.get("EDGEAI_SOCKET")
    if env:
        return Path(env).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "edgeai" / "edgeai.sock"
    if sys.platform == "darwin":
        import platformdirs

        return Path(platformdirs.user_runtime_dir("edgeai")) / "edgeai.sock"
    return Path(f"/tmp/edgeai-{os.getuid()}") / "edgeai.sock"


def _private_dir(path: Path, create: bool) -> None:
    """Make sure `path` is a directory only this user can enter."""
    if not path.exists():
        if not create:
            raise EdgeAIError(
                f"the socket directory {path} does not exist", "create it with mode 700"
            )
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise EdgeAIError(f"{path} is not a directory", "choose another --socket path")
    if st.st_uid != os.getuid():
        raise EdgeAIError(
            f"the socket directory {path} belongs to another user", "choose another --socket path"
        )
    if st.st_mode & 0o077:
        raise EdgeAIError(
            f"the socket directory {path} is open to other users "
            f"(mode {stat.S_IMODE(st.st_mode):o})",
            f"chmod 700 {path}, or choose a --socket path inside a private directory",
        )


def _clear_stale(path: Path) -> None:
    """Remove a dead server's socket; refuse a live one or anything that is not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise EdgeAIError(
            f"{path} exists and is not a socket", "remove it or choose another --socket path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a crashed server left it
        return
    except OSError as e:
        raise EdgeAIError(
            f"cannot check the existing socket {path}: {e.strerror}", "remove it if no server runs"
        ) from e
    finally:
        probe.close()
    raise EdgeAIError(
        f"another server is already listening on {path}",
        "stop it (edgeai ps shows it) or choose another --socket path",
    )


def bind_unix(path: Path, *, create_dir: bool = True) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600, inside a private directory."""
    path = Path(path).expanduser().absolute()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise EdgeAIError(
            f"the socket path is {len(os.fsencode(path))} bytes; "
            f"Unix sockets allow {MAX_SOCKET_PATH}",
            "choose a shorter --socket path",
        )
    _private_dir(path.parent, create_dir)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window where others could connect
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise EdgeAIError(
            f"cannot create the socket {path}: {e.strerror}", "choose another --socket path"
        ) from e
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(512)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_tcp(host: str, port: int, *, token: str | None) -> socket.socket:
    """A listening TCP socket; off loopback only with a token."""
    if not _is_loopback(host) and not token:
        raise EdgeAIError(
            f"--host {host} would expose the server beyond this machine without a token",
            "add --token (or $EDGEAI_SERVER_TOKEN), or bind to 127.0.0.1",
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "choose another --port" if e.errno == errno.EADDRINUSE else "check --host"
        raise EdgeAIError(f"cannot listen on {host}:{port}: {e.strerror}", hint) from e
    sock.listen(512)
    return sock


class TCPGuard:
    """ASGI middleware for TCP connections only: Host, Origin, bearer token, JSON bodies.

    Any web page can make a browser send requests to a loopback port. A foreign `Host`
    (DNS rebinding) or `Origin` is refused, and a POST must declare `application/json`:
    a page can only send that cross-site after a CORS preflight, which is never granted.
    Unix-socket connections (uvicorn reports no port for them) pass untouched: no browser
    can reach a socket, and its 0600 mode already limits it to this user.

    Args:
        app: the ASGI app.
        hosts: extra Host names allowed besides loopback ones (e.g. the bound host).
        token: the bearer token TCP clients must send (None: no token).
    """

    def __init__(self, app: Callable, hosts: set[str] | None = None, token: str | None = None):
        self.app, self.token = app, token
        self.hosts = LOOPBACK_NAMES | set(hosts or ())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server and server[1] is not None:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in scope.get("headers", [])
            }
            problem = self._problem(scope.get("method", ""), headers)
            if problem:
                await _deny(send, *problem)
                return
        await self.app(scope, receive, send)

    def _problem(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = headers.get("host", "")
        if host.startswith("["):  # [::1]:8080
            name = host[1 : host.find("]")]
        else:
            name = host.split(":")[0] if host.count(":") <= 1 else host
        name = name.lower()
        if name not in self.hosts:
            return (
                403,
                f"Host '{host}' is not allowed (DNS rebinding protection)",
                "host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in (
            f"http://{host}".lower(),
            f"https://{host}".lower(),
        ):
            return (
                403,
                f"cross-origin requests are refused (Origin {origin[:100]!r})",
                "origin_not_allowed",
            )
        if self.token:
            auth = headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
                return 401, "missing or wrong bearer token", "invalid_api_key"
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and media_type != "application/json":
            return (
                415,
                "POST bodies over TCP must be sent with Content-Type: application/json",
                "unsupported_media_type",
            )
        return None


async def _deny(send: Callable, status: int, message: str, code: str) -> None:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass
class Listen:
    """Where to listen. socket: the Unix socket path; host/port: optional TCP."""

    socket: Path
    host: str | None = None
    port: int | None = None
    token: str | None = None


def serve(
    app: Any,
    listen: Listen,
    *,
    log_level: str = "warning",
    on_ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Run `app` until SIGINT/SIGTERM; the socket file is removed on the way out."""
    import uvicorn

    sockets = [bind_unix(listen.socket)]
    ino = os.stat(listen.socket).st_ino
    where = [f"unix:{listen.socket}"]
    try:
        if listen.port is not None:
            host = listen.host or "127.0.0.1"
            sockets.append(bind_tcp(host, listen.port, token=listen.token))
            app = TCPGuard(app, {host.lower()}, listen.token)
            where.append(f"http://{host}:{sockets[-1].getsockname()[1]}")
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_level=log_level,
            timeout_graceful_shutdown=5,
            access_log=False,
            server_header=False,
        )
        server = _Server(config)
        server.on_ready = (lambda: on_ready(where)) if on_ready else None
        server.run(sockets=sockets)
    finally:
        for s in sockets:
            s.close()
        _remove_if_ours(listen.socket, ino)


def _remove_if_ours(path: Path, ino: int) -> None:
    try:
        if os.lstat(path).st_ino == ino:  # another server may have replaced it since
            os.unlink(path)
    except FileNotFoundError:
        pass


try:
    import uvicorn as _uvicorn

    class _Server(_uvicorn.Server):
        """uvicorn's server, exiting normally (not by re-raising the signal) after a clean stop."""

        on_ready: Callable[[], None] | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if isinstance(getattr(self, "_captured_signals", None), list):
                self._captured_signals.clear()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.on_ready is not None and not self.should_exit:
                self.on_ready()
except ImportError:  # pragma: no cover - uvicorn is a dependency
    pass
