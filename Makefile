# make test: every test (library, notebook pairing, every chapter under nbval).
# make book: execute the chapters and build the website into book/_build/html.
# make lab:  open the chapters in JupyterLab.
# Each one creates .venv and installs the project into it first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data/omniglot)

# One thread each: on a 2-core machine torch's default of two OpenMP threads made elementwise
# ops ~20x slower as soon as another process held a core. Override: make test MMTL_THREADS=4.
export MMTL_THREADS ?= 1
export OMP_NUM_THREADS ?= $(MMTL_THREADS)
ifneq ($(wildcard $(SHARED_DATA)/omniglot-py),)
export MMTL_DATA ?= $(SHARED_DATA)
endif

.PHONY: install test lint book lab clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[book,dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check mmtl_lib tests benchmarks book

test: install lint
	$(PY) -m pytest

book: install
	$(PY) -m sphinx -b html -c book . book/_build/html

lab: install
	$(VENV)/bin/jupyter lab chapters/

clean:
	rm -rf book/_build
