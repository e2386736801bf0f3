# gnnscale — the README's two commands (`make demo`, `make test`) do all the set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gnnscale-installed
NPROC_DEMO ?= 2
SERVERS_DEMO ?= 2

.PHONY: install demo test lint typecheck unit bench-partition bench-train bench-allreduce clean

install: $(STAMP)
	@$(PY) -m gnnscale.comm.build --if-stale  # a build folder overwritten from other sources

# Re-runs only when the pins or the package metadata change; quick (no-op) otherwise.
$(STAMP): requirements.lock pyproject.toml $(wildcard csrc/*.cpp)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m gnnscale.comm.build  # best effort: says why and exits 0 when it cannot compile
	@touch $(STAMP)

demo: install
	$(PY) examples/demo.py --servers $(SERVERS_DEMO) --nproc-per-server $(NPROC_DEMO)

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench-partition: install
	$(PY) benchmarks/partition/run.py

bench-train: install
	$(PY) benchmarks/train/run.py

# Loopback first, then a simulated cluster of 2 servers x 4 processes on 1 Gbit/s links (root).
bench-allreduce: install
	$(PY) benchmarks/allreduce/run.py
	$(VENV)/bin/gnnscale launch --simulate-servers 2 -G 4 --link-rate 1gbit -- benchmarks/allreduce/shaped.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache demo-parts
