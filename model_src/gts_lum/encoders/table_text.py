"""The `text` table encoder: rows serialized as "column: value; ..." and embedded by a sentence encoder.

It needs no training and reads any table, so it is the default; its quality is the sentence encoder's
reading of the serialized row. The sentence encoder is any callable texts -> (N, D) float32; by default
the project's text encoder (`gts_lum.tokenizer.text_encoder.encode`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gts_lum.encoders.table_base import TableEncoder, TableEncoderConfig, TextFn
from gts_lum.tokenizer.text_encoder import encode


def default_text_encoder() -> TextFn:
    """The project's sentence encoder, for a `text` table encoder given none."""
    return encode


class TextTableEncoder(TableEncoder):
    kind = "text"

    def __init__(self, cfg: TableEncoderConfig, text_encoder: TextFn | None = None):
        super().__init__(cfg)
        self._text_encoder = text_encoder
        self._dim: int | None = None

    @property
    def text_encoder(self) -> TextFn:
        if self._text_encoder is None:
            self._text_encoder = default_text_encoder()
        return self._text_encoder

    @property
    def dim(self) -> int:
        if self._dim is None:  # the sentence encoder says its width only by encoding something
            self._dim = int(np.asarray(self.text_encoder(["dimension probe"])).shape[1])
        return self._dim

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        texts = self.texts(frame)
        out = np.asarray(self.text_encoder(texts), dtype=np.float32) if texts else np.zeros((0, self.dim), np.float32)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(f"text encoder returned shape {out.shape} for {len(texts)} texts; expected (N, D)")
        self._dim = out.shape[1]
        return out
