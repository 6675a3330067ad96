"""Serve a Vitrine model repository with NVIDIA Triton (PyTriton's bundled `tritonserver`).

The bundled tritonserver has no onnxruntime backend, so each tower is bound as a PyTriton model whose
inference callable runs the tower's `model.onnx` with ONNX Runtime in this process. Everything a stock
Triton would take from `config.pbtxt` is taken from it here too: the model name, input/output names,
dtypes and dims, `max_batch_size`, `dynamic_batching` (max_queue_delay_microseconds,
preferred_batch_size, ...), `instance_group` count (one inference callable, each with its own ORT
session, per instance) and `model_warmup` (run here before Triton starts, because PyTriton 0.7 accepts
but never runs model_warmup). Clients see standard KServe v2 gRPC/HTTP endpoints and Prometheus metrics.

What lives here: `EncoderServer` (lifecycle: start, readiness wait, serve_forever, stop), the PyTriton
binding of each model (inference callable, tensor specs, dynamic batcher from `dynamic_batching`), the
endpoint security default and the libpython workaround for the spawned tritonserver. Reading the
repository into ORT sessions, the signature check and the warm-up live in `encoder_server.repository`.

This module imports neither torch nor open_clip.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
from pytriton.model_config.common import TimeoutAction
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
from tritonclient.grpc import InferenceServerClient, model_config_pb2
from tritonclient.utils import InferenceServerException

from encoder_server.repository import ServedModel, discover_models, load_model, numpy_dtype, run_warmup

LOGGER = logging.getLogger(__name__)


def _make_infer_callable(
    session: ort.InferenceSession, input_names: Sequence[str], output_names: Sequence[str]
) -> Callable[..., dict[str, np.ndarray]]:
    """One instance's inference callable: the batched inputs in, the ONNX outputs out (same names)."""

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        results = session.run(list(output_names), {name: inputs[name] for name in input_names})
        return dict(zip(output_names, results))

    return infer


