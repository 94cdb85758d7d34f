"""Figures for the Kubeflow UI: a training curve as a self-contained HTML page (an inline PNG)."""

from __future__ import annotations

import base64
import html
import io


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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    return f'<html><body><h3>{html.escape(title)}</h3><img src="data:image/png;base64,{png}"/></body></html>'
