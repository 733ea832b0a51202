# Every target sets up what it needs. On a fresh machine that means a .venv with the exact versions
# of requirements.lock, then an editable build of the extension. In an environment that already has
# torch (e.g. a GPU machine without network), point PY at its interpreter: `make test PY=python3`.

PY ?= .venv/bin/python
# What `make lock` resolves afresh into requirements.lock; the other targets install the lock.
TORCH ?= torch==2.14.1
TOOLS = pip numpy ninja setuptools wheel pybind11 pytest pytest-benchmark hypothesis expecttest ruff \
        matplotlib tqdm transformers diffusers timm scikit-learn
SOURCES = setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
PYTEST_ARGS ?=

ifeq ($(PY),.venv/bin/python)
ENV_READY = .venv/.ready
endif

.PHONY: test bench bench-check profile lint info lock clean

test: build/.extension
	@if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check . ; fi
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# THP_MEM_ALLOC_ENABLE: PyTorch backs large CPU tensors with transparent huge pages, so a fresh
# 64 MiB buffer costs 32 page faults instead of 16384 (see fastseq/bench/allocator.py).
bench: build/.extension
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m fastseq bench $(SUITES)

# A fresh run against the committed results: fails when a speedup moved by more than 20%.
# Its reports go to build/bench-check, leaving the committed ones alone.
CHECK_DIR ?= benchmarks/results/cpu
bench-check: build/.extension
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m fastseq bench --compare $(CHECK_DIR) --out build/bench-check $(SUITES)

profile: build/.extension
	$(PY) -m fastseq profile $(SUITES)

info: build/.extension
	$(PY) -m fastseq info

lint: $(ENV_READY)
	$(PY) -m ruff check .

.venv/.ready: requirements.lock
	python3 -m venv .venv
	.venv/bin/python -m pip install -q -r requirements.lock
	touch $@

# The newest releases of TORCH and TOOLS, resolved in a scratch venv, become the new lock.
lock:
	rm -rf build/lock-venv && python3 -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install -q --upgrade $(TORCH) $(TOOLS)
	{ sed -n '/^#/p' requirements.lock; build/lock-venv/bin/python -m pip freeze --all; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf build/lock-venv

build/.extension: $(ENV_READY) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

clean:
	rm -rf build fastseq/_C*.so *.egg-info
