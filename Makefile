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

# every loading method side by side (see BENCHMARKS.md): writes bench/results/<date>.json and .png and the
# tables of BENCHMARKS.md; matplotlib (the `bench` extra) is installed here only, `make test` does not need it
bench: setup
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m netloader bench --out bench/results --markdown BENCHMARKS.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
