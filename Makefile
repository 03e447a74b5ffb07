# Two commands on a fresh machine with only python3:
#   make demo   create .venv, install, run the demo
#   make test   create .venv, install the test extras, run the whole suite
# torch is installed first and on its own, so that no dependency range pulls a CUDA build.
# For a CUDA machine: make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://..."

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

PY  := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test venv install install-test benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamp files make re-runs no-ops until pyproject.toml or the torch spec changes.
$(VENV)/.torch-stamp: $(PY)
	$(PIP) install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $@

$(VENV)/.install-stamp: $(VENV)/.torch-stamp pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

# torchtitan (tests/test_foreign_sources.py writes a real torchtitan checkpoint) is installed
# without its requirements: they pin datasets<4.8 and pull wandb, tensorboard and torchdata, none
# of which its LoRA, optimizer and checkpointer use; these are what that path imports (and tyro needs).
TORCHTITAN := torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1

$(VENV)/.test-stamp: $(VENV)/.install-stamp pyproject.toml Makefile
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps $(TORCHTITAN)
	touch $@

venv: $(PY)
install: $(VENV)/.install-stamp
install-test: $(VENV)/.test-stamp

demo: $(VENV)/.install-stamp
	$(VENV)/bin/dist-adapters train configs/demo.yaml --set train.overwrite=true  # a rerun replaces runs/demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(VENV)/.test-stamp
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

benchmark: $(VENV)/.test-stamp
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
