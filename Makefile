# Atelier. `make serve` and `make test` each do all of their own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck zoo bench-service bench-quality bench-gpu chaos clean

$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m api.devserver

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy api contract store worker models bench

test: lint typecheck
	$(PY) -m pytest -q

zoo: $(STAMP)
	$(PY) zoo/train.py all

bench-service: $(STAMP)
	$(PY) -m bench.service

bench-quality: $(STAMP)
	$(PY) -m bench.quality

bench-gpu: $(STAMP)
	$(PY) -m bench.gpu

chaos: $(STAMP)
	$(PY) -m bench.chaos

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
