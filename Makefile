# The two commands of the README: `make demo` (the full pipeline, locally) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PYTHONUNBUFFERED := 1

.PHONY: demo test bench compile check-compiled clean

$(BIN)/gts-lum: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/gts-lum
	$(BIN)/python -m pipelines.run_local --output runs/demo

test: $(BIN)/gts-lum
	$(BIN)/pytest -q

bench: $(BIN)/gts-lum
	$(BIN)/gts-lum bench-all --output runs/bench

compile: $(BIN)/gts-lum
	$(BIN)/python -m pipelines.compile

clean:
	rm -rf runs local_outputs
