"""pytest plugin: real `redis-server` processes (Debian's `redis-server` package; `make test` installs it).

`pytest_plugins = [..., "redis_server"]` (tests/conftest.py) provides the session fixture `redis_server`, one
server shared by the session. A test that needs a server of its own (to stop, freeze or restart it) calls
`start_redis_server(tmp_path)` and stops it itself.

Each server listens on 127.0.0.1 only, on a free port, with its working directory in a temporary folder and no
persistence (no RDB snapshots, no AOF), so it leaves nothing behind and never touches a system Redis.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tools.processes import free_port

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """Path of `redis-server`.

    Raises:
        RuntimeError: it is not installed (the message says how to install it).
    """
    found = shutil.which("redis-server")
    if found is None and Path("/usr/bin/redis-server").exists():  # PATH without /usr/bin
        found = "/usr/bin/redis-server"
    if found is None:
        raise RuntimeError("redis-server is not installed: `make test` installs it, or "
                           "`apt-get install -y --no-install-recommends redis-server`")
    return found


@dataclass
class RedisServerProcess:
    """A running redis-server.

    Attributes:
        port: its loopback TCP port.
        url: 'redis://127.0.0.1:<port>/0'.
        base_dir: its working directory (log file `redis.log`).
        process: the server process.
    """

    port: int
    base_dir: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous redis-py client of this server (for checks from a test)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and wait for it; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)


def _log_tail(base_dir: Path) -> str:
    log = base_dir / "redis.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


def start_redis_server(base_dir: Path, *, port: int | None = None) -> RedisServerProcess:
    """Start a redis-server in `base_dir` (created) on 127.0.0.1:`port` (a free one if None) and wait for PING.

    Raises:
        RuntimeError: redis-server is missing, or did not answer within START_TIMEOUT_S in 3 tries (its log
            is in the message).
    """
    binary = redis_server_binary()
    base_dir.mkdir(parents=True, exist_ok=True)
    error = ""
    for _ in range(3):  # a free port can be taken between free_port() and the bind
        chosen = port if port is not None else free_port()
        process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(chosen), "--dir", str(base_dir),
             "--logfile", str(base_dir / "redis.log"), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--protected-mode", "yes", "--databases", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        server = RedisServerProcess(port=chosen, base_dir=base_dir, process=process)
        atexit.register(server.stop)
        client = server.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        return server
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        server.stop()
        error = f"redis-server on port {chosen} did not start (exit code {process.returncode}): {_log_tail(base_dir)}"
    raise RuntimeError(error)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServerProcess]:
    """A redis-server shared by the test session (flush what you write, or use keys of your own)."""
    base = Path(tempfile.mkdtemp(prefix="vitrine-redis-"))
    server = start_redis_server(base)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)
