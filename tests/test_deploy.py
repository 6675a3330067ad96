"""Deployment artefacts: docker-compose.yml, the retrieval image's Dockerfile, and the torch-free serving side.

No Docker engine runs here. `docker-compose config` (docker-compose 1.29.2, which parses, interpolates and
schema-validates a compose file without an engine) resolves the file; the tests assert on what it resolved.
`make test` installs that validator into its own venv (.cache/tools/docker-compose, see the Makefile): it needs
PyYAML<6, which the project venv cannot hold. docker-compose 1.29.2's `config` prints every service whatever
`--profile` says, so which services a profile set starts is computed here with the Compose-spec rule (a service
runs when it has no `profiles` or one of them is enabled).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from retrieval_service.settings import Settings
from tools.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "retrieval.Dockerfile"
HEALTH_SCRIPT = ROOT / "docker" / "grpc_health_check.py"
COMPOSE_TOOL = ROOT / ".cache" / "tools" / "docker-compose" / "bin" / "docker-compose"
HEAVY_DISTRIBUTIONS = {"torch", "torchvision", "open-clip-torch"}
HEAVY_MODULES = ("torch", "torchvision", "open_clip")
# Host-side variables the compose file reads; cleared so the developer's shell cannot change what is tested.
COMPOSE_VARIABLES = ("MODEL_REPOSITORY", "TRITON_IMAGE", "DOCKER_VOLUME_DIRECTORY", "VITRINE_IMAGE",
                     "COMPOSE_PROFILES", "COMPOSE_FILE", "COMPOSE_PROJECT_NAME")

MILVUS_STACK = {"etcd", "minio", "milvus", "retrieval"}


def _compose_binary() -> str:
    """The docker-compose validator: $VITRINE_DOCKER_COMPOSE, the Makefile's tool venv, or one on PATH."""
    candidates = [os.environ.get("VITRINE_DOCKER_COMPOSE"), str(COMPOSE_TOOL), shutil.which("docker-compose")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"docker-compose (the compose-file validator) not found: run `make test`, which installs it "
                f"into {COMPOSE_TOOL.parent.parent}, or set VITRINE_DOCKER_COMPOSE", pytrace=False)


