# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-all lint format env clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

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
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope $(PYTEST_ARGS)

# Everything, the slow proofs included (whole sharded trainings, multi-process runs, every model type).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m '' $(PYTEST_ARGS)

# Style: ruff (configured in pyproject.toml); `make format` rewrites, `make lint` only checks (CI).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-demo:
	rm -rf $(DEMO_DIR)
