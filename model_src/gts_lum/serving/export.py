"""The serving export: a saved GTS-LUM model, its catalog and optional label heads, in one folder.

Written by `export_model`, read by `load_export` (the KServe scorer and batch scoring both score
through the `ServingModel` it returns, so online and offline ranks cannot drift apart):

    serving.yaml         name, version (default: a hash of the weights, assets and heads), the catalog's
                         behaviour ids (catalog order) and target behaviours (the training split's target
                         filter: what a request without candidates ranks), the timestamp-process settings (`sequence_config`:
                         timezone, interval, budget, ...; Feast parity reads them), the heads, a sha256 per file
    weights.safetensors, model.yaml, assets/   the model as `training.checkpoint.save_model` wrote it, but for
                         the profile table (assets/users.npz): its users named by pseudonym (GTS_LUM_PSEUDONYM_KEY,
                         the feature store's keys; serving.yaml `users`), or no ids for a model without profiles.
                         No raw user id is exported; scoring a model with profiles needs the key.
    heads/               optional: heads.yaml + NAME.safetensors per label head (`save_head`)

Nothing is pickled: tensors are safetensors, arrays .npz read with allow_pickle=False, the rest YAML.
The saved model does not record its behaviour ids (only their texts), so the export takes them from
the training sequence data set (`sequences_dir`, by default the one named in model.yaml's metadata).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from gts_lum.data.events import EventLog
from gts_lum.data.pseudonym import KEY_CHECK, key_check, profiles_by_pseudonym, pseudonymize_all, pseudonymous_log
from gts_lum.modeling.heads import HeadsConfig, LabelHead, LabelTask, UpliftHead, build_head
from gts_lum.recommenders.registry import load_model
from gts_lum.sequence.candidates import select_candidates
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.sequence.splits import EvalSet
from gts_lum.training.checkpoint import read_card, sha256_file

log = logging.getLogger(__name__)

SERVING_CARD = "serving.yaml"
HEADS_DIR = "heads"
HEADS_CARD = "heads.yaml"
ASSET_SUFFIXES = (".npz", ".yaml", ".yml", ".json", ".safetensors", ".txt")  # never .pt / .pkl / .bin
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # a KServe route segment and a file name


# -- label heads ----------------------------------------------------------------------------------


# What a GTS-LUM head reads: parts joined by "+", each a (B, D) array of the user: the decoder's state (with
# the task's token), the history summary (`GTSLUM.history_summary`) and the profile row (`GTSLUM.profile_vectors`:
# the table encoder's embedding of the user's attributes, which the label stage's validation may prefer for
# labels a table column drives; BENCHMARKS.md "Label tasks").
HEAD_INPUTS = ("state", "summary", "state+summary", "profile", "summary+profile")


def head_input_parts(
    model, log_: EventLog, cases: EvalSet, parts: list[str], task_token: int | None, catalog=None
) -> dict[str, np.ndarray]:
    """{part: (B, D)} of the named parts ("state", "summary", "profile") for `cases` of `log_`; "profile" is
    left out when the model has no profile table."""
    out = {}
    if "state" in parts:
        out["state"] = model.user_embeddings(log_, cases, task_token, catalog)
    if "summary" in parts:
        out["summary"] = model.history_summary(log_, cases, catalog)
    profile = model.profile_vectors(log_, cases) if "profile" in parts else None
    if profile is not None:
        out["profile"] = profile
    return out


def head_inputs(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{input name: (B, D)}: every HEAD_INPUTS entry whose parts are all in `parts`."""
    names = [n for n in HEAD_INPUTS if all(p in parts for p in n.split("+"))]
    return {n: np.concatenate([parts[p] for p in n.split("+")], 1) for n in names}