@functools.cache
def _resolve(profiles: tuple[str, ...], variables: tuple[tuple[str, str], ...]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES and not k.startswith("VITRINE_")}
    env.update(variables)
    command = [_compose_binary(), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT)]
    for profile in profiles:
        command += ["--profile", profile]
    result = subprocess.run([*command, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return result.stdout


def compose_config(profiles: Sequence[str] = (), **variables: str) -> dict[str, Any]:
    """`docker-compose -f docker-compose.yml [--profile P]... config`, parsed; fails the test on a non-zero exit.

    Host variables other than `variables` that the file reads (and every VITRINE_*) are cleared first. Each
    distinct call runs docker-compose once per session (a few seconds each).
    """
    return yaml.safe_load(_resolve(tuple(profiles), tuple(sorted(variables.items()))))


def active_services(config: dict[str, Any], profiles: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Services that `docker compose --profile ... up` starts: no `profiles`, or one of them enabled."""
    return {name: service for name, service in config["services"].items()
            if not service.get("profiles") or set(service["profiles"]) & set(profiles)}


@pytest.fixture(scope="module")
def gpu_config() -> dict[str, Any]:
    return compose_config(["gpu", "metrics"])


@pytest.fixture(scope="module")
def cpu_config() -> dict[str, Any]:
    return compose_config(["cpu"])


# --- docker-compose.yml --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("profiles", "extra"), [
    ((), set()),
    (("cpu",), {"triton-cpu"}),
    (("gpu", "metrics"), {"triton", "prometheus"}),
])
def test_each_profile_validates_and_starts_one_encoder(profiles, extra):
    services = active_services(compose_config(profiles), profiles)
    assert set(services) == MILVUS_STACK | extra


def test_gpu_profile_reserves_gpus_and_cpu_profile_does_not(gpu_config, cpu_config):
    triton = active_services(gpu_config, ["gpu"])["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and triton["image"].endswith("-py3")

    cpu_services = active_services(cpu_config, ["cpu"])
    assert "triton" not in cpu_services
    assert all("deploy" not in s for s in cpu_services.values()), "a GPU reservation leaked into the CPU profile"
    # Same server otherwise: both answer as `triton` on the compose network, with the same command.
    assert cpu_services["triton-cpu"]["command"] == triton["command"]
    for service in (triton, cpu_services["triton-cpu"]):
        assert "triton" in service["networks"]["default"]["aliases"]
        assert "--model-repository=/models" in service["command"]


def test_model_repository_is_mounted_read_only_into_triton_and_the_service(tmp_path):
    repository = tmp_path / "exported-repo"
    config = compose_config(["gpu", "cpu"], MODEL_REPOSITORY=str(repository))
    for name in ("triton", "triton-cpu", "retrieval"):
        assert f"{repository}:/models:ro" in config["services"][name]["volumes"], name


def test_retrieval_environment_resolves_to_settings_pointing_at_triton_and_milvus(gpu_config, monkeypatch):
    environment = gpu_config["services"]["retrieval"]["environment"]
    for key in [k for k in os.environ if k.startswith("VITRINE_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.encoder_url == "triton:8001"
    assert settings.milvus_uri == "http://milvus:19530" and not settings.milvus_is_lite
    assert (settings.host, settings.port) == ("0.0.0.0", 50051)
    assert settings.model_repository == Path("/models")
    assert settings.index.index_type == "HNSW"
    assert settings.log_format == "json"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert f"retrieval:{settings.metrics_port}" in targets, "Prometheus scrapes another port than the service serves"
    blob_mount = next(v for v in gpu_config["services"]["retrieval"]["volumes"] if ":/var/lib/vitrine/blobs" in v)
    assert settings.blob_dir == Path("/var/lib/vitrine/blobs") and blob_mount.startswith("blobs:")


def test_endpoints_can_be_redirected_from_the_host_environment():
    config = compose_config(VITRINE_ENCODER_URL="triton-lb.internal:8001",
                            VITRINE_MILVUS_URI="https://milvus.example.com:19530", VITRINE_MILVUS_TOKEN="u:p")
    environment = config["services"]["retrieval"]["environment"]
    assert environment["VITRINE_ENCODER_URL"] == "triton-lb.internal:8001"
    assert environment["VITRINE_MILVUS_URI"] == "https://milvus.example.com:19530"
    assert environment["VITRINE_MILVUS_TOKEN"] == "u:p"


def test_every_service_has_a_healthcheck_and_startup_waits_on_milvus(gpu_config):
    services = active_services(gpu_config, ["gpu", "metrics"])
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["retrieval"]["healthcheck"]["test"][1:] == [
        "vitrine-healthcheck", "--target", "127.0.0.1:50051", "--service", "vitrine.v1.RetrievalService"]
    assert "http://localhost:8000/v2/health/ready" in services["triton"]["healthcheck"]["test"]
    assert "http://localhost:9091/healthz" in services["milvus"]["healthcheck"]["test"]
    assert services["retrieval"]["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert set(services["milvus"]["depends_on"]) == {"etcd", "minio"}


def test_published_ports_match_the_readme(gpu_config):
    published = {name: {p["published"] for p in service.get("ports", [])}
                 for name, service in gpu_config["services"].items()}
    assert published["retrieval"] == {50051}
    assert published["triton"] == {8000, 8001, 8002}
    assert 19530 in published["milvus"]
    assert not published["minio"] and not published["etcd"]


def test_prometheus_scrapes_triton_and_the_service(gpu_config):
    prometheus = active_services(gpu_config, ["gpu", "metrics"])["prometheus"]
    assert any(v.endswith(":/etc/prometheus/prometheus.yml:ro") for v in prometheus["volumes"])
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert {"triton:8002", "milvus:9091"} <= targets


# --- docker/retrieval.Dockerfile ------------------------------------------------------------------------------

def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_only_existing_unignored_sources_and_installs_serve():
    text = DOCKERFILE.read_text()
    ignored = _dockerignore_patterns()
    sources = re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE)
    assert sources
    for line in sources:
        for source in line.split():
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"Dockerfile copies {source}, which is not in the repository"
            assert path.split("/")[0] not in ignored, f".dockerignore hides {source} from the build context"
    install = re.findall(r"^RUN .*pip install[^\n]*", text, flags=re.MULTILINE)
    assert any('".[serve]"' in line for line in install), install
    assert not any(re.search(r"torch|open.clip|\[export\]|\[dev\]", line) for line in install), install
    assert "grpc_tools.protoc" in text  # stubs are generated in the image, not copied from a checkout
    assert {".venv", ".cache", "vitrine/v1"} <= set(ignored)


# --- docker/grpc_health_check.py (the container healthcheck) against a real grpc.health.v1 server ----------------

@pytest.fixture()
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _probe(target: str, service: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTH_SCRIPT), "--target", target, "--service", service,
                           "--timeout", "2"], capture_output=True, text=True, timeout=60)


def test_healthcheck_exits_zero_only_while_serving(health_server):
    target, servicer = health_server
    service = "vitrine.v1.RetrievalService"
    servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    serving = _probe(target, service)
    assert serving.returncode == 0 and "SERVING" in serving.stdout, serving

    servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    down = _probe(target, service)
    assert down.returncode == 1 and "NOT_SERVING" in down.stdout, down

    unknown = _probe(target, "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout, unknown


def test_healthcheck_fails_when_nothing_listens():
    result = _probe(f"127.0.0.1:{free_port()}", "")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stdout, result


# --- the serving side installs and imports without torch --------------------------------------------------------

def _load_constraints_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_constraints", ROOT / "docker" / "serve_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def constraints_tool() -> ModuleType:
    pytest.importorskip("tomllib")  # Python >= 3.11
    return _load_constraints_tool()


def test_serve_install_set_has_no_torch(constraints_tool):
    pyproject = ROOT / "pyproject.toml"
    serve = set(constraints_tool.closure(constraints_tool.project_requirements(pyproject, ("serve",))))
    assert {"tritonclient", "pymilvus", "grpcio", "tokenizers"} <= serve
    assert not serve & HEAVY_DISTRIBUTIONS, sorted(serve & HEAVY_DISTRIBUTIONS)
    # the same walk does find torch where it belongs, so the check above can fail
    export = set(constraints_tool.closure(constraints_tool.project_requirements(pyproject, ("export",))))
    assert {"torch", "open-clip-torch"} <= export


def test_image_constraints_pin_the_whole_serving_set(constraints_tool):
    """docker/constraints-serve.txt pins every member of the serving closure, within pyproject's ranges, no torch."""
    pins = {}
    for line in (ROOT / "docker" / "constraints-serve.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            pins[canonicalize_name(requirement.name)] = version
    requirements = constraints_tool.project_requirements(ROOT / "pyproject.toml", ("serve",))
    missing = set(constraints_tool.closure(requirements)) - set(pins)
    assert not missing, f"regenerate docker/constraints-serve.txt (docker/serve_constraints.py): {sorted(missing)}"
    for requirement in requirements:
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement} vs pinned {pinned}"
    assert not set(pins) & HEAVY_DISTRIBUTIONS
    assert "grpcio-tools" in pins  # the stubs stage generates with the pinned grpcio-tools


def test_serving_modules_import_without_torch():
    code = ("import json, sys; import retrieval_service.grpc.server, encoder_server.server, tools.cli; "
            f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
