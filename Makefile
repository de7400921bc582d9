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
	# grafana-client's niquests brings urllib3-future, whose .pth copies itself over urllib3 at
	# every start (requests-based tools such as schemathesis then break); niquests is as happy
	# with urllib3-future under its own name, so keep the real urllib3.
	rm -f $(VENV)/lib/python*/site-packages/urllib3_future.pth
	$(PIP) -q --force-reinstall --no-deps "urllib3>=2,<3"
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