def save_head(
    folder: str | Path, task: LabelTask, head: LabelHead | UpliftHead, task_token: int | None = None, inputs: str = "state"
) -> Path:
    """Add one fitted head to a heads folder (NAME.safetensors + an entry in heads.yaml).

    `task_token`: index of the task's learned front token in the model's `net.tasks` when the head was
    fitted on embeddings with that token (`model.user_embeddings(..., task=i)`); None: target-agnostic.
    `inputs`: one of HEAD_INPUTS, what the head reads.
    """
    if inputs not in HEAD_INPUTS:
        raise ValueError(f"head {task.name!r}: inputs {inputs!r} is not one of {HEAD_INPUTS}")
    if not NAME_PATTERN.match(task.name):
        raise ValueError(f"head name {task.name!r}: use letters, digits, '_', '.', '-' (it names a file)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mlp = isinstance(head.net, torch.nn.Sequential)
    entry = {
        "kind": task.kind,
        "num_classes": task.num_classes,
        "classes": [float(c) for c in task.classes],
        "hidden_size": int(head.input_mean.shape[0]),
        "mlp_hidden": int(head.net[0].out_features) if mlp else 0,
        "dropout": float(head.net[2].p) if mlp else 0.0,
        "task_token": task_token,
        "inputs": inputs,
    }
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, folder / f"{task.name}.safetensors")
    card_path = folder / HEADS_CARD
    card = yaml.safe_load(card_path.read_text()) if card_path.exists() else {}
    card[task.name] = entry
    card_path.write_text(yaml.safe_dump(card, sort_keys=True))
    return folder / f"{task.name}.safetensors"


@dataclass
class ServingHead:
    task: LabelTask
    head: LabelHead | UpliftHead
    task_token: int | None  # front token of the user embedding it reads (None: target-agnostic)
    inputs: str = "state"  # one of HEAD_INPUTS (heads saved before the history summary: the state)


def load_heads(folder: str | Path) -> dict[str, ServingHead]:
    """The heads `save_head` wrote to `folder` (an empty dict when it has none)."""
    folder = Path(folder)
    card_path = folder / HEADS_CARD
    if not card_path.exists():
        return {}
    heads = {}
    for name, entry in (yaml.safe_load(card_path.read_text()) or {}).items():
        task = LabelTask(name, entry["kind"], int(entry["num_classes"]), tuple(entry["classes"]))
        head = build_head(
            task, int(entry["hidden_size"]), HeadsConfig(mlp_hidden=int(entry["mlp_hidden"]), dropout=float(entry["dropout"]))
        )
        weights = folder / f"{name}.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"{card_path}: head {name!r} has no weights file {weights.name}")
        head.load_state_dict(load_file(weights))
        heads[name] = ServingHead(task, head.eval(), entry.get("task_token"), entry.get("inputs", "state"))
    return heads


# -- writing the export ---------------------------------------------------------------------------


def _catalog(model_dir: Path, card: dict, sequences_dir: str | Path | None) -> tuple[np.ndarray, str, np.ndarray | None]:
    """The training log's behaviour ids (the catalog order the model's indices refer to), the split's
    target filter and the target behaviours it selects (catalog indices; None: every behaviour)."""
    source = sequences_dir or card.get("metadata", {}).get("sequences")
    if not source:
        raise ValueError(
            f"{model_dir}: model.yaml names no training sequences; pass sequences_dir (the catalog's behaviour ids are read there)"
        )
    path = Path(source) / "event_log.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the training sequence data set is needed for the catalog's behaviour ids; pass sequences_dir")
    data = SequenceDataset.load(source)
    ids = data.event_log.behavior_ids.astype(str)
    expr = data.split_cfg.target_filter
    if not expr:
        return ids, "", None
    return ids, expr, np.asarray(select_candidates(data.behaviors(), data.event_log.behavior_ids, expr), np.int64)


