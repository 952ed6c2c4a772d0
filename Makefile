# Two commands for a fresh machine: `make run` serves the default model, `make test` runs everything CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
# torch first and pinned: anything that asks for plain "torch" would otherwise pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt

.PHONY: run test test-fast test-container lint bench export docs clean help gpu-rehearsal gpu-rehearsal-quick

help:
	@echo "make run     - create .venv if needed and serve $${EFFNET_MODEL:-efficientnet-lite0} at http://$(HOST):$(PORT)"
	@echo "make test    - install the dev extras and run the tests, linters and validators"
	@echo "make test-fast - the unit tests without the slow ones (well under a minute)"
	@echo "make test-container - build the CPU image and test it and the compose stack (docker or podman; part of make test)"
	@echo "make lint    - ruff and the deployment validators only"
	@echo "make bench   - the benchmark suite (writes docs/benchmarks.md)"
	@echo "make export  - export the default model to ONNX (artifacts/)"
	@echo "make docs    - regenerate README's settings table from service/core/settings.py"
	@echo "make gpu-rehearsal - the GPU check on this CPU, in the GPU machine's package set plus the carried wheels"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-run: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) $(TORCH)
	$(PIP) -e .
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-run
	$(PIP) -e '.[dev]'
	@touch $@

# checkov has many pinned dependencies of its own: it lives in its own venv so it cannot move ours.
.venv-checkov/.stamp: constraints-checkov.txt
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install --disable-pip-version-check -r constraints-checkov.txt
	@touch $@

# kserve's SDK (the test of KServe's own V2 clients) pins many dependencies too: its own venv as well.
.venv-kserve/.stamp: constraints-kserve.txt
	$(PYTHON) -m venv .venv-kserve
	.venv-kserve/bin/python -m pip install --disable-pip-version-check -r constraints-kserve.txt
	@touch $@

# No load balancer sits in front of a local run, so Ctrl-C skips the lame duck (unless you set the delay).
run: $(VENV)/.stamp-run
	EFFNET_SHUTDOWN_DELAY_S=$${EFFNET_SHUTDOWN_DELAY_S:-0} $(BIN)/efficientnet-serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.stamp-dev .venv-checkov/.stamp
	$(BIN)/ruff check model service tests benchmarks
	bash scripts/validate_deploy.sh

# The set-up steps are independent (this project's venv and the linters, the GPU rehearsal's venv and its
# check, KServe's venv): side by side. Then the in-process unit tests over two processes (pytest-xdist, a
# file to a process), and the tests that start servers, containers and load balancers one at a time: their
# latency bounds and process checks want the machine to themselves. The schemathesis file goes with the
# second part: its cases share one test id per function, which xdist cannot tell apart (it would run one
# operation of each). Both parts run even if the first fails.
FUZZ := tests/unit/test_fuzz_openapi.py
test:
	$(MAKE) --no-print-directory -j3 --output-sync=target lint gpu-rehearsal-quick .venv-kserve/.stamp
	$(BIN)/python -m pytest -n 2 --dist loadfile tests/unit --ignore=$(FUZZ); unit=$$?; \
	$(BIN)/python -m pytest $(FUZZ) tests/container tests/deploy tests/integration; rest=$$?; \
	[ $$unit -eq 0 ] && [ $$rest -eq 0 ]

# The GPU check (benchmarks/gpu_check.sh) rehearsed on the CPU in a venv holding only what the GPU machine
# has plus the wheels benchmarks/gpu_wheels.sh fetches: a dependency the wheel list misses fails here, not
# on a lent GPU. The quick form (the service part: the server's imports, start and answers) is part of
# `make test`; .venv-rehearsal and .whl-py* are kept between runs.
gpu-rehearsal-quick:
	bash benchmarks/gpu_check.sh --rehearse-quick

gpu-rehearsal:
	bash benchmarks/gpu_check.sh --rehearse

# The inner loop: in-process unit tests only, without the ones that build real networks.
test-fast: $(VENV)/.stamp-dev
	$(BIN)/python -m pytest tests/unit -m "not slow" -q

# The image and the compose stack for real (tests/container): one image build, then the containers.
test-container: $(VENV)/.stamp-dev
	$(BIN)/python -m pytest tests/container -m container

bench: $(VENV)/.stamp-dev
	$(PIP) -e ".[dev,bench]"
	$(BIN)/python -m benchmarks.run_all

export: $(VENV)/.stamp-dev
	$(BIN)/python -m model.export --variant $${EFFNET_MODEL:-efficientnet-lite0} --output artifacts/model.onnx --with-features \
		$$( [ -z "$${EFFNET_WEIGHTS:-}" ] || echo --weights $$EFFNET_WEIGHTS )

docs: $(VENV)/.stamp-run
	$(BIN)/python scripts/settings_table.py

clean:
	rm -rf $(VENV) .venv-checkov .venv-kserve .venv-rehearsal .whl-py* .pytest_cache artifacts
