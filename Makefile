# Vitrine — the verbs a newcomer can guess. Each installs the project venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/vitrine/v1/*.proto)
GEN    := vitrine/v1/.generated

.PHONY: setup proto demo test bench clean

setup: $(STAMP) $(GEN)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Python stubs for the public API, generated into the importable package vitrine.v1.
$(GEN): $(STAMP) $(PROTOS)
	mkdir -p vitrine/v1
	$(PY) -m grpc_tools.protoc -Iproto \
	  -I$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
	  --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch vitrine/v1/__init__.py $@

proto: $(GEN)

demo: setup
	$(VENV)/bin/vitrine demo

# docker-compose 1.29.2 validates docker-compose.yml offline (tests/test_deploy.py). Own venv: it needs PyYAML<6,
# and PyYAML 5.4.1 builds on Python 3.11 only with Cython<3 (yaml/pyyaml#601).
COMPOSE_VENV   := .cache/tools/docker-compose
DOCKER_COMPOSE := $(COMPOSE_VENV)/bin/docker-compose
$(DOCKER_COMPOSE):
	$(PYTHON) -m venv $(COMPOSE_VENV)
	echo 'cython<3' > $(COMPOSE_VENV)/constraints.txt
	PIP_CONSTRAINT=$(COMPOSE_VENV)/constraints.txt $(COMPOSE_VENV)/bin/pip install -q docker-compose==1.29.2

# A real redis-server for the embedding-cache tests (tests/redis_server.py): Debian's package where none is on PATH.
REDIS_SERVER := $(or $(shell command -v redis-server),/usr/bin/redis-server)
SUDO         := $(if $(filter 0,$(shell id -u)),,sudo)
$(REDIS_SERVER):
	command -v redis-server >/dev/null || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends redis-server)

test: setup $(DOCKER_COMPOSE) $(REDIS_SERVER)
	$(PY) -m pytest tests

# Short versions of every benchmark (~15 min on 2 cores), then docs/benchmarks.md from their results.
# The encoder, search and ingest runs use open_clip ViT-B-32 with random weights (exported once into .cache/bench):
# weights don't change speed, and it is the realistic cost model.
BENCH_OUT ?= bench_out
bench: setup
	$(VENV)/bin/vitrine bench encoder --quick --out $(BENCH_OUT)
	$(VENV)/bin/vitrine bench search --quick --model ViT-B-32 --out $(BENCH_OUT)
	$(VENV)/bin/vitrine bench ingest --quick --model ViT-B-32 --out $(BENCH_OUT)
	$(VENV)/bin/vitrine bench scale --quick --out $(BENCH_OUT)
	$(VENV)/bin/vitrine bench quantization --quick --out $(BENCH_OUT)
	$(VENV)/bin/vitrine bench docs --out $(BENCH_OUT) --page docs/benchmarks.md

clean:
	rm -rf vitrine/v1 .cache demo_out var .pytest_cache bench_out
