"""GTS-LUM as a recommender: the network (`modeling.gts_lum_model`) with its encoder artifacts, timestamp
process and catalog features (`attach`), phase II (`fit`, `training.phase2`), two-stage scoring, user
embeddings for the label heads, and save / load."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.profiler import record_function

from gts_lum.config import from_dict
from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.device import device_info, select_device
from gts_lum.evaluation.protocol import EvalConfig, evaluate, history_mask, validation_metric
from gts_lum.modeling.behavior_features import BehaviorFeatures, features_from_artifacts, stand_in_features
from gts_lum.modeling.decoder import DecoderConfig
from gts_lum.modeling.gts_lum_model import CatalogCache, GTSLUMNetConfig, GTSLUMNetwork, SequenceBatch, make_batch
from gts_lum.modeling.qformer import QFormerConfig, adapter_card, adapter_from_card, build_adapter, load_adapter
from gts_lum.sequence.splits import hold_out_for_validation
from gts_lum.sequence.timestamp_process import BehaviorStats, SequenceConfig, TimeGrid, build_sequences
from gts_lum.sequence.tokens import TokenSequences
from gts_lum.tokenizer.text_encoder import encode
from gts_lum.training.loop import train_loop
from gts_lum.training.phase2 import Phase2Config, Phase2Task

log = logging.getLogger(__name__)


@dataclass
class ArtifactPaths:
    """Encoder artifacts of the pipeline; any left empty falls back (see `GTSLUM.attach`)."""

    semantic_ids: str = ""  # tokenizer stage folder
    graph: str = ""  # node2vec stage folder
    tables: str = ""  # table stage folder (behavior_table.npz, user_table.npz)
    qformer: str = ""  # phase-I folder (qformer.yaml + qformer.safetensors): the adapter starts from it


def _default_qformer() -> QFormerConfig:
    return QFormerConfig(num_queries=4, num_layers=2, num_heads=4, hidden_size=128, intermediate_size=256, max_window=16)


@dataclass
class GTSLUMConfig:
    net: GTSLUMNetConfig = field(default_factory=GTSLUMNetConfig)
    qformer: QFormerConfig = field(default_factory=_default_qformer)  # used when artifacts.qformer is empty
    artifacts: ArtifactPaths = field(default_factory=ArtifactPaths)
    # timestamp-process overrides for this model (Table 3: {"variant": "none" | "text" | "component" |
    # "position"}); the data set's settings otherwise
    sequence: dict = field(default_factory=dict)
    train: Phase2Config = field(default_factory=Phase2Config)
    rerank_depth: int = 50  # two-stage scoring: re-rank the agnostic top N target-aware (0: agnostic only)
    # choose on validation between agnostic-only scoring (depth 0) and the two-stage `rerank_depth`: a
    # target-aware path that has not learned to beat the agnostic order would only shuffle the top N
    select_rerank: bool = True
    score_chunk: int = 512  # sequences per decoder pass when scoring


@dataclass
class GTSLUMAssets:
    """What a GTS-LUM model holds beside its network's weights (`attach`; saved as the checkpoint's
    assets/ by `save_assets`): the catalog's features, the timestamp process and the training users' profiles."""

    features: BehaviorFeatures  # the catalog's semantic IDs, business and text embeddings (row i: behaviour i)
    sequence_cfg: SequenceConfig  # the timestamp process's settings
    stats: BehaviorStats  # the timestamp process's behaviour statistics (dedup, interval caps)
    user_ids: np.ndarray  # (num_users,) str the training log's user ids: the rows of `user_vectors`
    user_vectors: np.ndarray | None  # (num_users, D_u) profile table (NaN rows: no profile), None without profiles
    adapter_card: dict | None = None  # the adapter's config (`qformer.adapter_card`): set when the network is built
    # not saved: the log whose user order the network's profile rows follow now (`GTSLUM._align_profiles`)
    profiles_for: EventLog | None = field(default=None, repr=False)
    # not saved: the profile table's user-id index and mean row (`GTSLUM.profile_vectors`), built on first use
    # and not per request
    profile_lookup: tuple[pd.Index, np.ndarray] | None = field(default=None, repr=False)


class GTSLUM:
    """GTS-LUM for `gts-lum bench`, the training stage and the scorer: attach / fit / score / save.

    model = build_model("gts_lum", "pkg:models/gts_lum.yaml", overrides)
    model.attach(SequenceDataset.load("runs/demo/sequences"))   # catalog, timestamp process, artifacts
    model.fit(split, eval_cfg, candidates)                        # phase II, epoch picked on validation
    scores = model.score(split.log, split.test, candidates)       # two-stage: agnostic, then target-aware
    """

    name = "gts_lum"

    def __init__(self, cfg: GTSLUMConfig | None = None):
        self.cfg = cfg or GTSLUMConfig()
        self.net: GTSLUMNetwork | None = None
        self.device = torch.device("cpu")
        self.amp_dtype = None
        self.history_filter = False
        self._assets: GTSLUMAssets | None = None

    @classmethod
    def describe(cls) -> str:
        return "gts_lum: attach(dataset), fit(split, eval_cfg, candidates), score(log, cases, candidates) -> (B, C)"

    # -- building --------------------------------------------------------------------------------------
    def attach(self, dataset) -> None:
        """Catalog features (real artifacts where given, stand-ins otherwise), timestamp process, profiles."""
        art = self.cfg.artifacts
        behaviors = dataset.behaviors()
        if art.semantic_ids or art.graph or art.tables:
            table = Path(art.tables) / "behavior_table.npz" if art.tables else None
            features = features_from_artifacts(
                dataset.root, art.semantic_ids or None, art.graph or None, table if table is not None and table.exists() else None
            )
        else:
            log.info("gts_lum: no encoder artifacts given; stand-in semantic IDs and table embeddings (stand_in_features)")
            features = stand_in_features(behaviors, encode(behaviors["description"].astype(str).tolist()))
        user_vectors = None
        if art.tables and (Path(art.tables) / "user_table.npz").exists():
            with np.load(Path(art.tables) / "user_table.npz", allow_pickle=False) as z:
                user_vectors = _align_users(dataset.event_log.user_ids, z["user_ids"], z["vectors"])
        sequence_cfg = dataset.sequence_cfg
        if self.cfg.sequence:
            sequence_cfg = from_dict(type(sequence_cfg), {**dataclasses.asdict(sequence_cfg), **self.cfg.sequence})
        self._assets = GTSLUMAssets(
            features=features,
            sequence_cfg=sequence_cfg,
            stats=dataset.stats,
            user_ids=dataset.event_log.user_ids.astype(str),
            user_vectors=user_vectors,
        )
        self._build(descriptor_texts=list(TimeGrid(sequence_cfg).descriptor_texts))

    def _build(self, descriptor_texts: list[str], adapter_state: dict | None = None) -> None:
        self.device = select_device(self.cfg.train.device)
        self.amp_dtype = device_info(self.device).amp_dtype
        torch.manual_seed(self.cfg.train.seed)
        features = self._assets.features
        hidden = _decoder_width(self.cfg.net.decoder)
        card = self._assets.adapter_card
        if card is not None:  # a saved GTS-LUM model: the adapter exactly as trained
            adapter = adapter_from_card(card)  # its catalog is set once the weights (vocabulary) are in
        elif self.cfg.artifacts.qformer:
            adapter = load_adapter(self.cfg.artifacts.qformer, features)
            if adapter.cfg.decoder_hidden_size != hidden:  # phase I never trains the projection: size it for this decoder
                adapter.resize_projection(hidden)
        else:
            adapter = build_adapter(dataclasses.replace(self.cfg.qformer, decoder_hidden_size=hidden), features)
        self._assets.adapter_card = adapter_card(adapter)
        descriptors = None if self.cfg.net.decoder.pretrained else encode(descriptor_texts)
        self.net = GTSLUMNetwork(
            self.cfg.net,
            adapter,
            descriptor_texts,
            descriptors,
            self._assets.user_vectors,
            features.semantic_ids,
            features.codebook_sizes,
        ).to(self.device)
        if adapter_state is not None:
            self.net.load_state_dict(adapter_state)
        self.net.adapter.set_catalog(features)  # buffers onto the device

    # -- data ------------------------------------------------------------------------------------------
    def sequences(self, log_: EventLog, cases) -> TokenSequences:
        return build_sequences(log_, cases, self._assets.sequence_cfg, self._assets.stats)

    def batch(self, tokens: TokenSequences, log_: EventLog, history_end: np.ndarray) -> SequenceBatch:
        self._align_profiles(log_)
        return make_batch(tokens, log_, history_end, self.cfg.net.compressor)

    def _align_profiles(self, log_: EventLog) -> None:
        """Profile rows follow the user order of the log being scored (a serving request's one-user log,
        a held-out log): matched by user id against the profiles the model was trained with."""
        net = self._require()
        if net.profile_projection is None or self._assets.profiles_for is log_:
            return
        known = self._assets.user_ids.astype(str)
        vectors = self._assets.user_vectors
        if len(known) != log_.num_users or not np.array_equal(known, log_.user_ids.astype(str)):
            vectors = _align_users(log_.user_ids, known, vectors)
        net.set_user_vectors(vectors)
        self._assets.profiles_for = log_

    def autocast(self):
        enabled = self.amp_dtype is not None and self.cfg.train.amp
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    def _require(self) -> GTSLUMNetwork:
        if self.net is None:
            raise RuntimeError("gts_lum: attach(dataset) (or load the saved model) before fit/score")
        return self.net

    # -- training --------------------------------------------------------------------------------------
    def fit(self, split, eval_cfg=None, candidates: np.ndarray | None = None, checkpoint_dir: str | Path | None = None) -> dict:
        self._require()
        eval_cfg = eval_cfg or EvalConfig()
        self.history_filter = eval_cfg.history_filter
        tc = self.cfg.train
        targets = candidates  # the split's target subset (None: every behaviour)
        split = hold_out_for_validation(split, tc.valid_holdout_events, targets)
        valid_cfg = EvalConfig(
            ks=eval_cfg.ks, batch_size=eval_cfg.batch_size, history_filter=eval_cfg.history_filter, max_users=tc.valid_cases, seed=tc.seed
        )
        configured = self.cfg.rerank_depth
        depths = [0, configured] if self.cfg.select_rerank and configured and self.cfg.net.target_placement != "none" else [configured]

        def valid_by_depth() -> dict[int, float]:
            values = {}
            for depth in depths:
                self.cfg.rerank_depth = depth
                metrics = evaluate(self, split.log, split.valid, candidates, valid_cfg, desc=f"gts_lum valid (re-rank {depth})")
                values[depth] = validation_metric(metrics, tc.select_metric)
            self.cfg.rerank_depth = configured
            return values

        def valid_fn() -> float:
            # epochs are picked on the agnostic ranking (one decoder pass per case; the re-ranking passes
            # cost as much as an epoch of training), the re-ranking depth once, on the picked epoch
            self.cfg.rerank_depth = depths[0]
            try:
                metrics = evaluate(self, split.log, split.valid, candidates, valid_cfg, desc=f"gts_lum valid (re-rank {depths[0]})")
            finally:
                self.cfg.rerank_depth = configured
            return validation_metric(metrics, tc.select_metric)

        trained = targets if tc.targets == "split" else None  # what phase II predicts (validation ranks `targets`)
        stats = train_loop(Phase2Task(self, split, trained, valid_fn), tc, checkpoint_dir, self.device)
        if len(depths) > 1:  # the best epoch's weights are in: pick the scoring on validation
            values = valid_by_depth()
            self.cfg.rerank_depth = max(values, key=lambda d: (values[d], d))
            stats["valid_by_rerank_depth"] = {str(d): v for d, v in values.items()}
            log.info("gts_lum: validation %s by re-rank depth %s: scoring with depth %d", tc.select_metric, values, self.cfg.rerank_depth)
        stats["rerank_depth"] = self.rerank_depth
        stats["device"] = str(self.device)
        return stats

    @property
    def assets(self) -> GTSLUMAssets:
        """The catalog's features, the timestamp process and the profiles (what an export serves with)."""
        if self._assets is None:
            raise RuntimeError("gts_lum: attach(dataset) (or load the saved model) first")
        return self._assets

    # -- scoring ---------------------------------------------------------------------------------------
    @property
    def rerank_depth(self) -> int:
        """The re-ranking depth scoring uses: 0 without a target-aware path (target placement none)."""
        return 0 if self.cfg.net.target_placement == "none" else self.cfg.rerank_depth

    @torch.no_grad()
    def score(self, log_: EventLog, cases, candidates: np.ndarray, catalog: CatalogCache | None = None) -> np.ndarray:
        """(B, C) scores. Two-stage: agnostic over all candidates, the top `rerank_depth` re-scored
        target-aware and placed above the rest in their new order (the rest keep agnostic order).
        `catalog`: `catalog_cache()` of the current weights (a server computes it once per model load)."""
        net = self._require()
        was_training = net.training
        net.eval()
        candidates = np.asarray(candidates, np.int64)
        with record_function("gts_lum.timestamp_process"):  # stage labels: `gts-lum load-bench --profile`
            tokens = self.sequences(log_, cases)
            batch = self.batch(tokens, log_, np.asarray(cases.history_end))
        cand = torch.as_tensor(candidates, device=self.device)
        with self.autocast():
            with record_function("gts_lum.fuse"):
                ctx = net.context(batch, extra_behaviors=cand, catalog=catalog)
            with record_function("gts_lum.retrieval"):  # the agnostic pass inside: its own label
                items = catalog.items[cand] if catalog is not None else net.item_embeddings(net.lookup(ctx, cand))
                scores = net.agnostic_scores(ctx, items)  # (B, C)
                depth = min(self.rerank_depth, len(candidates))
                if depth:
                    masked = scores.clone()
                    if self.history_filter:
                        masked[torch.as_tensor(history_mask(log_, cases, candidates), device=self.device)] = -torch.inf
                    top = masked.topk(depth, dim=1).indices  # (B, N) columns
            if depth:
                with record_function("gts_lum.aware_passes"):
                    aware = net.aware_scores(ctx, cand[top], chunk=self.cfg.score_chunk)  # (B, N)
                # above every agnostic score: cosine * scale lies in [-scale, scale]
                scores.scatter_(1, top, aware + 4 * net.scale)
        net.train(was_training)
        return scores.float().cpu().numpy()

    @torch.no_grad()
    def history_summary(self, log_: EventLog, cases, catalog: CatalogCache | None = None) -> np.ndarray:
        """(B, H) mean of the fused behaviour embeddings b^F over each case's whole history (zeros for an
        empty one). The decoder reads a history's last `token_budget` tokens, a few percent of a month of
        telecom events; labels such as churn depend on the whole month (BENCHMARKS.md "Label tasks")."""
        net = self._require()
        fused = (catalog if catalog is not None else net.catalog_cache()).fused
        starts = log_.offsets[np.asarray(cases.users)].astype(np.int64)
        lengths = np.asarray(cases.history_end, np.int64) - starts
        events = torch.as_tensor(log_.behavior[ragged_arange(starts, lengths)], dtype=torch.long, device=fused.device)
        case = torch.as_tensor(np.repeat(np.arange(len(lengths)), lengths), device=fused.device)
        total = torch.zeros(len(lengths), fused.shape[1], dtype=fused.dtype, device=fused.device).index_add_(0, case, fused[events])
        return (total / torch.as_tensor(np.maximum(lengths, 1), dtype=fused.dtype, device=fused.device)[:, None]).float().cpu().numpy()

    def profile_vectors(self, log_: EventLog, cases) -> np.ndarray | None:
        """(B, D_u) each case's user's row of the profile table (the table encoder's user embedding), matched
        by user id; a user the table lacks (or holds no profile for) gets the table's mean row, the average
        user. None: the model has no profile table."""
        assets = self._assets
        if assets.user_vectors is None:
            return None
        if assets.profile_lookup is None:
            assets.profile_lookup = (pd.Index(assets.user_ids.astype(str)), np.nanmean(assets.user_vectors, 0).astype(np.float32))
        index, mean = assets.profile_lookup
        rows = index.get_indexer(log_.user_ids[np.asarray(cases.users)].astype(str))
        out = np.where((rows >= 0)[:, None], assets.user_vectors[np.maximum(rows, 0)], np.nan).astype(np.float32)
        return np.where(np.isnan(out), mean, out)

    @torch.no_grad()
    def user_embeddings(self, log_: EventLog, cases, task: int | None = None, catalog: CatalogCache | None = None) -> np.ndarray:
        """(B, H) last hidden states: target-agnostic, or with label task `task`'s token in front
        (`catalog`: as in `score`). A label head's other inputs: `serving.export.head_input_parts`."""
        net = self._require()
        was_training = net.training
        net.eval()
        tokens = self.sequences(log_, cases)
        ends = np.asarray(cases.history_end)
        out = []
        for s in range(0, len(cases), self.cfg.score_chunk):  # bounded memory on any number of users
            rows = np.arange(s, min(s + self.cfg.score_chunk, len(cases)))
            ctx = net.context(self.batch(tokens.subset(rows), log_, ends[rows]), catalog=catalog)
            task_t = None if task is None else torch.full((len(rows),), task, dtype=torch.long, device=self.device)
            out.append(net.user_states(ctx, task=task_t).cpu().numpy())
        net.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, net.hidden_size), np.float32)

    # -- label tasks (training.task_tokens) ------------------------------------------------------------
    def set_tasks(self, names: list[str]) -> None:
        """One learned front token per label task (`cfg.net.tasks`); tokens of names already there are kept."""
        net = self._require()
        old = {name: net.task_tokens.weight[i].detach().clone() for i, name in enumerate(self.cfg.net.tasks)}
        self.cfg.net.tasks = list(names)
        table = nn.Embedding(max(len(names), 1), net.hidden_size).to(self.device)
        nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            for i, name in enumerate(names):
                if name in old:
                    table.weight[i] = old[name]
        net.task_tokens = table

    def task_index(self, name: str) -> int:
        if name not in self.cfg.net.tasks:
            raise KeyError(f"gts_lum: no task token for {name!r} (tasks: {self.cfg.net.tasks}); set_tasks first")
        return self.cfg.net.tasks.index(name)

    # -- persistence (training.checkpoint) -------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._require().state_dict()

    def save_assets(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        a = self._assets
        a.features.save(folder / "features.npz")
        a.stats.save(folder / "behavior_stats.npz")
        users = {"user_ids": np.asarray(a.user_ids, dtype=str)}
        if a.user_vectors is not None:
            users["vectors"] = a.user_vectors
        np.savez(folder / "users.npz", **users)
        card = {"sequence_config": dataclasses.asdict(a.sequence_cfg), "adapter": a.adapter_card}
        (folder / "assets.yaml").write_text(yaml.safe_dump(card, sort_keys=False))

    def load_assets(self, folder: str | Path) -> None:
        folder = Path(folder)
        card = yaml.safe_load((folder / "assets.yaml").read_text())
        with np.load(folder / "users.npz", allow_pickle=False) as z:
            user_ids, vectors = z["user_ids"], (z["vectors"] if "vectors" in z.files else None)
        self._assets = GTSLUMAssets(
            features=BehaviorFeatures.load(folder / "features.npz"),
            sequence_cfg=from_dict(SequenceConfig, card["sequence_config"]),
            stats=BehaviorStats.load(folder / "behavior_stats.npz"),
            user_ids=user_ids,
            user_vectors=vectors,
            adapter_card=card["adapter"],
        )

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None:
        if self._assets is None:
            raise RuntimeError("gts_lum: load_assets(folder) first (recommenders.registry.load_model does it)")
        self.cfg.train.device = device
        self._build(list(TimeGrid(self._assets.sequence_cfg).descriptor_texts), adapter_state=tensors)
        self.net.eval()


def _decoder_width(cfg: DecoderConfig) -> int:
    if not cfg.pretrained:
        return cfg.hidden_size
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(Path(cfg.pretrained).expanduser())).hidden_size)


def _align_users(log_users: np.ndarray, table_users: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Profile rows in the log's user order; NaN rows for users the table lacks."""
    rows = pd.Index(table_users.astype(str)).get_indexer(log_users.astype(str))
    out = np.full((len(log_users), vectors.shape[1]), np.nan, np.float32)
    out[rows >= 0] = vectors[rows[rows >= 0]]
    missing = int((rows < 0).sum())
    if missing:
        log.info("gts_lum: %d of %d users have no profile row (a learned 'missing profile' token stands in)", missing, len(log_users))
    return out
