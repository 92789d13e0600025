# The course's commands. Each sets itself up: a fresh machine needs only Python 3.11+ and make.
#   make book   build the HTML book into book/_build/html (notebooks executed on mock devices)
#   make test   the whole test suite: unit, multi-rank, nbval, exercises, drills, book build
#   make lab    JupyterLab on the course
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shardlab-installed

.PHONY: setup book test lab clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

book: setup
	$(PY) scripts/build_book.py

test: setup
	$(PY) scripts/run_tests.py

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=.

clean:
	rm -rf book/_build
