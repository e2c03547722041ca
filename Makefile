# `make demo` and `make test` each work on a fresh clone: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench chaos clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

bench: $(STAMP)
	$(PY) bench/run_all.py

chaos: $(STAMP)
	CHAOS_LONG=1 $(PY) -m pytest -q -s tests/test_chaos.py tests/test_numerics.py

clean:
	rm -rf demo_data demo_runs
