"""Helpers shared by the reliability, fuzz and soak tests: servers that can be killed and restarted on the same
ports, health polling, unique image sets, stored-id listing.

Everything is real: the encoder is `vitrine serve-encoder` (Triton) as a child process, Milvus is the `milvus`
package's standalone server (tests/milvus_server.py) or Milvus Lite, the retrieval service is `vitrine serve` as
a child process or `create_server(settings)` in-process.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageOps

from tools.processes import Child, free_port, spawn

SERVICE = "vitrine.v1.RetrievalService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- health -----------------------------------------------------------------------------------------------------

async def health_status(target: str, timeout_s: float = 2.0) -> int:
    """The service's grpc.health.v1 status (SERVING / NOT_SERVING); UNKNOWN (0) when it does not answer."""
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout_s)
            return resp.status
    except grpc.aio.AioRpcError:
        return health_pb2.HealthCheckResponse.UNKNOWN


async def wait_health(target: str, wanted: int, timeout_s: float = 120.0, poll_s: float = 0.05) -> float:
    """Poll health until it reports `wanted`; return the seconds waited.

    Raises:
        TimeoutError: `wanted` not reached within `timeout_s` seconds.
    """
    t0 = time.monotonic()
    while (status := await health_status(target)) != wanted:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"health of {target} stayed {status}, wanted {wanted} after {timeout_s:.0f} s")
        await asyncio.sleep(poll_s)
    return time.monotonic() - t0


def wait_health_sync(target: str, wanted: int = SERVING, timeout_s: float = 120.0,
                     alive: Callable[[], bool] | None = None) -> float:
    """Blocking `wait_health` (for synchronous tests and threads); `alive` False aborts early."""
    t0 = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2).status == wanted:
                    return time.monotonic() - t0
            except grpc.RpcError:
                pass
            if alive is not None and not alive():
                raise RuntimeError(f"the process behind {target} exited")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{target} did not report {wanted} within {timeout_s:.0f} s")
            time.sleep(0.1)


# --- the encoder server as a killable child ---------------------------------------------------------------------

