"""Saving and loading trained models and training state: safetensors for tensors, YAML / JSON for the
rest. Never pickle.

A saved model is a folder:
    model.yaml           name (registry key), config (the dataclass as a mapping), catalog size, metadata
    weights.safetensors  every tensor the model needs to score (`model.state_tensors()`)
    assets/              models that need more (catalog features, texts) write it here, as .npz / YAML

Any registered model can be rebuilt from it (`recommenders.registry.load_model`), on any device, without the code that
trained it having to run again.

A training checkpoint (`save_training_state`, the training loop's) is a folder written all-or-nothing:
    <group>.safetensors  one file per tensor group (weights, optimizer, best, ...)
    position.json        where the run stands (epoch, step, history) and the JSON side of the state
    manifest.json        the SHA-256 of every file above, written last
It is written into a fresh sibling folder that is then swapped in by renames; the checkpoint it replaces
stays beside it as `<folder>.previous`. A kill at any moment leaves a whole checkpoint (the new one, or
the previous one, which `load_training_state` falls back to), and a file that does not match its
manifest stops the load with the file's name and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import yaml
from safetensors.torch import load_file, save, save_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POSITION = "position.json"


@runtime_checkable
class HasAssets(Protocol):
    """A model that keeps arrays and texts beside its weights (e.g. the catalog's features), in `assets/`."""

    def save_assets(self, folder: str | Path) -> None: ...

    def load_assets(self, folder: str | Path) -> None: ...


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be resumed: names the file and what to do."""


def save_model(model: Any, name: str, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """Write the model folder all-or-nothing: into a fresh sibling folder, swapped in by renames (a kill
    leaves the previous model or none, never new weights beside an old card)."""
    out = Path(out_dir)
    fresh = out.with_name(out.name + ".incoming")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_tensors().items()}
    save_file(tensors, fresh / "weights.safetensors")
    if isinstance(model, HasAssets):
        model.save_assets(fresh / "assets")
    card = {"name": name, "config": dataclasses.asdict(model.cfg), "metadata": metadata or {}}
    (fresh / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))  # last: a folder with a card is whole
    if out.exists():
        replaced = out.with_name(out.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
        os.replace(fresh, out)
        shutil.rmtree(replaced)
    else:
        os.replace(fresh, out)
    return out


def read_card(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "model.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: no model.yaml (not a saved gts-lum model)")
    return yaml.safe_load(path.read_text())


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_training_state(folder: str | Path, groups: dict[str, dict[str, torch.Tensor]], position: dict) -> None:
    """Write a training checkpoint to `folder`, all-or-nothing (see the module docstring)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh, previous = folder.with_name(folder.name + ".incoming"), folder.with_name(folder.name + ".previous")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    files = {}
    for name, tensors in groups.items():
        # an empty group still gets its file: the manifest then says what a whole checkpoint holds
        files[f"{name}.safetensors"] = save(tensors or {"_empty": torch.zeros(0)})
    files[POSITION] = json.dumps(position).encode()
    for name, data in files.items():
        _write_synced(fresh / name, data)
    manifest = {"files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    _write_synced(fresh / MANIFEST, json.dumps(manifest, indent=1).encode())
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(fresh, folder)


def _read_checked(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    what_to_do = (
        f"resume from the checkpoint before it ({folder.name}.previous, if it exists: move it to {folder.name}) "
        f"or start afresh (remove {folder})"
    )
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable checkpoint manifest ({err}); {what_to_do}") from err
    for name, digest in manifest.items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing from the checkpoint; {what_to_do}")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: does not match the checkpoint manifest (truncated or changed); {what_to_do}")
    groups = {name[: -len(".safetensors")]: load_file(folder / name) for name in manifest if name.endswith(".safetensors")}
    groups = {k: {n: t for n, t in v.items() if n != "_empty"} for k, v in groups.items()}
    return groups, json.loads((folder / POSITION).read_text())


def has_training_state(folder: str | Path) -> bool:
    """Whether `folder` holds a checkpoint to resume from (or the `.previous` a cut-off save left)."""
    folder = Path(folder)
    return any(f.exists() and any(f.iterdir()) for f in (folder, folder.with_name(folder.name + ".previous")))


def load_training_state(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """The checkpoint in `folder` as (tensor groups, position), checked against its manifest; None when
    there is none (a fresh run). A kill mid-swap leaves only `<folder>.previous`: that one is loaded."""
    folder = Path(folder)
    previous = folder.with_name(folder.name + ".previous")
    if not folder.exists() and previous.exists():
        log.warning("checkpoint %s is missing but %s is whole (a save was cut off): resuming from it", folder, previous)
        folder = previous
    if not folder.exists() or not any(folder.iterdir()):
        return None
    if not (folder / MANIFEST).exists() and (folder / POSITION).exists():
        raise CheckpointError(
            f"{folder}: a checkpoint without {MANIFEST} (an older format or a cut-off save); start afresh (remove {folder})"
        )
    return _read_checked(folder)
