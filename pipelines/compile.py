"""Compile every pipeline to YAML for the Kubeflow UI: `python -m pipelines.compile` (`make compile`).

CI compiles again and compares with the YAML kept in `pipelines/compiled/` (tests/pipelines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kfp import compiler

from pipelines import PIPELINES

COMPILED = Path(__file__).resolve().parent / "compiled"


def compile_all(out_dir: Path = COMPILED) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, pipeline in sorted(PIPELINES.items()):
        path = out_dir / f"{name}_pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=COMPILED)
    args = parser.parse_args(argv)
    for path in compile_all(args.output_dir):
        print(f"compiled {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