@dataclass
class EncoderProcess:
    """`vitrine serve-encoder` in its own process group on fixed ports, so it can be killed and restarted there."""

    repository: Path
    log_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    child: Child | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        """Triton KServe v2 gRPC host:port."""
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        """Spawn the server (returns at once; see `wait_ready`)."""
        self.starts += 1
        self.child = spawn(f"encoder-{self.starts}", [
            "serve-encoder", "--repository", str(self.repository), "--grpc-port", str(self.grpc_port),
            "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port)], self.log_dir)

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Block until Triton reports both tower models (manifest `triton_model`) READY; return the seconds
        waited. (PyTriton loads models after the server answers, so server readiness alone is too early.)"""
        import tritonclient.grpc as triton_grpc  # noqa: PLC0415

        from vitrine.manifest import Manifest  # noqa: PLC0415

        manifest = Manifest.read(self.repository)
        models = [manifest.image.triton_model, manifest.text.triton_model]
        assert self.child is not None
        t0 = time.monotonic()
        client = triton_grpc.InferenceServerClient(self.url)
        try:
            while True:
                if not self.child.alive():
                    raise RuntimeError(f"encoder exited ({self.child.proc.returncode}):\n{self.child.tail()}")
                try:
                    if all(client.is_model_ready(m) for m in models):
                        return time.monotonic() - t0
                except Exception:  # noqa: BLE001 - tritonclient raises its own error types while it starts
                    pass
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"encoder not ready after {timeout_s:.0f} s:\n{self.child.tail()}")
                time.sleep(0.1)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the whole process group (tritonserver included), as a crash would; wait for it."""
        if self.child is not None and self.child.alive():
            os.killpg(self.child.proc.pid, signal.SIGKILL)
            self.child.proc.wait(30)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), killing the group if it lingers."""
        if self.child is not None:
            self.child.stop()
            try:
                os.killpg(self.child.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- a Milvus server that can be stopped and started again on the same ports and data -------------------------

class MilvusProcess:
    """A Milvus standalone server (the `milvus` package) of our own, restartable on the same ports and data.

    Built like `tools.milvus_server.start_milvus_server` (private etcd ports, cached binaries), but keeps
    the `MilvusServer` object so `stop()` / `start()` can be called again mid-test; the session-wide server of
    the other tests is never touched.
    """

    def __init__(self, base_dir: Path) -> None:
        import milvus  # noqa: PLC0415
        from milvus import MilvusServer, MilvusServerConfig  # noqa: PLC0415
        from milvus_server import BIN_CACHE  # noqa: PLC0415
        from tools.milvus_server import prepare_bin_cache, write_etcd_config, write_template  # noqa: PLC0415

        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "bin"
        if not link.exists():
            link.symlink_to(prepare_bin_cache(BIN_CACHE), target_is_directory=True)
        config = MilvusServerConfig(template=str(write_template(self.base_dir)))
        config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")
        ports = {key: free_port() for key in config.configurable_items if key.endswith("_port")}
        etcd_yaml = write_etcd_config(self.base_dir, client_port=ports["etcd_port"], peer_port=free_port())
        # The package probes each port with a plain bind(); after a stop, the server's closed connections
        # leave the ports in TIME_WAIT for a minute, which that probe (no SO_REUSEADDR) takes for "in use"
        # while the Go server itself binds them fine. Probe the way the server binds.
        config.try_bind_port = _bind_reusable
        self.server = MilvusServer(config, **ports)
        self.server.config.set("etcd_config_path", str(etcd_yaml))
        self.server.webservice_port = free_port()
        self.server.set_base_dir(str(self.base_dir))
        self.server.wait_for_started = False
        self.uri = ""

    def start(self, timeout_s: float = 120.0) -> float:
        """Start (or restart) the server and wait until it answers; return the seconds it took."""
        t0 = time.monotonic()
        self.server.start()
        self.server.wait_started(timeout=int(timeout_s * 1000))
        self.uri = f"http://127.0.0.1:{self.server.listen_port}"
        return time.monotonic() - t0

    def stop(self) -> None:
        """Terminate the server (the package's stop: SIGTERM, SIGKILL after 1 s)."""
        self.server.stop()


def _bind_reusable(port: int) -> socket.socket | None:
    """A listening loopback socket on `port` with SO_REUSEADDR (as Go's net.Listen sets it), or None."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


# --- the retrieval service as a child -----------------------------------------------------------------------------

@dataclass
class ServiceProcess:
    """`vitrine serve` as a child process on a free port."""

    child: Child
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def rss_bytes(self) -> int:
        """Resident set size of the service process (not its children), bytes."""
        return int(psutil.Process(self.child.proc.pid).memory_info().rss)


def start_service(repository: Path, encoder_url: str, milvus_uri: str, blob_dir: Path, log_dir: Path, *,
                  name: str = "retrieval", env: dict[str, str] | None = None,
                  timeout_s: float = 120.0) -> ServiceProcess:
    """Spawn `vitrine serve` on a free port and wait until it reports SERVING."""
    port = free_port()
    child = spawn(name, ["serve", "--repository", str(repository), "--port", str(port), "--encoder-url",
                         encoder_url, "--milvus-uri", milvus_uri, "--blob-dir", str(blob_dir)], log_dir, env=env)
    svc = ServiceProcess(child, port)
    try:
        wait_health_sync(svc.target, SERVING, timeout_s, alive=child.alive)
    except (RuntimeError, TimeoutError) as exc:
        child.stop()
        raise RuntimeError(f"{exc}\n{child.tail()}") from exc
    return svc


# --- data ---------------------------------------------------------------------------------------------------------

def png_bytes(img: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def unique_images(demo, count: int) -> list[tuple[bytes, str, dict]]:  # noqa: ANN001 - conftest PreparedDemo
    """`count` images with distinct bytes: the demo's held-out digit PNGs, then variants of them (mirrored,
    inverted, rotated) when more are asked for. Returns (png bytes, filename, metadata {"label", "variant"})."""
    variants: list[tuple[str, Callable[[Image.Image], Image.Image]]] = [
        ("orig", lambda im: im), ("mirror", ImageOps.mirror), ("invert", lambda im: ImageOps.invert(im.convert("RGB"))),
        ("rot90", lambda im: im.rotate(90)), ("flip", ImageOps.flip)]
    out: list[tuple[bytes, str, dict]] = []
    seen: set[str] = set()
    for name, fn in variants:
        for item in demo.items:
            if len(out) == count:
                return out
            raw = (demo.dataset / item.filename).read_bytes()
            content = raw if name == "orig" else png_bytes(fn(Image.open(io.BytesIO(raw))))
            digest = hashlib.sha256(content).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            out.append((content, f"{name}_{item.filename}", {"label": int(item.label), "variant": name}))
    if len(out) < count:
        raise ValueError(f"only {len(out)} unique images available, {count} asked")
    return out


def sha256_hex(content: bytes) -> str:
    """Lowercase hex sha256 of `content` (the service's image id)."""
    return hashlib.sha256(content).hexdigest()


def stored_ids(uri: str, collection: str) -> list[str]:
    """Every id stored in `collection` at `uri` (a Milvus Lite file or server), read with a fresh MilvusClient
    and Strong consistency; duplicates, if any, are kept so callers can check there are none."""
    from pymilvus import MilvusClient  # noqa: PLC0415

    client = MilvusClient(uri=uri)
    try:
        rows = client.query(collection, filter='id != ""', output_fields=["id"], limit=16384,
                            consistency_level="Strong")
        ids = [r["id"] for r in rows]
        return ids
    finally:
        client.close()
