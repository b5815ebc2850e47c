# Quick start: `make demo` and `make test` each create .venv and install the pinned stack.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,serve,serve-test,onednn
# The oneDNN convolution kernel (clseg_jax/kernels): built after the install; without a compiler
# or oneDNN it says so in one line and conv_impl=auto means XLA, unless ONEDNN_REQUIRE=1 (CI).
KERNEL := clseg_jax/kernels/_build/libclseg_onednn.so
ONEDNN_REQUIRE ?=
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow lint bench bench-accel wheels-accel baselines install clean serve kernels

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	echo "$(EXTRAS)" > $(STAMP)

$(KERNEL): clseg_jax/kernels/conv_onednn.cc $(STAMP)
	$(BIN)/python -m clseg_jax.kernels.build $(if $(ONEDNN_REQUIRE),--require)

kernels: $(KERNEL)

install: $(STAMP) $(KERNEL)

# The default experiment: domain-incremental shapes, naive fine-tuning against joint training.
demo: $(STAMP) $(KERNEL)
	$(BIN)/python -m clseg_jax.main --config=configs/shapes_di.py:compare --workdir=runs/demo

# The service in embedded mode (SQLite, a local folder, an in-process worker) on loopback.
SERVE_PORT ?= 8000
serve: $(STAMP) $(KERNEL)
	$(BIN)/python -m clseg_jax.serve serve --port $(SERVE_PORT)

# Two pytest workers (pytest-xdist), one test file each at a time so module fixtures run once:
# most tests are dominated by XLA compilation, which is single-threaded. Files go out longest
# first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order).
PYTEST_WORKERS ?= 2

test: $(STAMP) $(KERNEL)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=15

# Full-size runs (minutes each); not part of `make test`.
test-slow: $(STAMP) $(KERNEL)
	$(BIN)/python -m pytest -q -ra -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP) $(KERNEL)
	$(BIN)/python experiments/bench_step.py --out experiments/results/bench_step.json

# Issue 17: W1-W4 at accelerator presets on a GPU/TPU machine, with that machine's own Python
# (PY=python3, no venv); what it lacks comes from $(ACCEL_WHEELS), fetched beforehand by
# `make wheels-accel` on a machine with network (experiments/bench_accel.py).
ACCEL_WHEELS ?= wheels/accel
bench-accel:
	$(PY) experiments/bench_accel.py --wheels $(ACCEL_WHEELS) --out experiments/results/bench_accel.json

wheels-accel:
	$(PY) experiments/bench_accel.py --download $(ACCEL_WHEELS)

# W2 side by side with PyTorch/Avalanche (experiments/baselines/README.md), in its own venv so that
# .venv stays the core install. Pass e.g. BASELINES_ARGS="--strategies naive,ewc".
BASELINES_VENV := .venv-baselines
BASELINES_STAMP := $(BASELINES_VENV)/.installed

$(BASELINES_STAMP): requirements.txt pyproject.toml
	test -x $(BASELINES_VENV)/bin/python || $(PY) -m venv $(BASELINES_VENV)
	$(BASELINES_VENV)/bin/python -m pip install -q -r requirements.txt -e ".[baselines,onednn]"
	$(BASELINES_VENV)/bin/python -m clseg_jax.kernels.build
	touch $(BASELINES_STAMP)

baselines: $(BASELINES_STAMP)
	$(BASELINES_VENV)/bin/python experiments/baselines/compare.py \
		--out experiments/results/baselines_w2.json $(BASELINES_ARGS)

clean:
	rm -rf $(VENV) runs
