# Two commands do everything: `make demo` (local cloud + end-to-end demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit up down bench bench-events bench-worker bench-aggregate bench-federation bench-confidential bench-device lint clean

# The worker image's lock constrains the dev venv: tests run with the JAX the images ship.
$(STAMP): pyproject.toml workers/trainer/requirements-cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -c workers/trainer/requirements-cpu.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpipe demo

# checkov (infra/ against its policies; tests/unit/test_infra_schema.py) pins libraries of its own: its own venv.
CHECKOV_VENV := .venv-checkov
$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==3.3.30
	@touch $@

test: $(STAMP) $(CHECKOV_VENV)/.installed
	$(BIN)/pytest

test-unit: $(STAMP) $(CHECKOV_VENV)/.installed
	$(BIN)/pytest tests/unit -q

up: $(STAMP)
	$(BIN)/fedpipe up

down: $(STAMP)
	$(BIN)/fedpipe down

# Flower pins protobuf/grpcio that clash with the google-cloud libraries: its own venv.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet "flwr[simulation]==1.42.0" jax==0.10.2 jaxlib==0.10.2 optax==0.2.8 numpy
	@touch $@

bench: bench-events bench-worker bench-aggregate bench-federation bench-confidential

bench-events: $(STAMP)
	$(BIN)/python bench/events.py

bench-worker: $(STAMP)
	$(BIN)/python bench/worker.py
	$(BIN)/python bench/worker.py --model mlp
	$(BIN)/python bench/worker.py --model wide

bench-aggregate: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python bench/aggregate.py

bench-federation: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python bench/federation.py

bench-device: $(STAMP)
	bash bench/device.sh

bench-confidential: $(STAMP)
	$(BIN)/python bench/confidential.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(CHECKOV_VENV) .fedpipe .pytest_cache results
