# Every target sets up what it needs: `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: setup data demo lint test test-unit test-integration test-all bench study clean

setup: $(STAMP)

# Recreate the environment when the dependencies change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# The default dataset: Debian's package when we can install it, else a checked download.
data: setup
	@if [ -f $(DATASET_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(DATASET_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }; \
	else \
		$(VENV)/bin/prunelab fetch fashion-mnist; \
	fi

# The main job: LeNet-300-100 on Fashion-MNIST pruned to 90% in one cycle.
demo: data
	$(VENV)/bin/prunelab run --method progressive --sparsity 0.9 --epochs 30

# The layers contract (pyproject.toml, [tool.importlinter]) and pyflakes' checks (unused or undefined names).
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check --select F src tests benchmarks examples

# Unit tests first (fast, in this process), then the tests that start interpreters, torchrun or Ray.
test: test-unit test-integration

test-unit: data
	$(PY) -m pytest -q -m 'not slow and not integration' --durations=15

test-integration: data
	$(PY) -m pytest -q -m 'integration and not slow' --durations=15

test-all: data
	$(PY) -m pytest -q -m ''

# The seeds' comparison on Fashion-MNIST, at equal cycle length and at matched budgets (about 16 core-hours:
# 8 hours with 2 workers on 2 cores; resumable: run it again).
STUDY_STORE ?= runs/study
# Resumable: each sweep skips what the store holds. The report checks studies/claims.yaml.
STUDY_SWEEPS = seeds-fashion-mnist seeds-fashion-mnist-hybrid budget-fashion-mnist seeds-fashion-mnist-lenet5 \
	seeds-fashion-mnist-lenet5-channel
study: data
	for s in $(STUDY_SWEEPS); do $(VENV)/bin/prunelab sweep studies/$$s.yaml --store $(STUDY_STORE) --no-progress || true; done
	$(VENV)/bin/prunelab report --store $(STUDY_STORE) --out docs/results/seeds-fashion-mnist --claims studies/claims.yaml

bench: data
	$(PY) benchmarks/masking_overhead.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/structured.py

clean:
	rm -rf $(VENV) .pytest_cache
