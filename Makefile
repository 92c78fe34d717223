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

# The site check loads every page of the built site in headless Chromium with no network
# (Debian's chromium package, installed by docs/_ext/ensure_chromium.sh when it is missing)
# and writes screenshots to build/site-check/.
test: $(STAMP)
	bash docs/_ext/ensure_chromium.sh
	$(BIN)/python -m pytest -n 2 --durations=15
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site
	$(BIN)/python docs/_ext/check_site.py build/site --out build/site-check

docs: $(STAMP)
	$(BIN)/mkdocs serve

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build site
