# Two set-up commands: `make demo` and `make test`. Both create .venv and install phenolens into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= demo_out

.PHONY: install demo test test-slow bench bad-input clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch 2.13.0 (pinned first so nothing pulls a CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/phenolens demo $(OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) bench/translate.py

# the issue-9 bad-input suite: the real CLI against ~75 hostile inputs; a table, then
# "N cases: X data loss, Y tracebacks, Z silently wrong" (exit 1 unless all three are 0)
bad-input: $(STAMP)
	$(PY) bench/bad_input.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
