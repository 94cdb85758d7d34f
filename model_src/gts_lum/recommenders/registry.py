"""The model registry: every recommender by name, loaded lazily, behind one small Protocol.

A registered model is a config dataclass and a model class, named by import path ("module:Class") so
that building one model imports that model's module only (evaluating the Markov chain does not import
the GTS-LUM network). What a model can do is said by the registry and the Protocols below, never
guessed from its attributes or signatures:

    from gts_lum.recommenders.registry import build_model, attach_dataset
    model = build_model("sasrec", "pkg:models/sasrec.yaml", ["train.lr=5e-4"])
    attach_dataset(model, dataset)  # only models that read the sequence data set take it
    stats = model.fit(split, eval_cfg, candidates)
    scores = model.score(split.log, split.test, candidates)  # (B, C)
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file

from gts_lum.config import load_config
from gts_lum.training.checkpoint import HasAssets, read_card


@runtime_checkable
class Recommender(Protocol):
    """What every registered model does: fit on a split, score prediction cases, give and take its tensors."""

    cfg: Any

    def fit(self, split: Any, eval_cfg: Any = None, candidates: np.ndarray | None = None) -> dict: ...

    def score(self, log: Any, cases: Any, candidates: np.ndarray) -> np.ndarray: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None: ...


@runtime_checkable
class ReadsDataset(Protocol):
    """A model that reads more than the event log (behaviour texts, encoder artifacts): it is given the
    `SequenceDataset` before `fit`."""

    def attach(self, dataset: Any) -> None: ...


@dataclass(frozen=True)
class ModelEntry:
    """A registered model. `trains`: it trains with the training loop, so its config has `train.seed`,
    `train.device` and `train.time_budget_s`, and its `fit` takes `checkpoint_dir`; count-based models
    (popularity, Markov) fit in one pass and take none of them."""

    name: str
    config: str | type  # "module:Class" or the class
    model: str | type
    trains: bool = True

    def classes(self) -> tuple[type, type]:
        return _resolve(self.config), _resolve(self.model)


def _resolve(ref: str | type) -> type:
    if isinstance(ref, type):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_ENTRIES: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            "popularity", "gts_lum.recommenders.baselines:PopularityConfig", "gts_lum.recommenders.baselines:Popularity", trains=False
        ),
        ModelEntry("markov", "gts_lum.recommenders.baselines:MarkovConfig", "gts_lum.recommenders.baselines:MarkovChain", trains=False),
        ModelEntry("sasrec", "gts_lum.recommenders.sasrec:SASRecConfig", "gts_lum.recommenders.sasrec:SASRec"),
        ModelEntry("hstu", "gts_lum.recommenders.hstu:HSTUConfig", "gts_lum.recommenders.hstu:HSTU"),
        ModelEntry("hllm", "gts_lum.recommenders.hllm:HLLMConfig", "gts_lum.recommenders.hllm:HLLM"),
        ModelEntry("gts_lum", "gts_lum.recommenders.gts_lum_model:GTSLUMConfig", "gts_lum.recommenders.gts_lum_model:GTSLUM"),
    )
}


class _Models(Mapping):
    """name -> (config class, model class), importing a model's module on first look-up."""

    def __getitem__(self, name: str) -> tuple[type, type]:
        return _ENTRIES[name].classes()

    def __iter__(self) -> Iterator[str]:
        return iter(_ENTRIES)

    def __len__(self) -> int:
        return len(_ENTRIES)


MODELS: Mapping[str, tuple[type, type]] = _Models()


def model_entry(name: str) -> ModelEntry:
    if name not in _ENTRIES:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(_ENTRIES)}")
    return _ENTRIES[name]


def register_model(name: str, config_cls: str | type, model_cls: str | type, trains: bool = True) -> None:
    """Make a model buildable by name (bench, CLI). Re-registering a name is an error, not an override."""
    if name in _ENTRIES:
        raise ValueError(f"model {name!r} is already registered as {_ENTRIES[name].classes()[1].__name__}")
    _ENTRIES[name] = ModelEntry(name, config_cls, model_cls, trains)


def default_config_path(name: str) -> str | None:
    """`pkg:models/<name>.yaml` when the package ships one."""
    rel = f"models/{name}.yaml"
    return f"pkg:{rel}" if resources.files("gts_lum.configs").joinpath(rel).is_file() else None


def build_model(name: str, cfg_path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Any:
    """The model `name` configured from `cfg_path` (default: its packaged YAML) plus `overrides`."""
    config_cls, model_cls = model_entry(name).classes()
    return model_cls(load_config(config_cls, cfg_path or default_config_path(name), overrides))


def attach_dataset(model: Any, dataset: Any) -> None:
    """Give the sequence data set (`SequenceDataset`) to a model that reads more than the event log
    (`ReadsDataset`: behaviour texts, encoder artifacts, timestamp process) before `fit`; ID-only models
    need nothing."""
    if not isinstance(model, ReadsDataset):
        return
    if dataset is None:
        raise ValueError(f"model {getattr(model, 'name', type(model).__name__)!r} reads the sequence data set: pass dataset=")
    model.attach(dataset)


def load_model(model_dir: str | Path, device: str = "cpu") -> Any:
    """Rebuild the model saved in `model_dir` (`training.checkpoint.save_model`) and load its weights."""
    card = read_card(model_dir)
    model = build_model(card["name"], None, card["config"])
    if isinstance(model, HasAssets):
        model.load_assets(Path(model_dir) / "assets")
    model.load_state_tensors(load_file(Path(model_dir) / "weights.safetensors"), device=device)
    return model
