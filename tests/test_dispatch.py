"""Backend selection: the registry, FASTKD_BACKEND, "auto", and a kernel backend plugging in per loss."""
import types

import pytest
import torch

import fastkd
from fastkd import _dispatch
from fastkd import functional as KF


def test_available_backends_reports_every_backend_with_a_reason():
    statuses = fastkd.available_backends()
    assert list(statuses) == ["torch", "triton", "cuda"]
    assert statuses["torch"].available
    for status in statuses.values():
        assert status.reason


def test_every_public_loss_has_a_reference():
    for op, impls in _dispatch._registry.items():
        assert "torch" in impls, op


def test_default_backend_reads_the_environment(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert fastkd.default_backend() == "auto"
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert fastkd.default_backend() == "torch"


@pytest.fixture
def fake_triton(monkeypatch):
    """A kernel backend that is present and has a kernel for kd_loss only, recording its calls."""
    calls = []
    module = types.SimpleNamespace(unavailable_reason=lambda device: None)
    monkeypatch.setitem(_dispatch._modules, "triton", module)
    monkeypatch.setitem(_dispatch._registry, "kd_loss", dict(_dispatch._registry["kd_loss"]))

    def kernel(student_logits, teacher_logits, temperature, **options):
        calls.append(options)
        return fastkd.reference.kd_loss(student_logits, teacher_logits, temperature, **options)

    _dispatch.register("kd_loss", "triton", kernel)
    return calls


def test_kernel_backend_plugs_in_per_loss(fake_triton):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    expected = fastkd.reference.kd_loss(s, t, 2.0)
    torch.testing.assert_close(KF.kd_loss(s, t, 2.0, backend="triton"), expected)
    assert fake_triton == [dict(reduction="batchmean", target=None, ce_weight=0.0, kd_weight=1.0)]


def test_auto_uses_the_reference_on_cpu_and_kernels_on_cuda(fake_triton):
    assert _dispatch.resolve("kd_loss", "auto", torch.device("cpu")) is fastkd.reference.kd_loss
    assert _dispatch.resolve("kd_loss", "auto", torch.device("cuda")) is not fastkd.reference.kd_loss
    assert _dispatch.resolve("cc_loss", "auto", torch.device("cuda")) is fastkd.reference.cc_loss


def test_environment_variable_picks_the_backend(fake_triton, monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    KF.kd_loss(torch.randn(2, 3), torch.randn(2, 3))
    assert len(fake_triton) == 1
    KF.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="torch")
    assert len(fake_triton) == 1


def test_missing_backend_says_why():
    with pytest.raises(fastkd.BackendUnavailableError, match="run on CUDA tensors, not cpu tensors"):
        KF.jsd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_backend_without_a_kernel_for_the_loss_says_so(fake_triton):
    with pytest.raises(fastkd.BackendUnavailableError, match="backend 'triton' has no kernel for cc_loss"):
        KF.cc_loss(torch.randn(3, 4), torch.randn(3, 4), backend="triton")
