# The two quick-start commands: `make train` and `make test`.
# Each creates .venv/ and installs the project on first use (torch comes from pip; never uv/poetry).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
# torch and torchvision as this machine holds them on disk; override on other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: train test lint install data serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev,serve]'
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/digitsum data

train: $(STAMP)
	$(BIN)/digitsum train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

serve: $(STAMP)
	$(BIN)/digitsum serve $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
