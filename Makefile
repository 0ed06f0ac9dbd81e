# The README's commands. PY is the Python of the active virtual environment.
PY ?= python

.PHONY: install demo test

install:
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .

demo:
	$(PY) -m flashcore demo

test:
	$(PY) -m pytest -q
