# The two commands a newcomer needs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.netloader-setup

.PHONY: setup redis-server demo test lint bench clean

setup: redis-server $(STAMP)

# torch==2.13.0 goes in first: on this kind of machine it resolves to a local CPU wheel, while an unpinned
# torch would pull several GB of CUDA packages. The package itself only asks for a range (torch>=2.4).
# The vLLM plugin's tests run the real vLLM 0.33.0 on its CPU platform. vLLM's metadata pins a CUDA torch, so
# vLLM goes in without its dependencies, followed by what its config, model construction and loading import.
VLLM_PIN := vllm==0.33.0
VLLM_CPU_DEPS := "transformers>=5.16.1,<5.21" safetensors tqdm regex cachetools psutil pydantic msgspec \
	cloudpickle pyzmq pyyaml blake3 py-cpuinfo requests sentencepiece einops filelock openai prometheus_client \
	cbor2 aiohttp openai-harmony pillow pybase64 uvloop xgrammar fastapi partial-json-parser llguidance

# The registry tests run a real redis-server (Debian's package); installed here when missing. Needs root (CI and
# the project's machines are); otherwise it stops with what to install.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make setup: redis-server is missing and this is not root: run 'sudo apt-get install -y redis-server'" >&2; \
	    exit 1; \
	  fi; \
	  command -v apt-get >/dev/null 2>&1 || { echo "make setup: redis-server is missing and there is no apt-get: install redis-server (Redis 6.2 or later)" >&2; exit 1; }; \
	  echo "make setup: installing redis-server (apt-get)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null && \
	  command -v redis-server >/dev/null || { echo "make setup: apt-get could not install redis-server" >&2; exit 1; }; \
	}

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(VLLM_PIN)
	$(PY) -m pip install --quiet $(VLLM_CPU_DEPS)
	$(PY) -m pip install --quiet --no-deps compressed-tensors==0.17.0 loguru
	$(PY) -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
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
