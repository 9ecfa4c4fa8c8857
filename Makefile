# Quick start: `make demo` and `make test`. Both create .venv when missing and install the project,
# torch first (pinned here: an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test check-slurm lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the shipped samples: FASTA -> dataset -> a short CPU training -> generated sequences.
demo: $(STAMP)
	$(VENV)/bin/evo2 preprocess -c configs/preprocess/samples.yaml \
		--set preprocess.output_dir=$(DEMO_DIR)/dataset --overwrite
	$(VENV)/bin/evo2 train -c configs/train/tiny-cpu.yaml --set train.run_dir=$(DEMO_DIR)/train \
		--set "data.datasets=[{path: $(DEMO_DIR)/dataset}]" --overwrite
	$(VENV)/bin/evo2 infer generate $(DEMO_DIR)/train -p ATGAAACGCATTAGCACCACCATTACCACC -n 120 \
		--num-samples 2 --seed 0 --threads 1 -o $(DEMO_DIR)/generated.fa --overwrite
	@echo "demo outputs: $(DEMO_DIR)/dataset (dataset), $(DEMO_DIR)/train (checkpoints, metrics.jsonl),"
	@echo "              $(DEMO_DIR)/generated.fa (sampled continuations)"

test: $(STAMP)
	$(VENV)/bin/pytest -q

# Opt-in, as root: the SLURM example under a real one-node SLURM (installs it with apt-get; docs/train.md).
check-slurm: $(STAMP)
	EVO2_PYTHON=$(PY) examples/slurm/check_under_slurm.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
