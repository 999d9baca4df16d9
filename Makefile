# make test: every test: the library, the notebook pairing, every chapter under nbval, the course
#            kit and JupyterLab in Chromium; beside them the website is built (make book), then
#            every page of it is checked in Chromium (tests/test_site.py).
# make book: execute the chapters and build the website into book/_build/html, warnings as errors.
# make lab:  open the chapters in JupyterLab.
# make student: the course kit in course/build: student notebooks, autograder bundles, answer key.
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

.PHONY: install test test-without-site test-site lint book lab student clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[book,dev,course]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check mmtl_lib tests benchmarks book

# The chapters run twice (nbval, and the book's execution), each on one core: side by side on two.
test: install lint
	$(MAKE) -j2 --output-sync=line test-without-site book
	$(MAKE) test-site

test-without-site: install
	$(PY) -m pytest -m "not site"

test-site: install
	MMTL_REQUIRE_SITE=1 $(PY) -m pytest -m site tests/test_site.py

book: install
	$(PY) -m sphinx -b html -c book -W --keep-going . book/_build/html

# The repository's JupyterLab settings (.jupyter/lab/settings/overrides.json) open a chapter's .md
# as a notebook; --allow-root only where make runs as root (a container, CI).
lab: install
	$(VENV)/bin/jupyter lab --LabApp.app_settings_dir="$(CURDIR)/.jupyter/lab/settings" \
		$(if $(filter 0,$(shell id -u)),--allow-root) chapters/

# The course kit: student notebooks, otter autograder bundles, the answer key (mmtl_lib/course.py).
student: install
	$(PY) -m mmtl_lib.course student --out course/build --force

clean:
	rm -rf book/_build
