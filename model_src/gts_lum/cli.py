"""The `gts-lum` command: every stage of the pipeline as a subcommand (`gts-lum STAGE --help`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gts_lum.config import load_config, parse_overrides
from gts_lum.serving.options import add_server_arguments

# Each command imports its stage inside its function: a stage brings torch, transformers, scikit-learn or
# kserve (seconds), and `gts-lum --help` or a data command should not wait for the rest.


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_synth(args) -> None:
    from gts_lum.data.simulator import SimulatorConfig, simulate

    path = args.config if args.config.endswith((".yaml", ".yml")) else f"pkg:synth/{args.config}.yaml"
    _print(simulate(load_config(SimulatorConfig, path, args.set), args.out))


def cmd_ingest(args) -> None:
    from gts_lum.data.ingest import prepare_dataset

    clean = prepare_dataset(args.source, args.out, mapping=args.mapping, synth_overrides=args.set)
    _print(json.loads((clean / "validation_summary.json").read_text()))
    print(f"clean data set: {clean}")


def cmd_validate(args) -> None:
    from gts_lum.data.validate import ValidationConfig, validate_dataset

    _print(validate_dataset(args.raw, args.out, load_config(ValidationConfig, args.config, args.set)))


def cmd_sequences(args) -> None:
    from gts_lum.sequence.dataset import SplitConfig, build_sequence_dataset

    split = load_config(SplitConfig, args.split_config, args.split)
    _print(build_sequence_dataset(args.clean, args.out, args.config, args.set, split))


def cmd_semantic_ids(args) -> None:
    from gts_lum.tokenizer.semantic_ids import tokenize_dataset

    card = tokenize_dataset(args.clean, args.out, args.config, args.set)
    _print(card)
    print((Path(args.out) / "summary.md").read_text())


def cmd_graph(args) -> None:
    from gts_lum.encoders.node2vec import graph_summary_markdown, run_graph_encoder

    run_graph_encoder(args.sequences, args.out, args.config, args.set)
    print(graph_summary_markdown(args.out))


def cmd_tables(args) -> None:
    from gts_lum.stages.tables import encode_tables

    _print(encode_tables(args.clean, args.out, args.config, parse_overrides(args.behaviors), args.config, parse_overrides(args.users)))


def cmd_phase1(args) -> None:
    from gts_lum.stages.phase1 import run_phase1

    summary = run_phase1(args.sequences, args.out, args.semantic_ids, args.graph, args.table, args.config, args.set)
    _print({k: v for k, v in summary.items() if k != "history"})


def cmd_phase1_bench(args) -> None:
    from gts_lum.stages.phase1 import bench_phase1

    result = bench_phase1(args.data, args.set, max_steps=args.steps, paper_catalog=args.paper_catalog)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "phase1.json").write_text(json.dumps(result, indent=2, default=str))
    _print(result)


def cmd_train(args) -> None:
    from gts_lum.stages.train import train_model

    stats = train_model(
        args.sequences, args.model, args.config, parse_overrides(args.set), args.out, device=args.device, checkpoint_dir=args.checkpoints
    )
    _print({k: v for k, v in stats.items() if k != "history"})


def cmd_evaluate(args) -> None:
    from gts_lum.stages.evaluate import evaluate_saved_models

    result = evaluate_saved_models(args.sequences, args.models, parse_overrides(args.set))
    print(result["markdown"])


def cmd_bench(args) -> None:
    from gts_lum.stages.bench_runner import load_bench_config, run_bench_config

    path = args.config if args.config.endswith((".yaml", ".yml")) else f"pkg:bench/{args.config}.yaml"
    cfg = load_bench_config(path, args.set)
    if args.models:  # names or labels of the config's entries; other names run with their defaults
        wanted = args.models.split(",")
        entries = {(e if isinstance(e, str) else e.get("label", e.get("model"))): e for e in cfg.models}
        cfg.models = [entries.get(w, w) for w in wanted]
    result = run_bench_config(cfg, args.out)
    print(result["table_md"])
    print(f"tables written to {args.out}")


def cmd_table_auc(args) -> None:
    from gts_lum.stages.table_bench import telco_auc_comparison

    result = telco_auc_comparison(args.data, args.mapping, args.task, overrides=args.set, include_text=not args.no_text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table_auc.json").write_text(json.dumps(result, indent=2, default=str))
    _print(result)


def cmd_speed(args) -> None:
    from gts_lum.stages.speed import run_speed_benchmarks

    _print(
        run_speed_benchmarks(
            args.what.split(","),
            args.out,
            quick=args.quick,
            data=args.data,
            mapping=args.mapping,
            device=args.device,
            width=args.width,
            layers=args.layers,
        )
    )


def cmd_labels(args) -> None:
    from gts_lum.evaluation.labels import format_label_table
    from gts_lum.modeling.heads import HeadsConfig
    from gts_lum.stages.labels import run_label_stage

    cfg = load_config(HeadsConfig, args.config, args.set)
    results = run_label_stage(args.model, args.sequences, args.clean, args.out, cfg)
    print(format_label_table(results))
    print(f"heads: {Path(args.out) / 'heads'}  model with task tokens: {Path(args.out) / 'model'}")


def cmd_export(args) -> None:
    from gts_lum.serving.export import export_model

    card = export_model(args.model, args.out, version=args.version, heads_dir=args.heads, sequences_dir=args.sequences, name=args.name)
    _print({k: v for k, v in card.items() if k not in ("catalog", "sequence_config", "files")} | {"catalog_size": card["catalog"]["size"]})


def cmd_serve(args) -> None:
    from gts_lum.serving.scorer import run_from_args

    run_from_args(args)


def cmd_batch_score(args) -> None:
    from gts_lum.serving.batch import batch_score

    users = Path(args.users).read_text().split() if args.users else None
    _print(
        batch_score(args.export, args.data, args.out, users=users, chunk_size=args.chunk_size, top_k=args.top_k, max_chunks=args.max_chunks)
    )


def cmd_load_bench(args) -> None:
    from gts_lum.stages.load_bench import load_bench

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    users = args.users.split(",") if args.users else None
    shapes = tuple(args.shape or (("top10", "top10_feast", "candidates") if args.feature_repo else ("top10", "candidates")))
    _print(
        load_bench(
            args.export,
            requests=args.requests,
            concurrency=tuple(args.concurrency or (1, 4)),
            shapes=shapes,
            seconds_limit=args.seconds_limit,
            candidates=args.candidates,
            history_events=args.history_events,
            torch_threads=args.torch_threads,
            feature_repo=args.feature_repo,
            users=users,
            out_dir=args.out,
            rerank_depth=args.rerank_depth,
            compile=args.compile,
        )
    )


def cmd_features(args) -> None:
    from gts_lum.serving.features import FeatureClient, export_feature_sources, publish_features

    if args.features_command == "export":
        _print(
            export_feature_sources(args.clean, args.out, args.semantic_ids, last_n=args.last_n, snapshot_days=args.snapshot_days or None)
        )
    elif args.features_command == "publish":
        _print(publish_features(args.repo, args.sources, args.config))
    else:
        removed = FeatureClient(args.repo, args.config).delete_user(args.user_id)
        print(
            f"user deleted from the stores of {args.repo}: {removed['online_entries']} online entries, {removed['offline_rows']} offline rows"
        )


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable), e.g. --set users=500"
    )


def _add_data_commands(sub) -> None:
    """Sub-commands that bring data in and shape it: synth, ingest, validate, sequences."""
    p = sub.add_parser("synth", help="write a synthetic telecom operator data set in the data contract")
    p.add_argument("--config", default="demo", help="a config in gts_lum/configs/synth (tiny, demo, bench) or a YAML path")
    p.add_argument("--out", required=True, help="output folder")
    _add_overrides(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="bring a data set in (simulate / adapt) and validate it into a clean folder")
    p.add_argument("source", help="synth:NAME, a contract folder, or another layout with --mapping")
    p.add_argument("--mapping", help="column mapping YAML, e.g. pkg:adapters/movielens.yaml")
    p.add_argument("--out", required=True, help="work folder (raw/ and clean/ are written inside)")
    _add_overrides(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate", help="validate a contract folder: clean tables, quarantine, summary")
    p.add_argument("raw", help="data set folder in the contract layout")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="ValidationConfig YAML")
    _add_overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("sequences", help="timestamp process: build the token sequences and the split of a clean data set")
    p.add_argument("clean", help="a validated data set folder")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="pkg:sequence/default.yaml", help="SequenceConfig YAML (the timezone comes from the data set)")
    p.add_argument("--split-config", help="SplitConfig YAML")
    p.add_argument(
        "--split", action="append", default=[], metavar="KEY=VALUE", help="override a split setting, e.g. --split target_filter=type=ott"
    )
    _add_overrides(p)
    p.set_defaults(func=cmd_sequences)


def _add_encoder_commands(sub) -> None:
    """Sub-commands of the behaviour and user encoders: semantic IDs, graph, tables, Q-former phase I."""
    p = sub.add_parser("semantic-ids", help="semantic tokenizer: text embeddings -> spectral-clustering tree -> semantic IDs")
    p.add_argument("clean", help="a validated data set folder (its behaviours table)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="pkg:tokenizer/default.yaml")
    _add_overrides(p)
    p.set_defaults(func=cmd_semantic_ids)

    p = sub.add_parser("graph", help="behaviour co-occurrence graph of the training events -> node2vec embeddings")
    p.add_argument("sequences", help="output folder of `gts-lum sequences` (its training split)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="pkg:encoders/graph.yaml")
    _add_overrides(p)
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("tables", help="table encoders: an embedding per behaviour (attributes) and per user (profile)")
    p.add_argument("clean", help="a validated data set folder")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="pkg:encoders/table.yaml")
    p.add_argument(
        "--behaviors", action="append", default=[], metavar="KEY=VALUE", help="override for the behaviours table, e.g. kind=learned"
    )
    p.add_argument("--users", action="append", default=[], metavar="KEY=VALUE", help="override for the users table")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("phase1", help="Q-former phase I: align semantic IDs with business embeddings (six tasks); resumes")
    p.add_argument("sequences", help="output folder of `gts-lum sequences`")
    p.add_argument("--semantic-ids", help="output folder of `gts-lum semantic-ids`")
    p.add_argument("--graph", help="output folder of `gts-lum graph`")
    p.add_argument("--table", help="behavior_table.npz of `gts-lum tables`")
    p.add_argument("--config", default="pkg:qformer/default.yaml")
    p.add_argument("--out", required=True)
    _add_overrides(p)
    p.set_defaults(func=cmd_phase1)

    p = sub.add_parser("phase1-bench", help="time phase I, report held-out alignment, and an epoch at the paper's scale")
    p.add_argument("--data", default="synth:tiny", help="synth:NAME or a clean data set folder")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps to train and time")
    p.add_argument("--paper-catalog", type=int, default=10_000, help="assumed catalog size of the paper's data (not published)")
    p.add_argument("--out", default="runs/bench/phase1")
    _add_overrides(p)
    p.set_defaults(func=cmd_phase1_bench)


def _add_model_commands(sub) -> None:
    """Sub-commands that train, evaluate and benchmark models."""
    p = sub.add_parser("train", help="train a registered model on a sequence data set; saves safetensors + model.yaml")
    p.add_argument("sequences", help="output folder of `gts-lum sequences`")
    p.add_argument("--model", default="sasrec", help="popularity, markov, sasrec, hstu, ...")
    p.add_argument("--config", help="model YAML (default pkg:models/MODEL.yaml)")
    p.add_argument("--device", default="auto", help="auto (NPU, else CUDA, else CPU), npu, cuda or cpu")
    p.add_argument("--checkpoints", help="checkpoint folder (GTS-LUM): resumes from it after an interruption")
    p.add_argument("--out", required=True)
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="rank the test cases with saved models (the last one is the Impv. reference)")
    p.add_argument("sequences")
    p.add_argument("models", nargs="+", help="saved model folders")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EvalConfig fields and candidate_filter")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="train and evaluate models on a data set; writes the paper's Table 2 format (md + json)")
    p.add_argument("--config", default="movielens", help="a bench config in gts_lum/configs/bench or a YAML path")
    p.add_argument("--models", help="comma-separated model names or entry labels (overrides the config's list)")
    p.add_argument("--out", required=True)
    _add_overrides(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "table-auc",
        help="churn ROC-AUC on telco-churn (another table: --mapping, --task): learned/text table encoders vs gradient-boosted trees",
    )
    p.add_argument("--data", default="../shared/data/telco-churn")
    p.add_argument(
        "--mapping",
        default="pkg:adapters/telco_churn.yaml",
        help="column mapping of the data (users + labels), a YAML path or pkg:adapters/NAME.yaml",
    )
    p.add_argument("--task", default="churn", help="the labels' task to predict (0/1)")
    p.add_argument("--out", default="runs/bench/table_auc")
    p.add_argument("--no-text", action="store_true", help="skip the text encoder (slow on CPU)")
    _add_overrides(p)
    p.set_defaults(func=cmd_table_auc)

    p = sub.add_parser("speed", help="speed benchmarks (simulator, validation, sequence building, spectral tree, graph, scoring, training)")
    p.add_argument(
        "--what",
        default="simulator,validation,sequences,tree,graph,scoring",
        help="comma-separated; 'training': positions/s of GTS-LUM vs HSTU",
    )
    p.add_argument("--out", default="runs/speed")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--data", default="synth:tiny", help="training: synth:NAME or a data set folder")
    p.add_argument("--mapping", default=None, help="training: column mapping of a folder in another layout")
    p.add_argument("--device", default="auto", help="training: auto | cpu | cuda | npu")
    p.add_argument("--width", type=int, default=64, help="training: GTS-LUM decoder width")
    p.add_argument("--layers", type=int, default=2, help="training: GTS-LUM decoder layers")
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("labels", help="label tasks of a saved GTS-LUM: tune task tokens, fit heads, report vs table baselines, save")
    p.add_argument("model", help="a saved GTS-LUM model folder")
    p.add_argument("--sequences", required=True, help="the sequence data set whose event log holds the users' histories")
    p.add_argument("--clean", required=True, help="the validated data set with the labels (and users) tables")
    p.add_argument("--config", default="pkg:heads/default.yaml")
    p.add_argument("--out", required=True)
    _add_overrides(p)
    p.set_defaults(func=cmd_labels)


def _add_serving_commands(sub) -> None:
    """Sub-commands of the serving side: export, serve, batch scoring, load bench, the feature store."""
    p = sub.add_parser("export", help="serving export of a saved GTS-LUM model: weights, assets, catalog ids, heads, serving.yaml")
    p.add_argument("model", help="a saved GTS-LUM model folder (`gts-lum train --model gts_lum`)")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--version", help="default: a content hash of the weights and assets")
    p.add_argument("--heads", help="a folder of label heads (gts_lum.serving.export.save_head)")
    p.add_argument("--sequences", help="the training sequence data set (default: the one model.yaml names)")
    p.add_argument("--name", help="model name on the serving routes (default: gts_lum)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve an export with KServe (v1 + v2 REST, health, /metrics); blocks")
    add_server_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch-score", help="top-K behaviours of every user (or --users) from an export, as parquet chunks; resumable")
    p.add_argument("export", help="a folder written by `gts-lum export`")
    p.add_argument("data", help="a sequence data set (event_log.npz) or a clean data set")
    p.add_argument("--out", required=True)
    p.add_argument("--users", help="a text file of user ids (whitespace separated); default: every user")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-chunks", type=int, help="stop after this many new chunks (run again to resume)")
    p.set_defaults(func=cmd_batch_score)

    p = sub.add_parser(
        "load-bench", help="a request's stage profile, then p50/p90/p99 and requests/s of the scorer on 127.0.0.1 by request shape"
    )
    p.add_argument("export", help="a folder written by `gts-lum export`")
    p.add_argument("--requests", type=int, default=100, help="per shape and concurrency")
    p.add_argument("--concurrency", type=int, action="append", help="client threads (repeatable; default 1 and 4)")
    p.add_argument(
        "--shape",
        action="append",
        choices=["top10", "top10_feast", "candidates"],
        help="request shape (repeatable; default all, top10_feast with --feature-repo)",
    )
    p.add_argument("--seconds-limit", type=float, default=60.0, help="per shape and concurrency")
    p.add_argument("--candidates", type=int, default=100, help="explicit candidates of the candidates shape")
    p.add_argument("--history-events", type=int, default=100, help="inline history events a request")
    p.add_argument("--feature-repo", help="Feast repository the top10_feast shape reads (the server gets it too)")
    p.add_argument("--users", help="comma-separated user ids in that store")
    p.add_argument("--torch-threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--rerank-depth", type=int, help="the server's target-aware re-ranking depth (default: the export's)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the server's decoder (default: the export's decoder.compile)",
    )
    p.add_argument("--out", help="also write load_bench.json and the server log here")
    p.set_defaults(func=cmd_load_bench)

    p = sub.add_parser("features", help="Feast feature store: export the sources, publish (apply + materialize), delete a user")
    features = p.add_subparsers(dest="features_command", required=True)
    f = features.add_parser("export", help="write the parquet sources (profile, last-N sequences, catalog) of a clean data set")
    f.add_argument("--clean", required=True, help="a validated data set folder")
    f.add_argument("--out", required=True, help="sources folder (the feature repo reads it through GTS_LUM_FEATURE_DATA)")
    f.add_argument("--semantic-ids", help="output folder of `gts-lum semantic-ids` (catalog semantic IDs and version)")
    f.add_argument("--last-n", type=int, default=512, help="events kept per user sequence")
    f.add_argument("--snapshot-days", type=int, default=1, help="a sequence snapshot every this many local days (0: latest only)")
    f = features.add_parser("publish", help="apply the feature repo with these sources and materialize them into the online store")
    f.add_argument("--repo", default="feature_repo")
    f.add_argument("--sources", required=True, help="output folder of `gts-lum features export`")
    f.add_argument("--config", help="feature_store.yaml relative to the repo, e.g. production/feature_store.yaml")
    f = features.add_parser("delete-user", help="remove a user from the online store and the offline parquet files")
    f.add_argument("user_id", help="the operator's user id (pseudonymised with GTS_LUM_PSEUDONYM_KEY)")
    f.add_argument("--repo", default="feature_repo")
    f.add_argument("--config", help="feature_store.yaml relative to the repo")
    p.set_defaults(func=cmd_features)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gts-lum", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_add_data_commands, _add_encoder_commands, _add_model_commands, _add_serving_commands):
        add_commands(sub)  # in this order: `gts-lum --help` lists the sub-commands as the pipeline runs them
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        if args.verbose:
            raise
        logging.getLogger("gts-lum").error("%s (run with -v for the traceback)", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
