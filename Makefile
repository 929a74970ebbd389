# The two commands: `make demo` and `make test`. Each sets up what it needs on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kt-installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
RECIPE ?= demo
ARGS ?=

.PHONY: setup assets test test-slow test-all gpu-check demo clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned (pip takes these from the local disk here); then kt with its test, asset and s3 extras
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,assets,s3]'
	touch $@

assets:
	@[ -d $(FMNIST) ] || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

setup: $(STAMP) assets

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# on a CUDA machine: every gpu-marked test, then the GPU benchmark (tools/gpu_check.sh does the same on a
# machine without the venv, from wheels in .whl/)
gpu-check: setup
	$(PY) -m pytest -q -m gpu $$(grep -l "mark.gpu" tests/test_*.py) $(PYTEST_ARGS)
	$(PY) -m tools.bench gpu --json

# `make demo` runs recipes/demo.yaml; `make demo RECIPE=full` (or paper, seg, ...) another recipe, `ARGS="--only ..."`
demo: setup
	$(PY) -m kt.recipe.cli run recipes/$(RECIPE).yaml $(ARGS)

clean:
	rm -rf $(VENV) runs data .pytest_cache
