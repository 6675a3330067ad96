"""Start and stop a real Milvus standalone server (the `milvus` PyPI package, "Milvus 2.3.5-lite").

Used by `vitrine bench scale` and by the tests (tests/milvus_server.py is the pytest plugin over it).

The package ships the server binaries (lzma-compressed, ~56 MB -> ~390 MB), so this works offline. Each server
gets its own base directory (config, logs, etcd, data) and free TCP ports chosen by the OS, so several can run
side by side. Decompressing the binaries takes ~5 s of the ~7 s start; pass `bin_cache` (a directory kept
between runs) to decompress them once: the server's `<base_dir>/bin` then becomes a symlink to it.

    with milvus_server(tmp_path / "milvus") as uri:
        client = MilvusClient(uri)
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Decompressed server binaries, kept between runs (the project's cache root, as in tests/conftest.py).
DEFAULT_BIN_CACHE = Path(os.environ.get("VITRINE_CACHE_DIR", ".cache")) / "milvus-bin-2.3.5"
#: Seconds to wait for the server to exit after SIGTERM; then SIGKILL. (Its graceful shutdown often takes
#: ~60 s; the data of a test or benchmark server is thrown away, so it is not waited for.)
STOP_GRACE_S = 3.0
#: Seconds to wait for the process to go after SIGKILL (freeing GBs of memory takes a while on busy cores).
KILL_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_template(base_dir: Path) -> Path:
    """The package's milvus.yaml template plus `etcd.config.path`.

    The package leaves embedded etcd on etcd's default listeners (client 2379, peer 2380), so a second server
    on the machine dies with "listen tcp 127.0.0.1:2380: bind: address already in use". Milvus reads an etcd
    config file from `etcd.config.path` (pkg/util/etcd/etcd_server.go), which we add.
    """
    import milvus  # noqa: PLC0415 - milvus: a [dev] extra (server binaries), not in the serving image

    template = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text()
    anchor = "  use:\n    embed: true"
    if anchor not in template:
        raise RuntimeError(f"milvus {milvus.__version__}: unexpected config template (no '{anchor}')")
    template = template.replace(anchor, "  config:\n    path: {{ etcd_config_path }}\n" + anchor, 1)
    path = base_dir / "milvus.yaml.template"
    path.write_text(template)
    return path


def write_etcd_config(base_dir: Path, *, client_port: int, peer_port: int) -> Path:
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


def prepare_bin_cache(bin_cache: Path) -> Path:
    """Decompress the package's binaries into `bin_cache/bin` once (file-locked across processes)."""
    import milvus  # noqa: PLC0415 - milvus: a [dev] extra, not in the serving image

    bin_cache.mkdir(parents=True, exist_ok=True)
    with open(bin_cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Private helper of milvus 2.3.5: decompresses data/bin/*.lzma into <dir>/bin, skipping files whose
        # .lzma.md5 marker matches (it writes the marker after the binary, so a crash leaves no false marker).
        milvus._initialize_data_files(str(bin_cache))  # noqa: SLF001
    return bin_cache / "bin"


@dataclass
class MilvusServerProcess:
    """A running Milvus standalone server.

    Attributes:
        uri: 'http://127.0.0.1:<port>' for `MilvusClient`.
        pid: process id of the server binary (`milvus run standalone`, embedded etcd inside), e.g. for psutil.
        base_dir: its config, logs (`logs/milvus-stderr.log`), etcd and data.
        stop: terminates the server (idempotent; also registered with atexit).
    """

    uri: str
    pid: int
    base_dir: Path
    stop: Callable[[], None]


def start_milvus_server_process(
    base_dir: Path, *, bin_cache: Path | None = None, start_timeout_s: float = 120.0
) -> MilvusServerProcess:
    """Start a Milvus standalone server whose files live under `base_dir` (created; the caller removes it).

    Args:
        base_dir: directory for its config, logs, etcd and data.
        bin_cache: optional directory holding the decompressed binaries across runs (see module doc).
        start_timeout_s: how long to wait for its health endpoint, seconds.

    Raises:
        RuntimeError: the server did not start in 3 tries (ports taken meanwhile, or see
            `<base_dir>/logs/milvus-stderr.log`).
    """
    import milvus  # noqa: PLC0415 - milvus: a [dev] extra, not in the serving image
    from milvus import MilvusServer, MilvusServerConfig  # noqa: PLC0415 - the same

    base_dir = Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    if bin_cache is not None:
        cached = prepare_bin_cache(Path(bin_cache).resolve())
        link = base_dir / "bin"
        if not link.exists():
            link.symlink_to(cached, target_is_directory=True)

    last_error: Exception | None = None
    for _ in range(3):  # a port picked here can be taken by someone else before the server binds it
        config = MilvusServerConfig(template=str(write_template(base_dir)))
        # set by the package only when it picks its own template
        config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")
        ports = {key: _free_port() for key in config.configurable_items if key.endswith("_port")}
        etcd_yaml = write_etcd_config(base_dir, client_port=ports["etcd_port"], peer_port=_free_port())
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
        stopped = False

        def stop(server: MilvusServer = server) -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                atexit.unregister(stop)
                # The package's own stop() waits 1 s after SIGTERM and 3 s after SIGKILL, then raises
                # TimeoutExpired: too short for a server holding millions of rows on busy cores.
                proc = server.server_proc
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=KILL_TIMEOUT_S)
                server.stop()  # closes its log files

        atexit.register(stop)
        return MilvusServerProcess(
            uri=f"http://127.0.0.1:{server.listen_port}", pid=int(server.server_proc.pid), base_dir=base_dir,
            stop=stop,
        )
    raise RuntimeError(f"Milvus server did not start under {base_dir}: {last_error}")


def start_milvus_server(
    base_dir: Path, *, bin_cache: Path | None = None, start_timeout_s: float = 120.0
) -> tuple[str, Callable[[], None]]:
    """`start_milvus_server_process` returning only (uri, stop), as tests/milvus_server.py does."""
    proc = start_milvus_server_process(base_dir, bin_cache=bin_cache, start_timeout_s=start_timeout_s)
    return proc.uri, proc.stop


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
