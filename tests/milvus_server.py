"""Start and stop a real Milvus standalone server (the `milvus` PyPI package, "Milvus 2.3.5-lite") for tests.

The package ships the server binaries (lzma-compressed, ~56 MB -> ~390 MB), so this works offline. Each
server gets its own base directory (config, logs, etcd, data) and free TCP ports chosen by the OS, so
several can run side by side (other test sessions on the same machine included).

Decompressing the binaries takes ~5 s of the ~7 s start; pass `bin_cache` (a directory kept between runs)
to decompress them once: the server's `<base_dir>/bin` then becomes a symlink to it.

    with milvus_server(tmp_path / "milvus") as uri:
        client = MilvusClient(uri)

It is also a pytest plugin: `pytest_plugins = ["milvus_server"]` (in a test module or tests/conftest.py)
provides the session fixture `milvus_server_uri`, one server for the whole session.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Decompressed server binaries, kept between runs (same cache root as tests/conftest.py).
BIN_CACHE = Path(os.environ.get("VITRINE_CACHE_DIR", ROOT / ".cache")) / "milvus-bin-2.3.5"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_template(base_dir: Path) -> Path:
    """The package's milvus.yaml template plus `etcd.config.path`.

    The package leaves embedded etcd on etcd's default listeners (client 2379, peer 2380), so a second
    server on the machine dies with "listen tcp 127.0.0.1:2380: bind: address already in use". Milvus
    reads an etcd config file from `etcd.config.path` (pkg/util/etcd/etcd_server.go), which we add.
    """
    import milvus

    template = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text()
    anchor = "  use:\n    embed: true"
    if anchor not in template:
        raise RuntimeError(f"milvus {milvus.__version__}: unexpected config template (no '{anchor}')")
    template = template.replace(anchor, "  config:\n    path: {{ etcd_config_path }}\n" + anchor, 1)
    path = base_dir / "milvus.yaml.template"
    path.write_text(template)
    return path


def _write_etcd_config(base_dir: Path, *, client_port: int, peer_port: int) -> Path:
    """An embedded-etcd config (etcd flag names) listening on the given loopback ports only."""
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    path = base_dir / "etcd.yaml"
    path.write_text(
        "name: default\n"
        f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: default={peer}\ninitial-cluster-state: new\n"
    )
    return path


def _prepare_bin_cache(bin_cache: Path) -> Path:
    """Decompress the package's binaries into `bin_cache/bin` once (file-locked across processes)."""
    import milvus

    bin_cache.mkdir(parents=True, exist_ok=True)
    with open(bin_cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Private helper of milvus 2.3.5: decompresses data/bin/*.lzma into <dir>/bin, skipping files whose
        # .lzma.md5 marker matches (it writes the marker after the binary, so a crash leaves no false marker).
        milvus._initialize_data_files(str(bin_cache))
    return bin_cache / "bin"


def start_milvus_server(
    base_dir: Path, *, bin_cache: Path | None = None, start_timeout_s: float = 120.0
) -> tuple[str, Callable[[], None]]:
    """Start a Milvus standalone server whose files live under `base_dir` (created).

    Args:
        base_dir: directory for its config, logs, etcd and data; the caller removes it.
        bin_cache: optional directory holding the decompressed binaries across runs (see module doc).
        start_timeout_s: how long to wait for its health endpoint, seconds.

    Returns:
        (uri, stop): uri like 'http://127.0.0.1:<port>' for `MilvusClient`; `stop()` terminates the
        server (idempotent; also registered with atexit).

    Raises:
        RuntimeError / TimeoutError: the server did not come up (see `<base_dir>/logs/milvus-stderr.log`).
    """
    import milvus
    from milvus import MilvusServer, MilvusServerConfig

    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    if bin_cache is not None:
        cached = _prepare_bin_cache(Path(bin_cache).resolve())
        link = base_dir / "bin"
        if not link.exists():
            link.symlink_to(cached, target_is_directory=True)

    last_error: Exception | None = None
    for _ in range(3):  # a port picked here can be taken by someone else before the server binds it
        config = MilvusServerConfig(template=str(_write_template(base_dir)))
        # set by the package only when it picks its own template
        config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")
        ports = {key: _free_port() for key in config.configurable_items if key.endswith("_port")}
        etcd_yaml = _write_etcd_config(base_dir, client_port=ports["etcd_port"], peer_port=_free_port())
        server = MilvusServer(config, **ports)  # explicit ports: bind exactly these or fail
        server.config.set("etcd_config_path", str(etcd_yaml))
        server.webservice_port = _free_port()  # metrics/health HTTP port (METRICS_PORT), else 9091 upwards
        server.set_base_dir(str(base_dir))
        try:
            server.wait_for_started = False
            server.start()
            server.wait_started(timeout=int(start_timeout_s * 1000))
        except (RuntimeError, TimeoutError, OSError) as exc:
            last_error = exc
            server.stop()
            continue
        uri = f"http://127.0.0.1:{server.listen_port}"
        stopped = False

        def stop() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                server.stop()
                atexit.unregister(stop)

        atexit.register(stop)
        return uri, stop
    raise RuntimeError(f"Milvus server did not start under {base_dir}: {last_error}")


@contextlib.contextmanager
def milvus_server(base_dir: Path, *, bin_cache: Path | None = None, remove: bool = True) -> Iterator[str]:
    """Context manager around `start_milvus_server`: yields the uri, stops the server, removes `base_dir`."""
    uri, stop = start_milvus_server(base_dir, bin_cache=bin_cache)
    try:
        yield uri
    finally:
        stop()
        if remove:
            shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def milvus_server_uri() -> Iterator[str]:
    """URI ('http://127.0.0.1:<port>') of a Milvus standalone server shared by the test session."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="vitrine-milvus-"))
    with milvus_server(base, bin_cache=BIN_CACHE) as uri:
        yield uri


if __name__ == "__main__":  # manual check: python tests/milvus_server.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        with milvus_server(Path(tmp) / "m", bin_cache=BIN_CACHE) as u:
            print(f"Milvus up at {u} after {time.monotonic() - t0:.1f} s")
