"""Backend selection: the table of implementations, FASTKD_BACKEND, "auto", and the float64 fallback."""
import functools
import types

import pytest
import torch

import fastkd
from fastkd import _dispatch, kernel_losses
from fastkd import functional as KF


def test_available_backends_reports_every_backend_with_a_reason():
    statuses = fastkd.available_backends()
    assert list(statuses) == ["torch", "triton", "cuda"]
    assert statuses["torch"].available
    for status in statuses.values():
        assert status.reason


def test_every_public_loss_has_a_reference_and_every_kernel_loss_a_public_function():
    names = set(fastkd.reference.IMPLEMENTATIONS)
    # fused_linear_distill_terms: the fused loss with its two terms, for fastkd.compat.liger's soft/hard losses
    assert names <= set(KF.__all__) | {"fused_linear_distill_terms"}
    assert set(kernel_losses.LOSSES) <= names


def test_default_backend_reads_the_environment(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert fastkd.default_backend() == "auto"
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert fastkd.default_backend() == "torch"


class RecordingKernels:
    """A stand-in kernel set: kd_loss's one operator, `kl_rows`, run by the reference's maths, calls recorded."""

    def __init__(self):
        self.calls = []

    def kl_rows(self, student, teacher, temperature, temperature_rows, reverse, target, labels, ignore_index,
                kl_weight, ce_weight, student_grad, teacher_grad, temperature_grad):
        self.calls.append((temperature, temperature_rows, reverse, target, labels, ignore_index))
        assert not (student_grad or teacher_grad or temperature_grad), "these inputs need no gradient"
        kl = fastkd.reference.kd_loss(student, teacher, temperature, reduction="none") / temperature ** 2
        empty = student.new_empty(0)
        return kl.float().reshape(-1), empty, empty, empty, empty


@pytest.fixture
def fake_triton(monkeypatch):
    """A Triton backend that is present everywhere, with recorded kernels."""
    kernels = RecordingKernels()
    module = types.SimpleNamespace(unavailable_reason=lambda device: None, KERNELS=kernels)
    monkeypatch.setitem(_dispatch._modules, "triton", module)
    return kernels.calls


def test_a_named_kernel_backend_runs_the_kernel_loss_on_its_kernels(fake_triton):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(KF.kd_loss(s, t, 2.0, backend="triton"), fastkd.reference.kd_loss(s, t, 2.0))
    assert fake_triton == [(2.0, None, False, None, None, -100)]
    impl = _dispatch.resolve("kd_loss", "triton", s, t)
    assert isinstance(impl, functools.partial) and impl.func is kernel_losses.kd_loss


def test_auto_uses_the_reference_on_cpu_and_kernels_on_cuda(fake_triton):
    cpu = torch.empty(2, 3)
    assert _dispatch.resolve("kd_loss", "auto", cpu) is fastkd.reference.kd_loss
    cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # no GPU needed to resolve
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
        assert _dispatch.resolve("kd_loss", "auto", cuda).func is kernel_losses.kd_loss
        assert _dispatch.resolve("cc_loss", "auto", cuda) is fastkd.reference.cc_loss


def test_float64_inputs_run_the_reference_whatever_the_backend(fake_triton):
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert _dispatch.resolve("kd_loss", "triton", s, t) is fastkd.reference.kd_loss
    assert _dispatch.resolve("kd_loss", "triton", s.float(), t) is fastkd.reference.kd_loss
    KF.kd_loss(s, t, backend="triton")
    assert fake_triton == []


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
