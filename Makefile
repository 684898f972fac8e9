# Every target creates/updates .venv from pyproject.toml when needed.
MODEL ?= fmnist_resnet
OUT ?= engines
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Optional overrides passed to every stage: make engine MODEL=resnet50 WEIGHTS=random DATA=synthetic
ARGS = --model $(MODEL) --out $(OUT) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(DATA),--data $(DATA)) \
       $(foreach s,$(SET),--set $(s)) $(EXTRA)

# `make <stage> MODEL=..` runs `python -m pipeline <stage>` with the arguments above.
STAGES := pretrain train-masks bake export build verify package check-manifest compare certify layers curves
DATA_STAGES := pretrain train-masks verify compare certify

# Fashion-MNIST models without DATA= read the Debian package: install it first (or say how, exit 2).
DATASET := $(if $(DATA),,$(if $(filter fmnist_%,$(MODEL)),dataset))

.PHONY: venv dataset engine masks updatable bench-train test test-fast clean $(STAGES)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install torch torchvision
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

dataset:
	tools/ensure-dataset.sh

engine: $(DATASET) $(STAMP)
	$(PY) -m pipeline engine $(ARGS) $(if $(FORCE),--force)

$(STAGES): $(STAMP)
	$(PY) -m pipeline $@ $(ARGS)

$(DATA_STAGES) updatable: $(DATASET)

masks: train-masks

# the paper's "model stays updatable": fine-tune, re-apply saved masks, compare with masks learned afresh
updatable: $(STAMP)
	$(PY) -m pipeline compare --updatable $(ARGS)

bench-train: $(STAMP)
	$(PY) -m pipeline bench-train --out $(OUT) $(EXTRA)

# the full suite (what CI runs)
test: dataset $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the inner loop: everything not marked slow (end-to-end CLI runs, benchmarks)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(OUT)/*/ $(OUT)/*.json
