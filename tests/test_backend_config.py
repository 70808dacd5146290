"""The kernel backends' configuration, on any machine: the CUDA C++ extension's build settings, and each kernel
backend saying why it cannot run where it cannot.

CI compiles and links the CUDA extension on a machine without a GPU (tests/test_cuda_build.py, which .ci/run
enables). The kernels themselves are tested per loss (tests/test_kd.py, test_jsd.py, test_dkd.py, test_rkd.py,
test_attention.py: `backend="cuda"` runs with a GPU, and is skipped without one).
"""
import pytest
import torch

import fastkd
import fastkd.cuda
import fastkd.triton as fkt
from fastkd import functional as KF
from fastkd.cuda import build


def test_every_listed_source_exists():
    sources = build.sources()
    assert [s.name for s in sources][0] == "ops.cpp"
    for source in sources:
        assert source.is_file(), source


def test_architectures_follow_the_override(monkeypatch):
    monkeypatch.setenv("FASTKD_CUDA_ARCH", "8.0;9.0")
    assert build.architectures() == ["8.0", "9.0"]
    assert build.gencode_flags(["8.0", "9.0"]) == [
        "-DFASTKD_ARCHS=sm80_sm90", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def test_cpu_tensors_say_why():
    assert "run on CUDA tensors" in fastkd.cuda.unavailable_reason(torch.device("cpu"))
    with pytest.raises(fastkd.BackendUnavailableError, match="CUDA tensors"):
        KF.rkd_loss(torch.randn(3, 4), torch.randn(3, 4), backend="cuda")


def test_auto_never_compiles(monkeypatch):
    # Without a prebuilt fastkd._C, "auto" must not start a compiler: the extension reports "not built".
    monkeypatch.setattr(fastkd.cuda, "_loaded", False)
    reason = fastkd.cuda.unavailable_reason(torch.device("cuda"), build=False) if torch.version.cuda else None
    if reason is not None:
        assert "not built" in reason or "CPU-only" in reason


def test_triton_cpu_tensors_without_the_interpreter_say_why(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(fkt, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in fkt.unavailable_reason(torch.device("cpu"))
    with pytest.raises(fastkd.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        KF.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="triton")
