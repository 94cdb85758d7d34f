"""Figures for the Kubeflow UI and BENCHMARKS.md: a training curve and Qini curves, as PNG bytes or a
self-contained HTML page (the PNG inline)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from gts_lum.evaluation.uplift import qini_coefficient, qini_curve


def training_curve_html(history: list[dict], title: str) -> str:
    """Loss terms and the validation metric per epoch, from a model's fit `history` (one dict per epoch)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pipeline step
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    losses = sorted({k for h in history for k in h if k in ("loss", "agnostic", "aware")})
    valid = sorted({k for h in history for k in h if k.startswith("valid_")})
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in losses:
        ax_loss.plot(epochs, [h.get(key) for h in history], marker="o", label=key)
    ax_loss.set_xlabel("epoch"), ax_loss.set_title("training loss"), ax_loss.legend()
    for key in valid:
        ax_valid.plot(epochs, [h.get(key) for h in history], marker="o", label=key.removeprefix("valid_"))
    ax_valid.set_xlabel("epoch"), ax_valid.set_title("validation"), ax_valid.legend()
    fig.suptitle(title)
    return as_html(_png(fig), title)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def as_html(png: bytes, title: str) -> str:
    """A PNG as a self-contained page (what a KFP HTML artifact shows)."""
    data = base64.b64encode(png).decode()
    return f'<html><body><h3>{html.escape(title)}</h3><img src="data:image/png;base64,{data}"/></body></html>'


def qini_png(curves: dict[str, np.ndarray], y: np.ndarray, treatment: np.ndarray, title: str) -> bytes:
    """Qini curves of several uplift scorings of the same users ({name: (N,) uplift score}) + random targeting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, score in curves.items():
        x, q = qini_curve(score, y, treatment)
        ax.plot(x, q, label=f"{name} (Qini {qini_coefficient(score, y, treatment):+.4f})")
    x, q = qini_curve(np.zeros(len(y)), y, treatment)  # one tie block: the straight line of random targeting
    ax.plot(x, q, linestyle="--", color="grey", label="random")
    ax.set_xlabel("fraction of users targeted (highest uplift first)"), ax.set_ylabel("incremental responders / treated users")
    ax.set_title(title), ax.legend(fontsize=8)
    return _png(fig)
