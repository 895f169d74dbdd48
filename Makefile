# Two commands do everything: `make demo` (local cloud + end-to-end demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit up down bench bench-events bench-worker bench-aggregate bench-federation bench-confidential lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpipe demo

test: $(STAMP)
	$(BIN)/pytest

test-unit: $(STAMP)
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

bench-aggregate: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python bench/aggregate.py

bench-federation: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python bench/federation.py

bench-confidential: $(STAMP)
	$(BIN)/python bench/confidential.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BENCH_VENV) .fedpipe .pytest_cache results
