# Two entry points for a fresh machine:  `make demo` (set up + zero-shot detection on the synthetic set)
# and `make test` (set up + the test suite). Both create .venv; neither pulls a CUDA build of torch:
# torch is installed first, pinned by TORCH. On the project's machines `torch==2.13.0` resolves to a CPU wheel kept on
# disk; elsewhere choose the build: TORCH="torch --index-url https://download.pytorch.org/whl/cpu" (CPU) or a CUDA one.
# The other libraries are installed at the tested versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MODEL ?= facebook/vit-mae-base
PY := $(VENV)/bin/python

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=10

demo: setup
	$(VENV)/bin/maeday synthetic demo/data --seed 0
	$(VENV)/bin/maeday detect demo/data/*/test --model $(MODEL) --out demo/results

clean:
	rm -rf $(VENV) demo
