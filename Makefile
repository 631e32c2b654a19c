# make test: lint + tests.  make demo: the demo run.  Both set up .venv themselves first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint clean-venv

# Only sets up: a virtualenv with the project (editable) and its test extras, at the versions
# pinned in constraints.txt (torch==2.13.0 is the CPU build on this machine).
$(VENV): $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

lint: $(VENV)
	$(BIN)/ruff check pipeline flows tests

test: $(VENV) lint
	$(BIN)/python -m pytest -q --durations=15

demo: $(VENV)
	$(BIN)/jointdiff demo

clean-venv:
	rm -rf $(VENV)
