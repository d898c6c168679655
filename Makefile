# One way to run each thing. Every target builds its own virtualenv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check

CORE_SOURCES := CMakeLists.txt pyproject.toml $(wildcard cpp/*.cpp cpp/*.h cpp/cpu/*.cpp cpp/cpu/*.h cpp/cuda/*.cu bindings/*.cpp)

.PHONY: install test serve bench fetch clean

# Dependencies first, torch pinned so pip takes the CPU wheel on local disk
# instead of downloading a multi-GB CUDA build.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install scikit-build-core pybind11 "numpy>=1.26" "gguf>=0.10" "tokenizers>=0.21" \
		"jinja2>=3.1" "safetensors>=0.4" "tqdm>=4.66" "triton>=3.6" "pytest>=8" "transformers>=4.46" "accelerate>=1.0" \
		"nvidia-cuda-nvrtc>=13" "fastapi>=0.110" "uvicorn>=0.29" "prometheus-client>=0.20" "grpcio>=1.60" \
		"grpcio-tools>=1.60" "openai>=1.0" "httpx>=0.27" "matplotlib>=3.8"
	touch $@

# The C++ core is rebuilt whenever its sources change; Python edits are live (editable).
$(VENV)/.installed: $(VENV)/.deps $(CORE_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

fetch: install
	$(VENV)/bin/lockstep fetch

test: fetch
	$(PY) -m pytest -q -rs tests

serve: fetch
	$(VENV)/bin/lockstep serve

# Every `lockstep bench` mode on this machine, results under bench/results/cpu (bench/cpu.sh).
bench: fetch
	bash bench/cpu.sh

clean:
	rm -rf build $(VENV)
