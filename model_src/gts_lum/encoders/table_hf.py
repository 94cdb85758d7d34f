"""The `hf` table encoder: any local Hugging Face causal LM reads serialized rows (TableGPT2 in production).

A row embedding is the mean of the last hidden states over the row's real tokens (padding masked out),
so a row gets the same embedding whatever it is batched with. Rows are sorted by length before batching
to waste little compute on padding. fp32 on CPU; the device's amp dtype (bf16) on NPU/CUDA. The model is
loaded on first use, only from the local folder (`local_files_only`): nothing is ever downloaded.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gts_lum.device import device_info, select_device
from gts_lum.encoders.table_base import TableEncoder, TableEncoderConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTableEncoder(TableEncoder):
    kind = "hf"

    def __init__(self, cfg: TableEncoderConfig):
        super().__init__(cfg)
        if not cfg.hf.model_path:
            raise ValueError("TableEncoderConfig.hf.model_path: the `hf` table encoder needs a local model folder")
        if cfg.hf.dtype != "auto" and cfg.hf.dtype not in DTYPES:
            raise ValueError(f"TableEncoderConfig.hf.dtype: {cfg.hf.dtype!r} is not 'auto' or one of {sorted(DTYPES)}")
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        hf = self.cfg.hf
        device = select_device(hf.device)
        dtype = (device_info(device).amp_dtype or torch.float32) if hf.dtype == "auto" else DTYPES[hf.dtype]
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("hf table encoder: %s on CPU is very slow; using float32", dtype)
            dtype = torch.float32
        tokenizer = AutoTokenizer.from_pretrained(hf.model_path, local_files_only=True)
        if tokenizer.pad_token is None:  # causal LMs often ship without one; padding is masked out anyway
            if tokenizer.eos_token is None and tokenizer.unk_token is None:
                raise ValueError(f"{hf.model_path}: tokenizer has no pad, eos or unk token to pad batches with")
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        # Right padding keeps every real token at its true position (positions count from the first token).
        tokenizer.padding_side = "right"
        model = AutoModel.from_pretrained(hf.model_path, local_files_only=True, dtype=dtype).to(device).eval()
        log.info("hf table encoder: %s on %s (%s), hidden size %d", hf.model_path, device, dtype, model.config.hidden_size)
        self._tokenizer, self._model = tokenizer, model

    @property
    def dim(self) -> int:
        if self._model is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.cfg.hf.model_path, local_files_only=True)
            return int(getattr(config, "hidden_size", None) or config.get_text_config().hidden_size)
        return int(self._model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        texts = self.texts(frame)
        if self._model is None:
            self._load()
        hf = self.cfg.hf
        out = np.zeros((len(texts), self.dim), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch together
        starts = range(0, len(texts), hf.batch_size)
        for start in tqdm(starts, desc="hf table encoder", unit="batch", disable=not hf.progress or len(starts) < 2):
            rows = order[start : start + hf.batch_size]
            batch = self._tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=hf.max_length, return_tensors="pt"
            ).to(self._model.device)
            hidden = self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
            out[rows] = pooled.float().cpu().numpy()
        return out
