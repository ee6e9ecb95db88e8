# The two entry points of the README: `make demo` (the whole pipeline on a tiny model, on CPU)
# and `make test`. Both create and reuse the virtual environment .venv at the repository root.
SHELL := /bin/bash
# The first Python 3.12 that really runs (a pyenv shim for a version that is not selected fails).
PYTHON312 ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 \
                                     $(HOME)/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null) \
                              $$(command -v python3.12); do \
                 "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
                 && echo "$$p" && break; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean-venv

$(STAMP): pyproject.toml setup.py constraints.txt clinmega/data/_ngrams.c
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,launch]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/clinmega demo --out runs/demo

test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
