# The two commands: `make demo` runs the main job end to end, `make test` runs the whole suite.
# Both create (or reuse) .venv and install the project with what it needs; nothing else is set up by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ogclip demo --config infra/configs/demo.yaml

test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/model.py
	$(PY) bench/kg.py
	$(PY) bench/data.py
	$(PY) bench/train.py
	$(PY) bench/serve.py
	$(PY) bench/retrieval.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
