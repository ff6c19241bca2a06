# The two commands a newcomer needs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.netloader-setup

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch==2.13.0 goes in first: on this kind of machine it resolves to a local CPU wheel, while an unpinned
# torch would pull several GB of CUDA packages. The package itself only asks for a range (torch>=2.4).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m netloader demo

test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/ceiling.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
