# make install: .venv alone.  make test: lint + tests.  make demo: the demo run.  make docs: the documentation site, built strictly into
# site/ (offline).  Each sets up .venv itself first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint docs clean-venv

# Only sets up: a virtualenv with the project (editable) and its test, bench and docs extras, at the
# versions pinned in constraints.txt (torch==2.13.0 is the CPU build on this machine).
$(VENV): $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench,docs]'
	touch $(STAMP)

install: $(VENV)

lint: $(VENV)
	$(BIN)/ruff check pipeline flows tests mkdocs_hooks.py

test: $(VENV) lint
	$(BIN)/python -m pytest -q --durations=15

demo: $(VENV)
	$(BIN)/jointdiff demo

# The reference pages (CLI, configuration, Python API) are generated during the build by mkdocs_hooks.py;
# nothing is fetched from the network. NO_MKDOCS_2_WARNING: mkdocs-material's banner about MkDocs 2.
docs: $(VENV)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
