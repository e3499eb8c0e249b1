# Two commands do everything on a fresh machine (each installs what it needs first):
#   make demo   train ADNet on synthetic phantoms and evaluate it (about 8 minutes on 2 CPU cores, measured 7 min 46 s)
#   make test   run the test suite (about 9 minutes on 2 CPU cores, measured 8 min 56 s with the install)
#   make check  the fast part of it, for development (under 2 minutes): everything not marked slow
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: install demo test check clean-runs

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PYTHON=$(abspath $(PY)) bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

check: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

clean-runs:
	rm -rf runs/demo