def _pseudonymize_profiles(users_file: Path) -> dict:
    """Rewrite a copied profile table (assets/users.npz) so the export holds no raw user id: pseudonyms
    (`data.pseudonym`, the feature store's keys) with the key's check beside them when the model has profile
    rows, else no ids at all (a model without a profile token never looks a user up)."""
    with np.load(users_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if "vectors" not in arrays:
        np.savez(users_file, user_ids=np.zeros(0, dtype=str))
        return {"ids": "none", "rows": 0}
    try:
        ids = pseudonymize_all(arrays["user_ids"]).astype(str)
    except ValueError as err:
        raise ValueError(f"the model has user profile rows, which the export names by pseudonym: {err}") from None
    np.savez(users_file, user_ids=ids, vectors=arrays["vectors"], **{KEY_CHECK: np.array(key_check())})
    return {"ids": "pseudonyms", "rows": int(len(ids))}


def _safe_assets(model_dir: Path) -> list[Path]:
    """The model's asset files; an error naming any of a kind that could hold a pickle."""
    assets = sorted(p for p in (model_dir / "assets").rglob("*") if p.is_file())
    bad = [str(p.relative_to(model_dir)) for p in assets if p.suffix not in ASSET_SUFFIXES]
    if bad:
        raise ValueError(f"{model_dir}: assets {bad} are not of a safe kind {ASSET_SUFFIXES} (no pickles in an export)")
    return assets


def _copy_model(model_dir: Path, assets: list[Path], tmp: Path) -> dict:
    """Copy the weights, model.yaml and assets into `tmp`; returns how the profile table names its users."""
    shutil.copy2(model_dir / "weights.safetensors", tmp / "weights.safetensors")
    shutil.copy2(model_dir / "model.yaml", tmp / "model.yaml")
    for path in assets:
        target = tmp / path.relative_to(model_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return _pseudonymize_profiles(tmp / "assets" / "users.npz")


def _copy_heads(heads_dir: str | Path | None, tmp: Path) -> dict[str, ServingHead]:
    """Copy the heads of `heads_dir` (loaded first: a head that does not load is not exported) into `tmp`."""
    heads = load_heads(heads_dir) if heads_dir else {}
    if heads_dir and not (Path(heads_dir) / HEADS_CARD).exists():  # an empty card is fine: no label tasks
        raise FileNotFoundError(f"{heads_dir}: no {HEADS_CARD} (write heads with gts_lum.serving.export.save_head)")
    if heads:
        (tmp / HEADS_DIR).mkdir()
        for path in [Path(heads_dir) / HEADS_CARD, *(Path(heads_dir) / f"{n}.safetensors" for n in heads)]:
            shutil.copy2(path, tmp / HEADS_DIR / path.name)
    return heads


def _check_loaded(model, behavior_ids: np.ndarray, heads: dict[str, ServingHead]) -> None:
    """The exported model, loaded as it will be served, fits the catalog and every head reads what it gives."""
    catalog = model.assets.features.descriptions
    if len(catalog) != len(behavior_ids):
        raise ValueError(f"the model's catalog has {len(catalog)} behaviours, the training log {len(behavior_ids)}: wrong sequences_dir?")
    vectors = model.assets.user_vectors
    # the summary is a mean of b^F, as wide as the state; a profile row is the table encoder's width
    widths = {"state": model.net.hidden_size, "summary": model.net.hidden_size, "profile": None if vectors is None else vectors.shape[1]}
    for head_name, head in heads.items():
        if "profile" in head.inputs.split("+") and vectors is None:
            raise ValueError(f"head {head_name!r} reads the user's profile row and the model has no profile table")
        width = sum(widths[p] for p in head.inputs.split("+"))
        if head.head.input_mean.shape[0] != width:
            raise ValueError(f"head {head_name!r} reads {head.head.input_mean.shape[0]}-dim embeddings, the model gives {width}")
        if head.task_token is not None and not 0 <= head.task_token < len(model.cfg.net.tasks):
            raise ValueError(f"head {head_name!r}: task_token {head.task_token} but the model has tasks {model.cfg.net.tasks}")


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    version: str | None = None,
    heads_dir: str | Path | None = None,
    sequences_dir: str | Path | None = None,
    name: str | None = None,
) -> dict:
    """Copy the saved GTS-LUM model in `model_dir` (and the heads in `heads_dir`) into `out_dir` with
    a serving.yaml; returns that card. `version`: default the first 12 hex digits of a sha256 over the
    weights, assets and heads. The export is written to a temporary folder, loaded once as a check,
    then moved into place, so a failed export leaves no half-written folder behind."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    card = read_card(model_dir)
    if card["name"] != "gts_lum":
        raise ValueError(f"{model_dir}: a {card['name']!r} model; the serving export takes GTS-LUM models (gts_lum)")
    name = name or card["name"]
    if not NAME_PATTERN.match(name):
        raise ValueError(f"export name {name!r}: use letters, digits, '_', '.', '-'")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; export into a new folder")
    behavior_ids, target_filter, targets = _catalog(model_dir, card, sequences_dir)
    assets = _safe_assets(model_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is read by the serving user
    try:
        users = _copy_model(model_dir, assets, tmp)
        heads = _copy_heads(heads_dir, tmp)
        hashes = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        if version is None:  # model.yaml is left out: its metadata names training paths, not content
            content = "".join(f"{k}:{v}\n" for k, v in sorted(hashes.items()) if k != "model.yaml")
            version = hashlib.sha256(content.encode()).hexdigest()[:12]
        model = load_model(tmp)  # the export must load as it will be served
        _check_loaded(model, behavior_ids, heads)
        serving = {
            "name": name,
            "version": str(version),
            "model": card["name"],
            "source": str(model_dir.resolve()),
            "catalog": {
                "size": int(len(behavior_ids)),
                "behavior_ids": behavior_ids.tolist(),
                # what the model was trained to recommend (the split's target filter): ranked when a
                # request names no candidates; null: the whole catalog
                "target_filter": target_filter,
                "targets": None if targets is None else targets.tolist(),
            },
            "sequence_config": dataclasses.asdict(model.assets.sequence_cfg),
            "rerank_depth": int(model.cfg.rerank_depth),
            "hidden_size": int(model.net.hidden_size),
            "users": users,
            "heads": {k: {"kind": h.task.kind, "classes": list(h.task.classes)} for k, h in heads.items()},
            "files": hashes,
        }
        (tmp / SERVING_CARD).write_text(yaml.safe_dump(serving, sort_keys=False))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s version %s (%d behaviours, heads %s) -> %s", name, version, len(behavior_ids), sorted(heads) or "none", out_dir)
    return serving


# -- reading and scoring --------------------------------------------------------------------------


def read_serving_card(export_dir: str | Path) -> dict:
    path = Path(export_dir) / SERVING_CARD
    if not path.exists():
        raise FileNotFoundError(f"{export_dir}: no {SERVING_CARD} (not a gts-lum serving export; see `gts-lum export`)")
    return yaml.safe_load(path.read_text())


def history_log(user_id: str, behaviors: np.ndarray, timestamps: np.ndarray, catalog: np.ndarray) -> tuple[EventLog, EvalSet]:
    """A one-user log of a whole history (behaviour indices, unix seconds) and the case that reads all of it.

    Events are put in time order by a stable sort: events that share a timestamp keep the order they
    were given in (the client's or the feature store's order is the truth, not a hash tie-break)."""
    order = np.argsort(np.asarray(timestamps, np.int64), kind="stable")
    n = len(order)
    log_ = EventLog(
        user_ids=np.array([user_id], dtype=object),
        behavior_ids=catalog,
        offsets=np.array([0, n], np.int64),
        behavior=np.asarray(behaviors, np.int32)[order],
        timestamp=np.asarray(timestamps, np.int64)[order],
    )
    last = int(log_.timestamp[-1]) if n else 0
    return log_, EvalSet(np.zeros(1, np.int64), np.array([n], np.int64), np.zeros(1, np.int32), np.array([last], np.int64))


class ServingModel:
    """A loaded export: the model, its catalog and heads, and the ranking every serving path uses.

    Scoring holds a lock: the model re-targets its profile table to each log it scores, so two
    threads must not interleave inside it."""

    def __init__(self, export_dir: str | Path, device: str = "cpu", rerank_depth: int | None = None, compile: bool | None = None):
        self.root = Path(export_dir)
        self.card = read_serving_card(self.root)
        self.model = load_model(self.root, device=device)
        self.catalog = np.asarray(self.card["catalog"]["behavior_ids"], dtype=object)
        if len(self.catalog) != len(self.model.assets.features.descriptions):
            raise ValueError(
                f"{self.root}: serving.yaml lists {len(self.catalog)} behaviours, the model {len(self.model.assets.features.descriptions)}"
            )
        self.index = {b: i for i, b in enumerate(self.catalog.tolist())}
        targets = self.card["catalog"].get("targets")
        # a request without candidates ranks these: the behaviours the model was trained to predict
        self.default_candidates = np.arange(len(self.catalog), dtype=np.int64) if targets is None else np.asarray(targets, np.int64)
        if rerank_depth is not None:
            if rerank_depth < 0:
                raise ValueError(f"rerank_depth must be >= 0, got {rerank_depth}")
            self.model.cfg.rerank_depth = rerank_depth
        if compile is not None:  # the export's `decoder.compile` otherwise
            self.model.cfg.net.decoder.compile = compile
        self.heads = load_heads(self.root / HEADS_DIR)
        self._lock = threading.Lock()
        self._pseudonymous = profiles_by_pseudonym(self.root / "assets" / "users.npz")  # fails here on a missing or wrong key
        self._keyed: tuple[EventLog | None, EventLog | None] = (None, None)
        # what does not depend on a request, once per load: the catalog's b^F and P b^F, the projected descriptors
        self.catalog_cache = self.model.net.catalog_cache()
        self._warm_up()

    def _warm_up(self) -> None:
        """A request's work at load (two-stage over the targets), so that the first user does not pay the lazy
        set-up: the decoder's compile when `decoder.compile` is on, first allocations. Once as one case (a
        request of one user: its passes have no padding, no attention mask) and once as two cases of
        different lengths (padded, masked): the compiled decoder has a graph for each."""
        started = time.perf_counter()
        log_, case = history_log("", self.default_candidates[[0, 0]], np.array([0, 1]), self.catalog)
        self.rank(log_, case)
        self.rank(log_, EvalSet(np.zeros(2, np.int64), np.array([1, 2]), np.zeros(2, np.int32), np.array([0, 1])))
        log.info("warmed up in %.1f s (compile %s)", time.perf_counter() - started, "on" if self.model.cfg.net.decoder.compile else "off")

    def _profile_log(self, log_: EventLog) -> EventLog:
        """The log with its users named as the export's profile table names them (pseudonyms), made once per
        log: batch scoring ranks one log chunk by chunk. Called under the lock."""
        if not self._pseudonymous:
            return log_
        if self._keyed[0] is not log_:
            self._keyed = (log_, pseudonymous_log(log_))
        return self._keyed[1]

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    def rank(self, log_: EventLog, cases: EvalSet, candidates: np.ndarray | None = None, top_k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(B, K) candidate indices (catalog indices) and their scores, best first, K = min(top_k, C).

        `candidates` given (catalog indices): every one scored target-aware (`GTSLUM.score` with the
        re-ranking depth set to C). None: `default_candidates` (the export's target behaviours, else the
        whole catalog) by the model's two-stage retrieval (agnostic over all of them, the top
        `rerank_depth` re-scored target-aware). Ties keep candidate order (stable sort)."""
        cand = self.default_candidates if candidates is None else np.asarray(candidates, np.int64)
        with self._lock:
            depth = self.model.cfg.rerank_depth
            if candidates is not None:
                self.model.cfg.rerank_depth = len(cand)
            try:
                scores = self.model.score(self._profile_log(log_), cases, cand, self.catalog_cache)  # (B, C)
            finally:
                self.model.cfg.rerank_depth = depth
        k = min(int(top_k), len(cand))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return cand[order], np.take_along_axis(scores, order, axis=1)

    def aware_threshold(self) -> float:
        """Scores above this were re-ranked target-aware (two-stage places them above 2 x scale)."""
        return 2.0 * float(self.model.net.scale.detach())

    def head_outputs(self, log_: EventLog, cases: EvalSet, names: list[str]) -> list[dict]:
        """Per case, {head name: outputs} of the requested heads (KeyError naming a head the export lacks)."""
        missing = [n for n in names if n not in self.heads]
        if missing:
            raise KeyError(f"head(s) {missing} not in this export (it has {sorted(self.heads) or 'no heads'})")
        out: list[dict] = [{} for _ in range(len(cases))]
        for name in names:
            spec = self.heads[name]
            parts = spec.inputs.split("+")
            with self._lock:  # a decoder pass only for heads that read the state
                got = head_input_parts(self.model, self._profile_log(log_), cases, parts, spec.task_token, self.catalog_cache)
            emb = torch.as_tensor(np.concatenate([got[p] for p in parts], 1)).float()
            if isinstance(spec.head, UpliftHead):
                p = spec.head.predict_proba(emb).numpy()
                values = [{"uplift": float(r[1] - r[0]), "p_control": float(r[0]), "p_treated": float(r[1])} for r in p]
            elif spec.task.kind == "binary":
                values = [{"probability": float(v)} for v in spec.head.predict_proba(emb).numpy()]
            else:
                classes = [format(c, "g") for c in spec.task.classes]
                values = [{"probabilities": dict(zip(classes, map(float, r)))} for r in spec.head.predict_proba(emb).numpy()]
            for row, value in zip(out, values):
                row[name] = {"kind": spec.task.kind, **value}
        return out


def load_export(export_dir: str | Path, device: str = "cpu", rerank_depth: int | None = None, compile: bool | None = None) -> ServingModel:
    """Load an export for scoring (`rerank_depth` and `compile` override the model's re-ranking depth and `decoder.compile`)."""
    return ServingModel(export_dir, device, rerank_depth, compile)
