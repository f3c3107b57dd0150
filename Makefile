# Every target uses the virtual environment at .venv (made by `make install`).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# e.g. make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install demo test test-slow docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: with the default pin pip takes the CPU build (no CUDA wheels).
	$(BIN)/python -m pip install -q $(TORCH)
	# torch is already there, so the package's `torch>=2.4` is satisfied and nothing is re-downloaded.
	$(BIN)/python -m pip install -q -e ".[dev,quant]"  # quant: quantization= backends (tests run them)
	# litdata (data=shards, diffusion_lab.prepare) without its torchvision requirement: see pyproject.toml
	$(BIN)/python -m pip install -q --no-deps "litdata>=0.2.76,<0.3"
	$(BIN)/python -c "import diffusion_lab, diffusers, transformers, pytorch_lightning, hydra, wandb, torchmetrics, litdata, skimage, bitsandbytes, torchao, optimum.quanto"
	touch $(STAMP)

install: $(STAMP)

## The main job: train the demo pixel diffusion model (flow matching) on scikit-learn digits, sample, export.
demo: $(STAMP)
	$(BIN)/python -m diffusion_lab.train experiment=ddpm_digits

## The default test suite (CPU, ~12 min of tests on 2 cores; multi-process DDP/FSDP2/two-node, kill+resume, wheel and ladder tests are in test-slow, ~19 min).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

## The docs site (docs/, mkdocs.yml) into site/; `.venv/bin/mkdocs serve` serves it with live reload.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict
