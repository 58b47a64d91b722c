# duet: the two set-up commands are `make demo` and `make test`; both work from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned: torch==2.13.0 is a CPU build on the dev and CI machines,
# while an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@if command -v apt-get >/dev/null 2>&1 && ! command -v bwrap >/dev/null 2>&1; then \
		echo "installing bubblewrap for the sandbox (optional layer)"; \
		(apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1)) \
		|| echo "bubblewrap not installed (needs root); the sandbox will use its other layers"; \
	fi
	touch $(STAMP)

install: $(STAMP)

# Exit code 3 (the agents did not agree) is an answer, not a failure of the demo.
demo: $(STAMP)
	$(VENV)/bin/duet solve "A library had 120 books. It got 5 boxes of 12 books each. How many books does it have now?" \
		|| [ $$? -eq 3 ]

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -x --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
