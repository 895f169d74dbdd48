# Two commands do everything: `make demo` (local cloud + end-to-end demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test up down bench bench-events lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpipe demo

test: $(STAMP)
	$(BIN)/pytest

up: $(STAMP)
	$(BIN)/fedpipe up

down: $(STAMP)
	$(BIN)/fedpipe down

bench-events: $(STAMP)
	$(BIN)/python bench/events.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .fedpipe .pytest_cache
