# The two set-up commands of the README: `make quickstart` (the main job) and `make test`.
# Each creates its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test docs benchmarks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python recipes/quickstart.py --output-dir runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

docs: $(STAMP)
	$(BIN)/mkdocs serve

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build site
