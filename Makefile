# Two entry points, each works on a fresh machine with Python >= 3.10:
#   make demo   - create .venv if missing, install, train a tiny VAE on embedded photos, export it
#   make test   - create .venv if missing, install with test extras, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/latentae demo --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs
