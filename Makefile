# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch side of `make hf-check` lives in its own venv: the project itself never needs torch.
HF_VENV := .venv-hf
HF_STAMP := $(HF_VENV)/.installed
HF_PACKAGES := torch==2.13.0 transformers==5.23.0 safetensors==0.8.0 tokenizers==0.23.3 numpy
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-all lint format env hf-check clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The tests also plan TPU topologies (train.plan), with libtpu's compiler where it has a wheel.
TPU_STAMP := $(VENV)/.installed-tpu
$(TPU_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,tpu]'
	touch $(TPU_STAMP)

env: $(STAMP)

$(HF_STAMP):
	$(PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/python -m pip install -q --upgrade pip
	$(HF_VENV)/bin/python -m pip install -q $(HF_PACKAGES)
	touch $(HF_STAMP)

# Prepares the default corpus (cached), trains the routed demo (ERC MoE + routing attention),
# evaluates the checkpoint in a fresh process and writes the routing report.
demo: $(STAMP)
	$(BIN)/python -m train.train --config=configs/demo.py --workdir=$(DEMO_DIR)
	$(BIN)/python -m eval.evaluate --workdir=$(DEMO_DIR) --baseline
	$(BIN)/python -m eval.routing_report --workdir=$(DEMO_DIR) > $(DEMO_DIR)/routing_report.log
	@echo "Routing report: $(DEMO_DIR)/report/routing_report.md (plots beside it)"

# Two worker processes: compilation is single-threaded, so the 2-core CI machine runs ~20% faster.
# --dist loadscope keeps each test module on one worker, so a module's fixtures (a reference run)
# are built once, not on both workers (284 s against 298 s, cold compilation cache).
test: $(TPU_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope $(PYTEST_ARGS)

# Everything, the slow proofs included (whole sharded trainings, multi-process runs, every model type).
test-all: $(TPU_STAMP)
	ROUTED_TEST_FULL_XLA=1 $(BIN)/python -m pytest -q -n 2 --dist loadscope -m '' $(PYTEST_ARGS)

# Style: ruff (configured in pyproject.toml); `make format` rewrites, `make lint` only checks (CI).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Trains the tiny dense and top-k MoE models briefly, exports each (eval.export_hf) and checks that
# transformers (CPU torch, in .venv-hf) gives the same logits, greedy tokens and tokenizer ids.
hf-check: $(STAMP) $(HF_STAMP)
	$(BIN)/python -m benchmarks.hf_check --hf_python=$(HF_VENV)/bin/python

clean-demo:
	rm -rf $(DEMO_DIR)
