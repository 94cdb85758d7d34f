"""Phase I: Q-former pretraining (paper section 3.3, Figure 2(b-1), (b-2)).

Six alignment tasks, BLIP-2 style, each weighted by `LossWeights`:

behaviour level (b = a catalog behaviour, t = its description)
- BTC  behaviour-text contrastive: InfoNCE between the query outputs (similarity = max over queries)
       and the text's [CLS] output, learnable temperature, unimodal mask; identical texts in a batch
       count as positives of each other.
- BTM  behaviour-text matching: bidirectional mask, binary head on the mean query output; per
       behaviour one hard negative text and per text one hard negative behaviour, sampled from the
       BTC similarities (softmax weights), never a pair with an identical text.
- BTG  behaviour-grounded text generation: causal mask, text sees all queries, queries do not see
       text; LM head; teacher forcing with [DEC] in place of [CLS].
sequence level (the same three, "STC/STM/STG"): a window of K consecutive behaviours of a user's
TRAINING events against a text describing it (`build_windows`): the data set's `scenarios` rows where
it has them, else the most frequent values of a behaviours-table column over the window
(`describe_windows`). The queries cross-attend to the window's K behaviour embeddings (paper Eq. 4).

Training (`Phase1Trainer`) runs `Phase1Task` on the shared loop (`training.loop.train_loop`, as phase II
and the baselines do): AdamW (betas 0.9/0.98, weight decay on matrices only), warm-up then cosine down
to `min_lr_ratio` x lr, clipping, fp32 on CPU (bf16 autocast only on NPU/CUDA). An epoch trains every
training behaviour once with windows drawn alongside, in an order that is a function of (seed, epoch);
each step's randomness (dropout, mined negatives) comes from (seed, epoch, step). After each epoch:
BTC retrieval and BTM accuracy on behaviours and windows HELD OUT of training and the spread of the
catalog's b^F (`Phase1Task.evaluate`); the epoch best in `select_metric` of them gives the weights
written. Checkpoints: the loop's all-or-nothing folder `checkpoint/` (every `checkpoint_every` steps, at
epoch ends, at `max_steps`); a run restarted on the output folder resumes there and ends with the
weights of an uninterrupted run, and only under the config that wrote it (`checkpoint-config.json`).

Output folder: `qformer.safetensors` + `qformer.yaml` (the adapter, `modeling.qformer.load_adapter`),
`fused_embeddings.npy` (N, decoder_hidden_size) b^F of every catalog behaviour, `metrics.json` (steps,
the kept epoch, the per-epoch history; `final`: the kept epoch's training figures and the held-out
alignment of the weights written).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.device import device_info, select_device
from gts_lum.modeling.behavior_features import BehaviorFeatures
from gts_lum.modeling.qformer import BehaviorSide, QFormer, QFormerConfig, build_adapter, save_adapter, trim_text
from gts_lum.training.checkpoint import has_training_state
from gts_lum.training.loop import check_schedule, epoch_rng, train_loop

log = logging.getLogger(__name__)

AUTO_TEXT_COLUMNS = ("family", "category", "genres", "type")
WINDOW_TEXTS = ("auto", "scenarios", "column")
# Settings that may change between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = ("max_steps", "device", "checkpoint_every")


@dataclass
class LossWeights:
    btc: float = 1.0
    btm: float = 1.0
    btg: float = 1.0
    stc: float = 1.0
    stm: float = 1.0
    stg: float = 1.0
    # Not one of the paper's six tasks: the uniformity of the batch's b^F (the mean of the fused query
    # outputs the decoder reads) on the unit sphere, log E exp(-2 |b_i - b_j|^2) (Wang & Isola 2020).
    # The six tasks read each query on its own and let that mean collapse onto a few directions
    # (effective rank 32 -> 4 on the simulator while retrieval rose; BENCHMARKS.md "Phase I before phase II").
    spread: float = 0.0  # pkg:qformer/default.yaml sets 1.0


@dataclass
class WindowConfig:
    size: int = 16  # K behaviours per window (<= qformer.max_window)
    text: str = "auto"  # auto (scenarios where the data set has them, else column) | scenarios | column
    # behaviours-table column whose frequent values describe a window; "auto": the first of
    # AUTO_TEXT_COLUMNS with more than one value (else the descriptions), so any catalog works
    text_column: str = "auto"
    top_values: int = 3  # values named in a built description
    value_separator: str = "|"  # multi-valued cells, e.g. MovieLens genres "Action|Comedy"
    min_behaviors: int = 2  # shorter windows are dropped


@dataclass
class Phase1Config:
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    epochs: int = 20  # passes over the training behaviours; windows are drawn alongside
    batch_size: int = 64  # behaviours per step
    window_batch_size: int = 32  # windows per step
    lr: float = 3e-4
    lr_schedule: str = "cosine"  # constant | cosine, after `warmup_steps` of linear warm-up (training.loop)
    min_lr_ratio: float = 0.1  # the cosine ends at 10% of lr
    weight_decay: float = 0.05  # on weight matrices only
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    # Hard negatives for matching are drawn with softmax(cosine / t) weights; None: t = the learned BTC
    # temperature (BLIP-2, which starts from pretrained towers). From scratch, the near-argmax negatives of
    # a sharp learned temperature leave the matching head at chance; a softer t mixes in easier ones.
    mining_temperature: float | None = 1.0
    holdout_fraction: float = 0.1  # behaviours and windows held out of training for the alignment metrics
    # the held-out figure (Phase1Task.evaluate, higher is better) that picks the epoch whose weights are
    # kept: behaviour -> text retrieval of held-out behaviours
    select_metric: str = "behavior_retrieval_top1"
    patience: int = 20  # epochs without a better select_metric before stopping (= epochs: never early)
    checkpoint_every: int = 500  # steps between checkpoints (also at each epoch end and at max_steps)
    max_steps: int | None = None  # stop after this many steps in all (a time-boxed run; the schedule still spans `epochs`)
    # training wall time (s) to plan the epochs by after the first one (training.loop); None: `epochs`
    time_budget_s: float | None = None
    seed: int = 0
    device: str = "auto"  # see gts_lum.device.select_device
    amp: bool = True  # bf16 autocast on NPU/CUDA; never on CPU

    def __post_init__(self) -> None:
        check_schedule(self, "Phase1Config")
        if self.windows.text not in WINDOW_TEXTS:
            raise ValueError(f"Phase1Config.windows.text {self.windows.text!r}: expected one of {WINDOW_TEXTS}")
        if self.windows.size > self.qformer.max_window:
            raise ValueError(f"Phase1Config.windows.size {self.windows.size} exceeds qformer.max_window {self.qformer.max_window}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"Phase1Config.holdout_fraction must lie in [0, 1), got {self.holdout_fraction}")
        if not self.holdout_fraction and not self.select_metric.startswith("fused_"):
            raise ValueError(
                f"Phase1Config.select_metric {self.select_metric!r} needs held-out cases (holdout_fraction > 0) or a fused_ figure"
            )
        if self.batch_size < 2 or self.window_batch_size < 2:
            raise ValueError("Phase1Config: batch_size and window_batch_size must be >= 2 (in-batch negatives)")


# -- sequence-level windows ------------------------------------------------------------------------
@dataclass
class WindowSet:
    """Windows of consecutive training behaviours and the texts that describe them."""

    behaviors: np.ndarray  # (W, K) int64 catalog index, 0 under padding
    mask: np.ndarray  # (W, K) bool, True for real entries (a prefix of each row)
    texts: list[str]  # (W,)
    users: np.ndarray  # (W,) int64 user index
    source: str  # "scenarios" or "column:<name>"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> WindowSet:
        return WindowSet(self.behaviors[idx], self.mask[idx], [self.texts[i] for i in idx], self.users[idx], self.source)


def _gather(log_: EventLog, first_row: np.ndarray, length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Behaviours of events first_row[i] : first_row[i] + length[i] as (W, size) rows + mask."""
    mask = np.arange(size)[None, :] < np.minimum(length, size)[:, None]
    rows = np.where(mask, first_row[:, None] + np.arange(size)[None, :], 0)
    return np.where(mask, log_.behavior[rows], 0).astype(np.int64), mask


