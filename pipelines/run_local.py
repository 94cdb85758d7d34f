"""Run a pipeline on this machine through `kfp.local` (the main job: `make demo`).

    python -m pipelines.run_local --output runs/demo [--params pipelines/params/movielens.yaml] [--param model_name=hstu]

Each component runs as a subprocess of this virtualenv (SubprocessRunner without a venv of its own),
exactly the code the cluster runs in the project's image. Outputs land in `<output>/local_outputs/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
import warnings
from pathlib import Path

import yaml
from kfp import local

from pipelines import PIPELINES

log = logging.getLogger("pipelines.run_local")


def run(pipeline_name: str, output: Path, params: dict) -> Path:
    output = output.resolve()
    root = output / "local_outputs"
    # The components name the project's image, which holds Python; the runner warns about any image
    # without "python" in its name. Locally the image is this virtualenv.
    warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
    # Display names, caching and resources are cluster settings; the local runner says it ignores them.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    before = set(root.iterdir()) if root.exists() else set()
    started = time.perf_counter()
    PIPELINES[pipeline_name](**params)
    run_dirs = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    run_dir = run_dirs[-1]
    log.info("pipeline %s finished in %.0f s", pipeline_name, time.perf_counter() - started)
    return run_dir


def report(run_dir: Path) -> str:
    """Where the results are, and the Markdown the Kubeflow UI would show."""
    lines = [f"Results of the run: {run_dir}"]
    for md in sorted(run_dir.rglob("*")):
        if (
            md.is_file()
            and md.parent.name.startswith(("evaluate", "validate", "build-sequences"))
            and md.name in ("table", "report", "preview")
        ):
            lines += ["", f"--- {md.relative_to(run_dir)} ---", md.read_text()]
    for executor_output in sorted(run_dir.glob("*/executor_output.json")):
        lines.append(f"metrics and artifacts of {executor_output.parent.name}: {executor_output}")
    return "\n".join(lines)


def load_params(path: Path | None) -> dict:
    """Pipeline parameters from YAML: mappings and lists as they are (the override parameters are typed
    `dict`, the tolerations a `list`), every other value as a string."""
    if path is None:
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of pipeline parameters, got {type(raw).__name__}")
    return {k: v if isinstance(v, (dict, list)) else str(v) for k, v in raw.items()}


def _param(text: str) -> tuple[str, object]:
    """NAME=VALUE: a VALUE written as a JSON object or list (an override) is parsed; any other stays a string."""
    name, value = text.split("=", 1)
    return name, json.loads(value) if value.lstrip().startswith(("{", "[")) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="training", choices=sorted(PIPELINES))
    parser.add_argument("--output", default="runs/demo", type=Path)
    parser.add_argument("--params", type=Path, help="a YAML file of pipeline parameters (e.g. pipelines/params/movielens.yaml)")
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter (repeatable; wins over --params)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    params = {**load_params(args.params), **dict(_param(p) for p in args.param)}
    # The pipelines' defaults name KFP's bucket (minio://mlpipeline/...), which a local run has not:
    # here the registry lives beside the run's outputs and the export is `make load-bench`'s.
    registry = args.output / "registry"
    if not os.environ.get("GTS_LUM_PSEUDONYM_KEY"):
        # Feast keys users by a keyed hash; the key is never written to a file. Without one this run
        # makes a throw-away key: its feature store, and the exports it registers, are then readable only
        # within the run, so its champion-challenger gate starts from a registry of its own.
        os.environ["GTS_LUM_PSEUDONYM_KEY"] = secrets.token_hex(32)
        registry = args.output / "registry-throwaway" / time.strftime("%Y%m%d-%H%M%S")
        log.warning(
            "GTS_LUM_PSEUDONYM_KEY is unset: using a throw-away key for this run's feature store and a registry of its own "
            "(%s; set the key to keep one registry across runs)",
            registry,
        )
    local_defaults = {"training": {"registry": str(registry)}, "batch_scoring": {"export_uri": "runs/export"}}
    params = {**local_defaults[args.pipeline], **params}
    run_dir = run(args.pipeline, args.output, params)
    text = report(run_dir)
    print(text)
    (args.output / "RESULTS.md").write_text(text)
    print(f"\nsummary: {(args.output / 'RESULTS.md').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
