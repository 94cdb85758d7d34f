"""One entry for every way data arrives: simulator, contract folder, or another layout plus a mapping.

`prepare_dataset(spec, workdir)` returns the folder of a validated data set:
- `synth:NAME` (NAME a config in `gts_lum/configs/synth/`, or a YAML path): simulate, then validate;
- a folder validated before (it holds the `VALIDATED` marker): used as it is; one whose validation
  stopped (a summary, no marker) is refused;
- an object-store URI (`s3://`, `minio://`, `gs://`; `data.storage`): its folder is downloaded, then as below;
- a folder in the contract layout (`events/` or `events.*`, `behaviors.*`...): validated;
- any other folder with `mapping=` (a YAML path or `pkg:adapters/NAME.yaml`): adapted, then validated.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from gts_lum.config import load_config
from gts_lum.data import storage
from gts_lum.data.adapters import Mapping, adapt
from gts_lum.data.contract import table_files
from gts_lum.data.simulator import SimulatorConfig, simulate
from gts_lum.data.validate import ValidationConfig, is_validated, require_validated, validate_dataset

log = logging.getLogger(__name__)


def is_clean(path: Path) -> bool:
    """A clean folder: validated to the end; ContractError for one whose validation stopped."""
    if (path / "validation_summary.json").exists():
        require_validated(path)
    return is_validated(path)


def bring_in(
    spec: str | Path, raw: str | Path, mapping: str | None = None, synth_overrides: list[str] | dict | None = None, progress: bool = True
) -> Path:
    """The data set named by `spec` in the contract layout, not yet validated (see the module docstring)."""
    spec, raw = str(spec), Path(raw)
    if spec.startswith("synth:"):
        name = spec[len("synth:") :]
        cfg_path = name if name.endswith((".yaml", ".yml")) else f"pkg:synth/{name}.yaml"
        simulate(load_config(SimulatorConfig, cfg_path, synth_overrides), raw, progress=progress)
        return raw
    if storage.is_remote(spec) and mapping:  # the operator's own layout: adapted into `raw` from a throwaway copy
        with tempfile.TemporaryDirectory() as tmp:
            return bring_in(storage.download(spec, tmp), raw, mapping, synth_overrides, progress)
    source = storage.download(spec, raw) if storage.is_remote(spec) else Path(spec)
    if not source.is_dir():
        raise FileNotFoundError(f"data set {source} is not a folder (give a folder, an object-store URI, or synth:NAME)")
    if mapping:
        adapt(source, Mapping.load(mapping), raw, progress=progress)
        return raw
    if table_files(source, "events") or table_files(source, "users"):
        return source
    raise ValueError(f"{spec} is not in the contract layout (no events/ or users table): pass a mapping (--mapping)")


def prepare_dataset(
    spec: str | Path,
    workdir: str | Path,
    mapping: str | None = None,
    synth_overrides: list[str] | dict | None = None,
    validation: ValidationConfig | None = None,
    progress: bool = True,
) -> Path:
    """`bring_in` then validate into `workdir/clean`; a folder validated before is returned as it is."""
    workdir = Path(workdir)
    if not str(spec).startswith("synth:") and is_clean(Path(spec)):
        return Path(spec)
    raw = bring_in(spec, workdir / "raw", mapping, synth_overrides, progress)
    clean = workdir / "clean"
    validate_dataset(raw, clean, validation, progress=progress)
    return clean