def consecutive_windows(log_: EventLog, size: int, min_behaviors: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping windows of `size` consecutive events of each user: behaviours (W, K), mask, users (W,)."""
    lengths = log_.lengths()
    per_user = -(-lengths // size)
    users = np.repeat(np.arange(log_.num_users), per_user)
    index = ragged_arange(np.zeros(len(per_user), np.int64), per_user)  # window number within its user
    first = log_.offsets[users] + index * size
    length = np.minimum(size, log_.offsets[users + 1] - first)
    keep = length >= min_behaviors
    behaviors, mask = _gather(log_, first[keep], length[keep], size)
    return behaviors, mask, users[keep].astype(np.int64)


def scenario_windows(log_: EventLog, scenarios: pd.DataFrame, size: int, min_behaviors: int = 2) -> WindowSet:
    """One window per scenario row: the user's first `size` events inside [start, end]."""
    missing = {"user_id", "start", "end", "text"} - set(scenarios.columns)
    if missing:
        raise ValueError(f"scenarios table lacks column(s) {sorted(missing)}")
    users = pd.Index(log_.user_ids.astype(str)).get_indexer(scenarios["user_id"].astype(str))
    start, end = _seconds(scenarios["start"], "start"), _seconds(scenarios["end"], "end")
    bad = np.flatnonzero(end < start)
    if len(bad):
        raise ValueError(f"scenarios row {bad[0]}: end precedes start ({len(bad)} rows at fault)")
    # events are sorted by (user, time): one searchsorted over a combined key finds every span
    t0 = int(log_.timestamp.min()) if log_.num_events else 0
    shift = np.int64(1 << 34)  # > any span of seconds in the log
    key = log_.user_of_event().astype(np.int64) * shift + (log_.timestamp - t0)
    known = users >= 0
    u = users[known].astype(np.int64)
    lo = np.searchsorted(key, u * shift + np.clip(start[known] - t0, 0, shift - 1), "left")
    hi = np.searchsorted(key, u * shift + np.clip(end[known] - t0, -1, shift - 1), "right")
    length = hi - lo
    keep = length >= min_behaviors
    behaviors, mask = _gather(log_, lo[keep], length[keep], size)
    texts = scenarios["text"].astype(str).to_numpy()[known][keep].tolist()
    log.info(
        "scenario windows: %d of %d scenarios hold >= %d training events (%d of unknown users)",
        int(keep.sum()),
        len(scenarios),
        min_behaviors,
        int((~known).sum()),
    )
    return WindowSet(behaviors, mask, texts, u[keep], "scenarios")


def _seconds(column: pd.Series, what: str) -> np.ndarray:
    """Unix seconds of a scenarios time column: datetimes (naive ones read as UTC) or integers."""
    if column.isna().any():
        raise ValueError(f"scenarios column {what!r}: row {int(np.flatnonzero(column.isna().to_numpy())[0])} is empty")
    if pd.api.types.is_datetime64_any_dtype(column):
        return pd.to_datetime(column, utc=True).astype("datetime64[s, UTC]").astype("int64").to_numpy()
    try:
        return column.to_numpy(dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"scenarios column {what!r}: expected datetimes or unix seconds, got {column.dtype}") from None


def describe_windows(behaviors: np.ndarray, mask: np.ndarray, values: pd.Series, top: int = 3, separator: str = "|") -> list[str]:
    """A description per window: its `top` most frequent values of a behaviour attribute, most frequent first.

    `values` (N,): the attribute of every catalog behaviour (a behaviours-table column); cells may hold
    several values joined by `separator`. Ties go to the value that sorts first; "_" reads as a space.
    """
    cells = values.reset_index(drop=True).astype("string").fillna("").str.split(separator).explode().str.strip()
    cells = cells[cells != ""]
    codes, words = pd.factorize(cells, sort=True)
    has = sp.csr_matrix((np.ones(len(codes), np.float32), (cells.index.to_numpy(), codes)), shape=(len(values), len(words)))
    w = np.repeat(np.arange(len(behaviors)), mask.sum(1))
    member = sp.csr_matrix((np.ones(len(w), np.float32), (w, behaviors[mask])), shape=(len(behaviors), len(values)))
    counts = member @ has  # (W, V) sparse
    out: list[str] = []
    names = np.array([str(x).replace("_", " ") for x in words], dtype=object)
    for s in range(0, len(behaviors), 4096):  # dense in chunks: W x V may not fit at once
        block = counts[s : s + 4096].toarray()
        order = np.argsort(-block, axis=1, kind="stable")[:, :top]
        present = np.take_along_axis(block, order, 1) > 0
        out += [", ".join(names[o[p]]) for o, p in zip(order, present)]
    return out


def build_windows(train: EventLog, behaviors: pd.DataFrame, scenarios: pd.DataFrame | None, cfg: WindowConfig) -> WindowSet:
    """Sequence-level pairs from the TRAINING events: scenario windows, or consecutive windows described by a column."""
    use_scenarios = cfg.text == "scenarios" or (cfg.text == "auto" and scenarios is not None and len(scenarios))
    if use_scenarios:
        if scenarios is None:
            raise ValueError("windows.text=scenarios but the data set has no scenarios table")
        return scenario_windows(train, scenarios, cfg.size, cfg.min_behaviors)
    column = cfg.text_column
    if column == "auto":
        column = next((c for c in AUTO_TEXT_COLUMNS if c in behaviors.columns and behaviors[c].nunique() > 1), "description")
        log.info("window texts from the behaviours' %r column", column)
    if column not in behaviors.columns:
        raise ValueError(f"windows.text_column {column!r} is not a behaviours-table column (have {list(behaviors.columns)})")
    if len(behaviors) != train.num_behaviors:
        raise ValueError(f"behaviours table has {len(behaviors)} rows, the event log's catalog {train.num_behaviors}")
    windows, mask, users = consecutive_windows(train, cfg.size, cfg.min_behaviors)
    texts = describe_windows(windows, mask, behaviors[column], cfg.top_values, cfg.value_separator)
    return WindowSet(windows, mask, texts, users, f"column:{column}")


# -- losses ----------------------------------------------------------------------------------------
def same_text(ids: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: rows i and j hold the same token ids (identical texts are not negatives of each other)."""
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def contrastive_similarity(model: QFormer, query_out: torch.Tensor, text_out: torch.Tensor) -> torch.Tensor:
    """(B_b, B_t) cosine similarity; a behaviour's similarity to a text is its best query's (BLIP-2)."""
    return torch.einsum("iqc,jc->ijq", model.behavior_features(query_out), model.text_features(text_out)).amax(-1)


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets spread over all positives of a row (identical texts)."""
    targets = positives.float() / positives.float().sum(1, keepdim=True)
    b2t = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    t2b = -(targets.T * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (b2t + t2b) / 2


def hard_negatives(logits: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row one column sampled with softmax(logits) weights among non-positives; and whether one exists."""
    weights = torch.softmax(logits.detach().float(), 1).masked_fill(positives, 0.0)
    has = weights.sum(1) > 0
    weights[~has] = 1.0  # a placeholder draw, masked out of the loss
    return torch.multinomial(weights, 1).squeeze(1), has


def alignment_losses(
    model: QFormer,
    side: BehaviorSide,
    text_ids: torch.Tensor,
    text_pad: torch.Tensor,
    weights: tuple[float, float, float],
    names: tuple[str, str, str],
    mining_temperature: float | None = None,
) -> dict[str, torch.Tensor]:
    """Contrastive, matching and generation losses (+ batch accuracies) of behaviour sides against texts.

    Tasks with weight 0 are not computed (matching still needs the contrastive pass for its negatives).
    """
    w_c, w_m, w_g = weights
    c, m, g = names
    out: dict[str, torch.Tensor] = {}
    b = len(side)
    arange = torch.arange(b, device=text_ids.device)
    if w_c or w_m:
        positives = same_text(text_ids)
        query_out, text_out = model.encode(side, text_ids, text_pad, "unimodal")
        sim = contrastive_similarity(model, query_out, text_out)
        logits = sim / model.temperature.clamp(0.001, 0.5)
        out[c] = contrastive_loss(logits, positives)
        out[f"{c}_acc"] = positives[arange, logits.argmax(1)].float().mean().detach()
        if w_m:
            mining = logits if mining_temperature is None else sim / mining_temperature
            neg_text, has_text = hard_negatives(mining, positives)
            neg_beh, has_beh = hard_negatives(mining.T, positives.T)
            # streams: (b_i, t_i) match; (b_i, hard t) and (hard b, t_i) do not
            beh_rows = torch.cat([arange, arange, neg_beh])
            text_rows = torch.cat([arange, neg_text, arange])
            query_out, _ = model.encode(side.select(beh_rows), text_ids[text_rows], text_pad[text_rows], "bidirectional")
            match = model.match_logits(query_out)
            labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(match.device)
            valid = torch.cat([torch.ones(b, dtype=torch.bool, device=match.device), has_text, has_beh])
            # classes balanced: with two negatives per positive, "never a match" would otherwise be a cheap optimum
            balance = torch.where(labels == 1, 2.0, 1.0)[valid]
            out[m] = (F.cross_entropy(match[valid].float(), labels[valid], reduction="none") * balance).sum() / balance.sum()
            out[f"{m}_acc"] = (match[valid].argmax(1) == labels[valid]).float().mean().detach()
    if w_g:
        dec_ids = text_ids.clone()
        dec_ids[:, 0] = model.dec_token
        _, text_out = model.encode(side, dec_ids, text_pad, "causal")
        labels = text_ids[:, 1:].masked_fill(text_pad[:, 1:], -100)
        out[g] = F.cross_entropy(model.lm_logits(text_out[:, :-1]).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return out


@torch.no_grad()
def alignment_accuracy(
    model: QFormer, side_of, text_ids: torch.Tensor, text_pad: torch.Tensor, seed: int = 0, chunk: int = 256
) -> dict[str, float]:
    """Held-out alignment: contrastive retrieval top-1 among the held-out set (both directions, identical
    texts count as hits) with its chance level, and matching accuracy on positives vs random non-identical
    texts (chance 0.5). `side_of(rows)` gives the behaviour side of held-out rows."""
    n = len(text_ids)
    was_training = model.training
    model.eval()
    feats_b, feats_t = [], []
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n), device=text_ids.device)
        ids, pad = trim_text(text_ids[rows], text_pad[rows])
        q, t = model.encode(side_of(rows), ids, pad, "unimodal")
        feats_b.append(model.behavior_features(q))
        feats_t.append(model.text_features(t))
    sim = torch.einsum("iqc,jc->ijq", torch.cat(feats_b), torch.cat(feats_t)).amax(-1)  # (n, n)
    positives = same_text(text_ids)
    arange = torch.arange(n, device=text_ids.device)
    generator = torch.Generator().manual_seed(seed)
    weights = (~positives).float().cpu()
    has = weights.sum(1) > 0
    weights[~has] = 1.0
    negative = torch.multinomial(weights, 1, generator=generator).squeeze(1).to(text_ids.device)
    correct = []
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n), device=text_ids.device)
        for texts, label in ((rows, 1), (negative[rows], 0)):
            ids, pad = trim_text(text_ids[texts], text_pad[texts])
            q, _ = model.encode(side_of(rows), ids, pad, "bidirectional")
            keep = has[rows.cpu()].to(q.device) if label == 0 else torch.ones(len(rows), dtype=torch.bool, device=q.device)
            correct.append((model.match_logits(q).argmax(1) == label)[keep])
    model.train(was_training)
    return {
        "retrieval_top1": float(positives[arange, sim.argmax(1)].float().mean()),
        "retrieval_top1_text_to_behavior": float(positives[sim.argmax(0), arange].float().mean()),
        "retrieval_chance": float(positives.float().sum(1).mean() / n),
        "matching_acc": float(torch.cat(correct).float().mean()),
        "cases": n,
    }


def uniformity(x: torch.Tensor) -> torch.Tensor:
    """log mean exp(-2 |u_i - u_j|^2) over the pairs of unit vectors u = x / |x| (B, D): lower is more
    spread; about -4 for a uniform spread in high dimensions, 0 for a single point."""
    u = F.normalize(x.float(), dim=-1)
    return torch.pdist(u).pow(2).mul(-2).exp().mean().log()


def spread(vectors: np.ndarray) -> dict[str, float]:
    """How distinct the behaviours' vectors (N, D) are: the effective rank (exp of the entropy of the
    centered unit vectors' normalized squared singular values: D for an even spread, 1 for a line) and
    the mean pairwise cosine. Alignment can raise retrieval while collapsing the catalog onto a few
    directions (a coarse text category each), which phase II cannot undo with the Q-former frozen."""
    x = np.asarray(vectors, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    energy = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    p = energy / max(energy.sum(), 1e-12)
    n = len(x)
    mean = x.mean(0)
    mean_cos = (n * n * float(mean @ mean) - n) / max(n * (n - 1), 1)  # sum of all pairs minus the diagonal
    return {"effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())), "mean_cosine": mean_cos}


# -- training --------------------------------------------------------------------------------------
def _holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) split of range(n), both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(order[cut:]), np.sort(order[:cut])


class Phase1Task:
    """Phase I as a `training.loop.TrainingTask`: trains the adapter `build_adapter` makes (a Q-former)
    on the alignment tasks; validation is `select_metric` of the held-out alignment (`evaluate`)."""

    name = "phase I"
    find_unused_parameters = False  # never under DDP: phase I trains in one process (Phase1Trainer.train)

    def __init__(self, cfg: Phase1Config, features: BehaviorFeatures, windows: WindowSet | None, device: torch.device):
        self.cfg, self.device = cfg, device
        amp = device_info(device).amp_dtype if cfg.amp else None
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext
        torch.manual_seed(cfg.seed)
        windows = windows if windows is not None and len(windows) else None
        self.model = self.module = build_adapter(cfg.qformer, features, windows.texts if windows else []).to(device)
        self.train_behaviors, self.eval_behaviors = _holdout(features.num_behaviors, cfg.holdout_fraction, cfg.seed)
        self.windows = windows
        if windows is not None and isinstance(self.model, QFormer):
            self.train_windows, self.eval_windows = _holdout(len(windows), cfg.holdout_fraction, cfg.seed + 1)
            ids, pad = self.model.tokenizer(windows.texts)
            self.window_ids, self.window_pad = ids.to(device), pad.to(device)
            self.window_behaviors = torch.from_numpy(windows.behaviors).to(device)
            self.window_mask = torch.from_numpy(windows.mask).to(device)
        self.steps_per_epoch = max(1, -(-len(self.train_behaviors) // cfg.batch_size))
        self.steps_run = 0  # train steps taken by this process (seconds per step)

    def param_groups(self) -> list[dict]:
        """Weight decay on matrices only (not biases, norms, the temperature); BLIP-2's betas."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.cfg.weight_decay, "betas": (0.9, 0.98)},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "betas": (0.9, 0.98)},
        ]

    def epoch_batches(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(behaviours, windows) of each step: every training behaviour once, `batch_size` a step, and
        `window_batch_size` windows alongside (the training windows in a seeded order, repeated or cut
        to the epoch's steps); both orders a function of (seed, epoch)."""
        b, wb, steps = self.cfg.batch_size, self.cfg.window_batch_size, range(self.steps_per_epoch)
        rng = epoch_rng(self.cfg.seed, epoch)
        behaviors = self.train_behaviors[rng.permutation(len(self.train_behaviors))]
        if self.windows is None or not len(self.train_windows):
            return [(behaviors[s * b : (s + 1) * b], None) for s in steps]
        reps = -(-self.steps_per_epoch * wb // len(self.train_windows))
        windows = np.concatenate([self.train_windows[rng.permutation(len(self.train_windows))] for _ in range(reps)])
        return [(behaviors[s * b : (s + 1) * b], windows[s * wb : (s + 1) * wb]) for s in steps]

    def train_step(self, module: nn.Module, batch: tuple, epoch: int, step: int, rank: int) -> dict[str, torch.Tensor]:
        """The weighted sum of the tasks' losses, each loss and batch accuracy. The tasks call the
        adapter's methods (`self.model`, which `module` is: one process), not its forward."""
        torch.manual_seed(int(np.random.SeedSequence([self.cfg.seed, epoch, step, rank]).generate_state(1)[0]))  # dropout, negatives
        behaviors, windows = (None if x is None else torch.from_numpy(x).to(self.device) for x in batch)
        with self.autocast():
            out = self.losses(behaviors, windows)
            out["loss"] = self.total_loss(out)
        self.steps_run += 1
        out["cases"] = torch.tensor(float(len(behaviors)))
        out["positions"] = torch.tensor(float(len(behaviors) + (0 if windows is None else len(windows))))  # pairs aligned
        return out

    def validate(self) -> float:
        metrics = self.evaluate()
        if self.cfg.select_metric not in metrics:
            raise ValueError(f"Phase1Config.select_metric {self.cfg.select_metric!r}: not a held-out figure here (have {sorted(metrics)})")
        return metrics[self.cfg.select_metric]

    def weights_changed(self) -> None:
        """The adapter reads its weights live; nothing is cached across updates while training."""

    def losses(self, behaviors: torch.Tensor, windows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every task's loss (and batch accuracies) on one behaviour batch and one window batch."""
        w = self.cfg.loss_weights
        out: dict[str, torch.Tensor] = {}
        if (w.btc or w.btm or w.btg) and len(behaviors) > 1:
            ids, pad = self.model.descriptions(behaviors)
            out |= alignment_losses(
                self.model,
                self.model.behavior_side(behaviors),
                ids,
                pad,
                (w.btc, w.btm, w.btg),
                ("btc", "btm", "btg"),
                self.cfg.mining_temperature,
            )
        if w.spread and len(behaviors) > 1:
            out["spread"] = uniformity(self.model.unprojected(behaviors))
        if windows is not None and (w.stc or w.stm or w.stg) and len(windows) > 1:
            side = self.model.window_side(self.window_behaviors[windows], self.window_mask[windows])
            ids, pad = trim_text(self.window_ids[windows], self.window_pad[windows])
            out |= alignment_losses(self.model, side, ids, pad, (w.stc, w.stm, w.stg), ("stc", "stm", "stg"), self.cfg.mining_temperature)
        return out

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = dataclasses.asdict(self.cfg.loss_weights)
        return sum(weights[k] * v for k, v in losses.items() if k in weights and weights[k])

    def evaluate(self) -> dict[str, float]:
        """Alignment on held-out behaviours (btc/btm) and held-out windows (stc/stm)."""
        model, out = self.model, {}
        if len(self.eval_behaviors) > 1:
            held = torch.from_numpy(self.eval_behaviors).to(self.device)
            ids, pad = model.descriptions(held)
            acc = alignment_accuracy(model, lambda rows: model.behavior_side(held[rows]), ids, pad, self.cfg.seed)
            out |= {f"behavior_{k}": v for k, v in acc.items()}
        if self.windows is not None and len(self.eval_windows) > 1:
            held = torch.from_numpy(self.eval_windows).to(self.device)
            side_of = lambda rows: model.window_side(self.window_behaviors[held[rows]], self.window_mask[held[rows]])  # noqa: E731
            acc = alignment_accuracy(model, side_of, self.window_ids[held], self.window_pad[held], self.cfg.seed)
            out |= {f"window_{k}": v for k, v in acc.items()}
        # the whole catalog's b^F before the projection: what phase II starts from
        out |= {f"fused_{k}": v for k, v in spread(model.unprojected_all().float().cpu().numpy()).items()}
        return out


class Phase1Trainer:
    """Pretrains the adapter (`Phase1Task` on `training.loop.train_loop`) and writes the outputs; see the
    module docstring for them and for the checkpoint."""

    def __init__(self, cfg: Phase1Config, features: BehaviorFeatures, windows: WindowSet | None, out_dir: str | Path):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = select_device(cfg.device)
        self.task = Phase1Task(cfg, features, windows, self.device)

    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def train(self, resume: bool = True) -> dict:
        """Train (resuming from the checkpoint when there is one); write the outputs; return the summary.
        resume=False: a throw-away run (the benchmark's), no checkpoint read or written."""
        task, cfg = self.task, self.cfg
        if not isinstance(task.model, QFormer):
            log.info("variant %s has no Q-former: nothing to pretrain; writing its (untrained) projection", cfg.qformer.variant)
            return self._finish({"steps": 0, "best_epoch": -1, "train_seconds": 0.0, "history": []}, {})
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "phase I trains in one process (its tasks call the Q-former's methods, which DDP does not wrap): run it without torchrun"
            )
        folder = self.checkpoint_dir() if resume else None
        if folder is not None:
            self._check_config(folder)
        log.info(
            "phase I: %d behaviours (%d held out), %d windows, %d steps/epoch, %d epochs, max_steps %s, on %s",
            len(task.train_behaviors),
            len(task.eval_behaviors),
            len(task.windows) if task.windows else 0,
            task.steps_per_epoch,
            cfg.epochs,
            cfg.max_steps,
            self.device,
        )
        stats = train_loop(task, cfg, folder, self.device)
        # the kept epoch's training figures (none when max_steps stopped the first epoch) and the
        # held-out alignment of the weights written
        kept = next((h for h in stats["history"] if h["epoch"] == stats["best_epoch"]), {})
        return self._finish(stats, {k: v for k, v in kept.items() if k != "epoch"} | task.evaluate())

    def _check_config(self, folder: Path) -> None:
        """A checkpoint continues only the run of its own config (`checkpoint-config.json` beside it)."""
        path = self.out / "checkpoint-config.json"
        now = dataclasses.asdict(self.cfg)
        if has_training_state(folder) and path.exists():
            then = json.loads(path.read_text())
            changed = sorted(k for k in set(now) | set(then) if k not in RESUMABLE_CHANGES and now.get(k) != then.get(k))
            if changed:
                raise ValueError(
                    f"checkpoint {folder}: config differs in {changed}; resume with the same config or use a new output folder"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=1))

    def _finish(self, stats: dict, final: dict) -> dict:
        task = self.task
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {
            "variant": self.cfg.qformer.variant,
            "modalities_used": task.model.modalities_used,
            "steps": stats["steps"],
            "steps_per_epoch": task.steps_per_epoch,
            "seconds_per_step": stats["train_seconds"] / max(task.steps_run, 1),
            "device": str(self.device),
            "windows": len(task.windows) if task.windows else 0,
            "window_text": task.windows.source if task.windows else None,
            "best_epoch": stats["best_epoch"],
            "final": final,
            "history": stats["history"],
        }
        save_adapter(task.model, self.out, {"phase1_steps": stats["steps"]})
        np.save(self.out / "fused_embeddings.npy", task.model.fuse_all())
        (self.out / "metrics.json").write_text(json.dumps(summary, indent=2))
        log.info("phase I outputs in %s: %s", self.out, {k: v for k, v in summary.items() if k != "history"})
        return summary
