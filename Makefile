# The two commands a newcomer needs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.netloader-setup
# SGLang gets its own environment: its pins (compressed-tensors, triton, …) differ from vLLM's test environment's.
SGL_VENV := .venv-sglang
SGL_PY := $(SGL_VENV)/bin/python
SGL_STAMP := $(SGL_VENV)/.netloader-setup

.PHONY: setup redis-server demo test lint bench clean

setup: redis-server $(STAMP) $(SGL_STAMP)

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

# The SGLang plugin's tests (tests/test_sglang.py, run by the pytest above) start real SGLang 0.5.23 engines on CPU
# with .venv-sglang's python. torch stays at 2.13.0 through a constraints file (an unpinned dependency would pull
# torch 2.14.1 and 6 GB of CUDA packages); SGLang goes in without its dependencies (its metadata pins a CUDA torch
# and GPU kernels), followed by what its engine imports on CPU, at the versions SGLang pins where it pins them.
SGLANG_PIN := sglang==0.5.23
SGLANG_CPU_DEPS := "transformers==5.19.0" "compressed-tensors==0.18.0" "apache-tvm-ffi==0.1.11" \
	"sentencepiece==0.2.1" "xgrammar==0.2.7" "openai==2.8.0" triton safetensors tqdm regex psutil pydantic msgspec \
	pyzmq pyyaml requests einops filelock prometheus_client aiohttp pillow pybase64 uvloop fastapi uvicorn orjson \
	partial_json_parser python-multipart setproctitle numpy scipy interegular packaging ipython dill gguf

$(SGL_STAMP): pyproject.toml Makefile
	test -x $(SGL_PY) || $(PYTHON) -m venv $(SGL_VENV)
	echo "torch==2.13.0" > $(SGL_VENV)/constraints.txt
	$(SGL_PY) -m pip install --quiet --upgrade pip
	$(SGL_PY) -m pip install --quiet -c $(SGL_VENV)/constraints.txt torch==2.13.0
	$(SGL_PY) -m pip install --quiet -c $(SGL_VENV)/constraints.txt -e .
	$(SGL_PY) -m pip install --quiet --no-deps $(SGLANG_PIN)
	$(SGL_PY) -m pip install --quiet -c $(SGL_VENV)/constraints.txt $(SGLANG_CPU_DEPS)
	$(SGL_PY) -c "import torch, sglang; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(SGL_STAMP)

demo: setup
	$(PY) -m netloader demo

test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

# every loading method side by side, then the fleet (fan-out, striping on emulated hosts; see BENCHMARKS.md): writes bench/results/<date>.json and .png and the
# tables of BENCHMARKS.md; matplotlib (the `bench` extra) is installed here only, `make test` does not need it
bench: setup
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m netloader bench --out bench/results --markdown BENCHMARKS.md
	OMP_NUM_THREADS=1 $(PY) -m netloader bench --fleet --out bench/results --markdown BENCHMARKS.md

clean:
	rm -rf $(VENV) $(SGL_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
