# The two commands of the README: `make demo` (the full pipeline, locally) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PYTHONUNBUFFERED := 1

.PHONY: demo test bench compile clean

$(BIN)/gts-lum: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/gts-lum
	$(BIN)/python -m pipelines.run_local --output runs/demo

test: $(BIN)/gts-lum
	$(BIN)/pytest -q

# The figures of BENCHMARKS.md (reads ../shared/data; tens of minutes on 2 cores).
bench: $(BIN)/gts-lum
	$(BIN)/gts-lum speed --out runs/bench/speed
	$(BIN)/gts-lum bench --config movielens --out runs/bench/movielens
	$(BIN)/gts-lum bench --config synth --out runs/bench/synth
	$(BIN)/gts-lum table-auc --out runs/bench/table_auc

compile: $(BIN)/gts-lum
	$(BIN)/python -m pipelines.compile

clean:
	rm -rf runs local_outputs
