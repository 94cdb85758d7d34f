import logging
import sys

import pytest
import torch

from gts_lum.device import device_info, local_device_index, select_device


def test_cpu_preference_gives_cpu_with_fp32_and_gloo():
    device = select_device("cpu")
    assert device == torch.device("cpu")
    info = device_info(device)
    assert (info.kind, info.dist_backend, info.amp_dtype) == ("cpu", "gloo", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
@pytest.mark.parametrize("prefer", ["auto", "cuda", "npu"])
def test_falls_back_to_cpu_without_accelerators(prefer):
    assert select_device(prefer) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_broken_torch_npu_is_caught_and_falls_back(tmp_path, monkeypatch, caplog):
    # A torch_npu that is installed but cannot load its Ascend libraries, as on a machine without CANN.
    (tmp_path / "torch_npu.py").write_text("raise ImportError('libascendcl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with caplog.at_level(logging.WARNING, logger="gts_lum.device"):
        device = select_device("npu")
    assert device == torch.device("cpu")
    assert "torch_npu is installed but failed to import" in caplog.text
    assert "libascendcl.so" in caplog.text
    assert "torch_npu" not in sys.modules


def test_cpu_preference_never_imports_torch_npu(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "torch_npu.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('no CANN')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert select_device("cpu") == torch.device("cpu")
    assert not marker.exists()
    select_device("auto")  # the same fake module is found and imported when an NPU may be wanted
    assert marker.exists()


def test_accelerator_kinds_use_their_backend_and_bf16():
    assert device_info(torch.device("cuda", 0)).dist_backend == "nccl"
    assert device_info(torch.device("cuda", 0)).amp_dtype == torch.bfloat16


def test_bad_preference_and_device_are_named():
    with pytest.raises(ValueError, match="'gpu'"):
        select_device("gpu")
    with pytest.raises(ValueError, match="meta"):
        device_info(torch.device("meta"))


def test_each_torchrun_process_takes_the_accelerator_of_its_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_device_index(4) == 0  # launched alone
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device_index(4) == 3
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but this node has 2 device"):
        local_device_index(2)
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match="'first'"):
        local_device_index(2)
