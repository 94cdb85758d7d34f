"""Saving and loading trained models: safetensors for the weights, YAML for the config. Never pickle.

A saved model is a folder:
    model.yaml           name (registry key), config (the dataclass as a mapping), catalog size, metadata
    weights.safetensors  every tensor the model needs to score (`model.state_tensors()`)
    assets/              models that need more (catalog features, texts) write it here, as .npz / YAML

Any registered model can be rebuilt from it (`load_model`), on any device, without the code that
trained it having to run again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file


def save_model(model: Any, name: str, out_dir: str | Path, metadata: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_tensors().items()}
    save_file(tensors, out / "weights.safetensors")
    if hasattr(model, "save_assets"):  # arrays and texts beside the weights (e.g. the catalog's features)
        model.save_assets(out / "assets")
    card = {"name": name, "config": dataclasses.asdict(model.cfg), "metadata": metadata or {}}
    (out / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return out


def read_card(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "model.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: no model.yaml (not a saved gts-lum model)")
    return yaml.safe_load(path.read_text())


def load_model(model_dir: str | Path, device: str = "cpu") -> Any:
    """Rebuild the model saved in `model_dir` and load its weights."""
    from gts_lum.evaluation.bench import build_model

    card = read_card(model_dir)
    model = build_model(card["name"], None, card["config"])
    if hasattr(model, "load_assets"):
        model.load_assets(Path(model_dir) / "assets")
    model.load_state_tensors(load_file(Path(model_dir) / "weights.safetensors"), device=device)
    return model
