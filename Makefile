# make run  : set up .venv if missing, then run the default CPU RL job.
# make test : set up .venv if missing, then ruff, mypy and pytest.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
JOB ?= examples/tiny-grpo-cpu.toml
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test lint typecheck pytest bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --upgrade pip setuptools wheel
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'
	touch $@

RUN_DIR ?= runs/tiny-grpo-cpu-$(shell date +%Y%m%d-%H%M%S)

run: venv
	$(BIN)/milepost run $(JOB) --run-dir $(RUN_DIR) --dashboard

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # layering: pyproject.toml [tool.importlinter]

typecheck: venv
	$(BIN)/mypy engine daemon dashboard alerts bench

pytest: venv
	$(BIN)/pytest -q --durations=25

test: lint typecheck pytest

bench: venv
	$(BIN)/python bench/learning.py

clean:
	rm -rf $(VENV)
