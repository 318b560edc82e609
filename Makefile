# Two entry points (see README): `make demo` and `make test`.
# Both create ./.venv if needed and install the package with pinned versions.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo's backbone (standin:demo) is pretrained on first use and cached under $$PEFT_FISHERTUNE_CACHE
# (default ~/.cache/peft_fishertune); the last lines printed are the mIoU table and where the run went.
demo: $(STAMP)
	$(BIN)/accelerate launch --num_processes 1 --cpu scripts/train.py --config configs/demo.yaml
	@$(BIN)/python scripts/demo_report.py --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

.PHONY: install demo test