def _tensor(spec: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> Tensor:
    """PyTriton tensor spec of a config input/output (dims without the batch dimension)."""
    return Tensor(name=spec.name, dtype=numpy_dtype(spec.data_type), shape=tuple(spec.dims))


def _dynamic_batcher(config: model_config_pb2.ModelConfig) -> DynamicBatcher | None:
    if not config.HasField("dynamic_batching"):
        return None
    db = config.dynamic_batching
    policy = None
    if db.HasField("default_queue_policy"):
        qp = db.default_queue_policy
        policy = QueuePolicy(
            timeout_action=TimeoutAction(
                model_config_pb2.ModelQueuePolicy.TimeoutAction.Name(qp.timeout_action)
            ),
            default_timeout_microseconds=qp.default_timeout_microseconds,
            allow_timeout_override=qp.allow_timeout_override,
            max_queue_size=qp.max_queue_size,
        )
    return DynamicBatcher(
        max_queue_delay_microseconds=db.max_queue_delay_microseconds,
        preferred_batch_size=list(db.preferred_batch_size) or None,
        preserve_ordering=db.preserve_ordering,
        priority_levels=db.priority_levels,
        default_priority_level=db.default_priority_level,
        default_queue_policy=policy,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _python_libdir_first() -> Iterator[None]:
    """Put this interpreter's LIBDIR first in LD_LIBRARY_PATH while PyTriton spawns tritonserver.

    PyTriton builds the tritonserver environment from `os.environ.copy()` at spawn time
    (`pytriton.server.triton_server.TritonServer._get_env`) and only appends its own libs; the Python
    backend stub links `libpython3.X.so.1.0`, and a system copy of a different patch level found first
    breaks model loading (`'_thread.RLock' object has no attribute '_recursion_count'`). The variable
    is restored afterwards; this process's own loader is unaffected (glibc reads it at exec only).
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    previous = os.environ.get("LD_LIBRARY_PATH")
    if libdir:
        parts = [libdir] + [p for p in (previous or "").split(os.pathsep) if p and p != libdir]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = previous


class EncoderServer:
    """Triton (PyTriton) serving every model of a Vitrine model repository over KServe v2.

    Usage::

        with EncoderServer(Path("model_repository"), grpc_port=8001) as server:
            ...  # Triton answers on 127.0.0.1:8000 (HTTP), :8001 (gRPC), :8002 (metrics)

    Args:
        repository: the model repository (`<repo>/<model>/config.pbtxt`,
            `<repo>/<model>/<version>/model.onnx`).
        http_port, grpc_port, metrics_port: Triton's KServe v2 HTTP, gRPC and Prometheus metrics ports.
        host: bind address of all three endpoints (default loopback only).
        ort_threads: ONNX Runtime intra-op threads per session; None -> the config's
            `intra_op_thread_count` parameter, else ORT's default (one per core).
        providers: ONNX Runtime execution-provider allow-list (e.g. ["CPUExecutionProvider"]); None ->
            best available, TensorRT -> CUDA -> CPU (see `encoder_server.runtime`).
        restricted_endpoints: Triton endpoint groups ("statistics", "model-repository", "shared-memory",
            "trace", "logging") that require the `triton-access-token` header (`access_token`). None
            (default) -> open (no token) when `host` is a loopback address, PyTriton's default protected
            set when binding beyond loopback. Open statistics are needed by
            `tritonclient...get_inference_statistics` without a token.
        access_token: token for the restricted endpoints; None -> PyTriton generates one
            (`EncoderServer.access_token`).
        startup_timeout_s: how long `start()` waits for every model to be ready, seconds.
        workspace: PyTriton workspace folder (sockets, generated model store); None -> a temporary one.
        log_verbose: tritonserver verbose log level (0 = off).
    """

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        ort_threads: int | None = None,
        providers: Sequence[str] | None = None,
        restricted_endpoints: Sequence[str] | None = None,
        access_token: str | None = None,
        startup_timeout_s: float = 120.0,
        workspace: Path | None = None,
        log_verbose: int = 0,
    ) -> None:
        self.repository = Path(repository)
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.ort_threads = ort_threads
        self.providers = list(providers) if providers is not None else None
        if restricted_endpoints is None:
            restricted_endpoints = [] if _is_loopback(host) else None
        self._security = TritonSecurityConfig(
            access_token=access_token,
            restricted_endpoints=list(restricted_endpoints) if restricted_endpoints is not None else None,
        )
        self.startup_timeout_s = startup_timeout_s
        self.workspace = workspace
        self.log_verbose = log_verbose
        self.models: dict[str, ServedModel] = {}
        #: seconds spent in each phase of the last `start()`: sessions, warmup, triton, total.
        self.startup_timings: dict[str, float] = {}
        self._triton: Triton | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- info
    @property
    def grpc_url(self) -> str:
        """`host:port` of the KServe v2 gRPC endpoint (tritonclient.grpc form)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """`host:port` of the KServe v2 HTTP endpoint (tritonclient.http form)."""
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics endpoint."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def access_token(self) -> str | None:
        """Token for the restricted endpoints (None when nothing is restricted)."""
        return self._security.access_token

    def is_running(self) -> bool:
        """True while tritonserver and every bound model are alive."""
        return self._triton is not None and self._triton.is_alive()

    # --------------------------------------------------------------------------------------- lifecycle
    def start(self) -> EncoderServer:
        """Load every model, run its warmup, start Triton; return once all models are ready.

        Prefer calling it from a thread that lives as long as the server (normally the main thread):
        PyTriton spawns tritonserver with PR_SET_PDEATHSIG, which per prctl(2) fires when the spawning
        *thread* exits.

        Returns:
            self.

        Raises:
            encoder_server.repository.ModelRepositoryError: the repository or a model in it cannot be
                served.
            RuntimeError: already started, tritonserver failed to load a model, or it did not report
                every model ready within `startup_timeout_s`.
        """
        with self._lock:
            if self._triton is not None:
                raise RuntimeError("EncoderServer already started")
            t0 = time.perf_counter()
            try:
                self._load_models()
                t_sessions = time.perf_counter()
                for model_dir, served in self._model_dirs.items():
                    run_warmup(model_dir, served)
                t_warm = time.perf_counter()
                self._start_triton()
                self._wait_until_ready()
            except BaseException:
                self._shutdown()
                raise
            t_ready = time.perf_counter()
            self.startup_timings = {
                "sessions": t_sessions - t0,
                "warmup": t_warm - t_sessions,
                "triton": t_ready - t_warm,
                "total": t_ready - t0,
            }
            LOGGER.info(
                "encoder server ready in %.2f s (ORT sessions %.2f s, warmup %.2f s, tritonserver %.2f s): "
                "models %s; gRPC %s, HTTP %s, metrics %s",
                self.startup_timings["total"],
                self.startup_timings["sessions"],
                self.startup_timings["warmup"],
                self.startup_timings["triton"],
                sorted(self.models),
                self.grpc_url,
                self.http_url,
                self.metrics_url,
            )
            return self

    def stop(self) -> None:
        """Stop tritonserver and release the ONNX Runtime sessions. Safe to call more than once."""
        with self._lock:
            self._shutdown()

    def serve_forever(
        self, poll_interval_s: float = 1.0, on_ready: Callable[[EncoderServer], None] | None = None
    ) -> None:
        """Start (if needed) and serve until SIGINT/SIGTERM, then stop cleanly.

        The signal handlers are installed before starting, so a signal during startup also stops
        cleanly. Must be called from the main thread. Returns after the clean stop.

        Args:
            poll_interval_s: how often to check that tritonserver and the models are alive, seconds.
            on_ready: called once with this server when every model is ready.

        Raises:
            RuntimeError: tritonserver or a model died while serving.
        """
        stop_requested = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            LOGGER.info("received %s, stopping encoder server", signal.Signals(signum).name)
            stop_requested.set()

        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self._triton is None:
                self.start()
            if on_ready is not None:
                on_ready(self)
            while not stop_requested.wait(poll_interval_s):
                if not self.is_running():
                    raise RuntimeError("tritonserver or a bound model stopped unexpectedly")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __enter__(self) -> EncoderServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------- internals
    def _load_models(self) -> None:
        self._model_dirs: dict[Path, ServedModel] = {}
        for model_dir, config in discover_models(self.repository):
            served = load_model(model_dir, config, ort_threads=self.ort_threads, providers=self.providers)
            self._model_dirs[model_dir] = served
            self.models[config.name] = served

    def _start_triton(self) -> None:
        triton_config = TritonConfig(
            http_address=self.host,
            http_port=self.http_port,
            grpc_address=self.host,
            grpc_port=self.grpc_port,
            metrics_address=self.host,
            metrics_port=self.metrics_port,
            allow_metrics=True,
            strict_readiness=True,
            exit_on_error=True,
            log_verbose=self.log_verbose,
        )
        triton = Triton(config=triton_config, workspace=self.workspace, security_config=self._security)
        self._triton = triton
        for served in self.models.values():
            config = served.config
            inputs = [_tensor(t) for t in config.input]
            outputs = [_tensor(t) for t in config.output]
            input_names = [t.name for t in config.input]
            output_names = [t.name for t in config.output]
            triton.bind(
                model_name=served.name,
                model_version=served.version,
                infer_func=[_make_infer_callable(s, input_names, output_names) for s in served.sessions],
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(
                    batching=True,
                    max_batch_size=config.max_batch_size,
                    batcher=_dynamic_batcher(config),
                ),
                strict=True,
            )
        try:
            with _python_libdir_first():
                triton.run()
        except InferenceServerException as exc:
            raise RuntimeError(f"tritonserver could not load the models of {self.repository}: {exc}") from exc

    def _wait_until_ready(self) -> None:
        """Poll Triton over gRPC until the server and every model report ready (strict readiness)."""
        deadline = time.monotonic() + self.startup_timeout_s
        last_error: Exception | None = None
        with contextlib.closing(InferenceServerClient(self.grpc_url)) as client:
            while time.monotonic() < deadline:
                try:
                    if client.is_server_ready() and all(
                        client.is_model_ready(m.name, str(m.version)) for m in self.models.values()
                    ):
                        return
                except InferenceServerException as exc:
                    last_error = exc
                if self._triton is None or not self._triton.is_alive():
                    raise RuntimeError("tritonserver exited during startup (see the log above)")
                time.sleep(0.1)
        raise RuntimeError(
            f"models {sorted(self.models)} not ready on {self.grpc_url} after {self.startup_timeout_s} s"
            + (f": {last_error}" if last_error else "")
        )

    def _shutdown(self) -> None:
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()
        self.models.clear()
        self._model_dirs = {}

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: endpoints, models (version, instances, providers), startup timings."""
        return {
            "grpc": self.grpc_url,
            "http": self.http_url,
            "metrics": self.metrics_url,
            "models": {
                name: {
                    "version": m.version,
                    "instances": len(m.sessions),
                    "providers": m.sessions[0].get_providers() if m.sessions else [],
                    "max_batch_size": m.config.max_batch_size,
                }
                for name, m in self.models.items()
            },
            "startup_seconds": self.startup_timings,
        }
