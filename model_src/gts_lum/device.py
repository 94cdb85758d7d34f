"""Device selection: Ascend NPU, then CUDA, then CPU. The only place in the project that picks a device.

`torch_npu` registers the `npu` device with torch, but importing it without the Ascend (CANN)
libraries fails - and on some versions breaks `import torch` for the whole process. So it is imported
here, lazily, only when an NPU may be wanted and only if it is installed at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "npu", "cuda", "cpu")


@dataclass(frozen=True)
class DeviceInfo:
    """What the rest of the stack needs to know about a device."""

    device: torch.device
    kind: str  # "npu" | "cuda" | "cpu"
    dist_backend: str  # torch.distributed backend: "hccl" | "nccl" | "gloo"
    amp_dtype: torch.dtype | None  # autocast dtype; None = plain fp32 (bf16 matmul on CPU is ~200x slower)


_INFO = {
    "npu": ("hccl", torch.bfloat16),
    "cuda": ("nccl", torch.bfloat16),
    "cpu": ("gloo", None),
}


def _npu_device() -> torch.device | None:
    """The first NPU if torch_npu is installed, imports cleanly and sees a device; else None."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:  # a missing Ascend library surfaces as ImportError, OSError or RuntimeError
        log.warning("torch_npu is installed but failed to import (%s: %s); falling back to CUDA/CPU", type(exc).__name__, exc)
        return None
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        log.info("torch_npu imported but no NPU is visible")
        return None
    index = local_device_index(npu.device_count())
    npu.set_device(index)
    return torch.device("npu", index)


def local_device_index(count: int) -> int:
    """This process's accelerator: `LOCAL_RANK` (set by torchrun per process on a node), 0 when unset.

    Every DDP process on device 0 is what NCCL/HCCL reject ("duplicate GPU"); one device per process."""
    raw = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(raw)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={raw!r}: expected a non-negative integer") from None
    if not 0 <= rank < max(count, 1):
        raise ValueError(
            f"LOCAL_RANK={rank} but this node has {count} device(s): start at most {count} processes per node (torchrun --nproc-per-node)"
        )
    return rank


def select_device(prefer: str = "auto") -> torch.device:
    """Pick the device to run on.

    `prefer`: "auto" (NPU, else CUDA, else CPU), "npu" or "cuda" (that kind, falling back in the same
    order with a warning when it is unavailable), or "cpu". Under torchrun each process takes the
    accelerator of its `LOCAL_RANK` (see `local_device_index`).
    """
    if prefer not in PREFERENCES:
        raise ValueError(f"device preference {prefer!r}: expected one of {PREFERENCES}")
    if prefer in ("npu", "auto"):
        npu = _npu_device()
        if npu is not None:
            log.info("device: %s", npu)
            return npu
        if prefer == "npu":
            log.warning("NPU requested but not available; falling back to CUDA/CPU")
    if prefer in ("npu", "cuda", "auto"):
        if torch.cuda.is_available():
            index = local_device_index(torch.cuda.device_count())
            torch.cuda.set_device(index)
            log.info("device: cuda:%d (%s)", index, torch.cuda.get_device_name(index))
            return torch.device("cuda", index)
        if prefer != "auto":
            log.warning("%s requested but CUDA is not available either; using CPU", prefer.upper())
    log.info("device: cpu")
    return torch.device("cpu")


def device_info(device: torch.device) -> DeviceInfo:
    """Distributed backend and autocast dtype for a device that `select_device` returned."""
    kind = device.type
    if kind not in _INFO:
        raise ValueError(f"device {device}: unsupported kind {kind!r}; expected one of {sorted(_INFO)}")
    backend, amp = _INFO[kind]
    return DeviceInfo(device=device, kind=kind, dist_backend=backend, amp_dtype=amp)
