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

.PHONY: venv bytecode lint dataset engine masks updatable bench-train bench-masks gpu-check test test-fast clean serve serve-check serve-env verify-onnx $(STAGES)

$(STAMP): pyproject.toml
	$(PYTHON) tools/install-venv.py $(VENV) --extras test,lint
	touch $(STAMP)

venv: $(STAMP)

dataset:
	tools/ensure-dataset.sh

engine: $(DATASET) $(STAMP)
	$(PY) -m pipeline engine $(ARGS) $(if $(FORCE),--force)

$(STAGES): $(STAMP)
	$(PY) -m pipeline $@ $(ARGS)

$(DATA_STAGES) updatable serve-check: $(DATASET)

masks: train-masks

# the paper's "model stays updatable": fine-tune, re-apply saved masks, compare with masks learned afresh
updatable: $(STAMP)
	$(PY) -m pipeline updatable $(ARGS)

bench-train: $(STAMP)
	$(PY) -m pipeline bench-train --out $(OUT) $(EXTRA)

# On a machine with a CUDA GPU (not yet run on one): CUDA mask training, cuSPARSELt 2:4 GEMMs, TensorRT engines
# when tensorrt imports; writes $(OUT)/gpu_check.json (docs/tensorrt.md). Elsewhere it says so and exits 2.
gpu-check: $(STAMP)
	$(PY) -m pipeline gpu-check --out $(OUT) $(EXTRA)

# time to accuracy of mask training (docs/notebook/time-to-accuracy.md): per model one full-budget run, the plateau
# rule's stop read off it. The demo models are pretrained first (cached once dense.pt exists); other models:
# `python -m pipeline bench-masks --model M --out OUT` (their weights, --data DIR).
BENCH_MODELS ?= fmnist_resnet fmnist_resnet18
bench-masks: dataset $(STAMP)
	for model in $(BENCH_MODELS); do \
	  $(PY) -m pipeline pretrain --model $$model --out $(OUT) && \
	  $(PY) -m pipeline bench-masks --model $$model --out $(OUT) $(EXTRA) || exit $$?; \
	done

# Triton on CPU machines (docs/triton.md): tritonserver 2.51 from the nvidia-pytriton wheel, Python backend only.
# Its Python-backend stub needs numpy<2 and perf_analyzer comes with tritonclient 2.51, so they live in
# $(TRITON_ENV), a venv layered on .venv (a .pth file adds .venv's packages), and .venv keeps its numpy.
TRITON_ENV ?= .venv-triton
TRITON_STAMP := $(TRITON_ENV)/.installed
TRITON_PACKAGES := nvidia-pytriton==0.7.0 'numpy<2' tritonclient==2.51.0

$(TRITON_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[serve]'
	$(PY) -m venv --without-pip $(TRITON_ENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(TRITON_ENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_project_venv.pth"
	$(PY) -m pip --python $(TRITON_ENV)/bin/python install --no-deps $(TRITON_PACKAGES)
	touch $(TRITON_STAMP)

serve-env: $(TRITON_STAMP)

# make serve MODEL=.. [HTTP_PORT=8000 GRPC_PORT=8001]: the CPU repository in the foreground on 127.0.0.1
serve: $(TRITON_STAMP)
	$(PY) -m pipeline serve $(ARGS) --triton-env $(TRITON_ENV) \
	  $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT))

serve-check: $(TRITON_STAMP)
	$(PY) -m pipeline serve-check $(ARGS) --triton-env $(TRITON_ENV)

# Gate any sparse model against its dense model, no recipe (docs/ci-gate.md):
#   make verify-onnx DENSE=dense.onnx SPARSE=sparse.onnx DATA=DIR|fashion_mnist|synthetic [VERIFY_ARGS="--mean 0.5 --std 0.25"]
verify-onnx: $(STAMP)
	@test -n "$(DENSE)" -a -n "$(SPARSE)" || { echo "error: make verify-onnx needs DENSE=dense.onnx SPARSE=sparse.onnx (and DATA=...)" >&2; exit 2; }
	$(PY) -m pipeline verify --dense $(DENSE) --sparse $(SPARSE) $(if $(DATA),--data $(DATA)) $(VERIFY_ARGS)

# Where PYTHONDONTWRITEBYTECODE is set (this workplace sets it), Python never caches compiled modules and every
# process compiles what it imports from source: `import torch` 4.0 s instead of 2.4 s, paid by each of the
# suite's ~200 CLI subprocesses. The test targets compile .venv once (about 30 s; uv, unlike pip, does not compile
# at install) and the package each run (only what changed). Elsewhere Python caches by itself and this is skipped.
BYTECODE_STAMP := $(VENV)/.bytecode
$(BYTECODE_STAMP): $(STAMP)
	$(if $(PYTHONDONTWRITEBYTECODE),$(PY) -m compileall -q -j 0 "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")" \
	  > /dev/null || echo "note: compileall could not compile every file in .venv (torch ships one written for Python 3.12); the rest is compiled")
	touch $(BYTECODE_STAMP)

bytecode: $(BYTECODE_STAMP)
	$(if $(PYTHONDONTWRITEBYTECODE),$(PY) -m compileall -q -j 0 pipeline tests > /dev/null)

# ruff (lint and format check) and mypy (check_untyped_defs on pipeline/), configured in pyproject.toml;
# .ci/run runs this before the tests. `ruff format` and `ruff check --fix` mend most of what it reports.
LINTED := pipeline tests tools examples
lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

# the full suite (what CI runs); the server tests (marker `triton`) run on $(TRITON_ENV)
test: dataset $(STAMP) $(TRITON_STAMP) bytecode
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the inner loop: everything not marked slow (end-to-end CLI runs, benchmarks)
test-fast: $(STAMP) bytecode
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(OUT)/*/ $(OUT)/*.json
