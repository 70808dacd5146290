"""fused_linear_distill_loss: the output layer and the loss by chunks of tokens, against the unfused composition.

The unfused composition materialises the logits `z = softcap(h W^T + b)` of both sides and calls the public
logit losses on them; the fused loss must give its value and the gradients of the student's hidden states,
weight and bias, on every backend ("torch": the chunked reference; "triton": the row kernels, in the interpreter
without a GPU), for every `loss`, with and without CE, bias, softcap, masked tokens, `num_items_in_batch`,
mismatched vocabularies and precomputed teacher logits. Also: no tensor of N x V elements is ever created
(a TorchDispatchMode records every tensor), torch.compile, validation, and the vocabulary mismatch of the
plain logit losses.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import compile_fullgraph, max_error
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd import functional as KF
from fastkd import fused_linear

N, H, H_T, V = 29, 12, 10, 41  # 29 tokens in chunks of 8: a last chunk of 5


def make(dtype=torch.float32, device="cpu", v_t=V, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    return dict(student_hidden=draw(N, H), student_weight=draw(V, H, scale=0.5),
                student_bias=draw(V) if bias else None, teacher_hidden=draw(N, H_T),
                teacher_weight=draw(v_t, H_T, scale=0.6), teacher_bias=draw(v_t) if bias else None,
                labels=labels.to(device))


def softcapped(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


def unfused(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, loss="forward_kl", beta=0.5,
            temperature=1.0, ignore_index=-100, ce_weight=0.0, kd_weight=1.0, student_bias=None, teacher_bias=None,
            teacher_logits=None, student_softcap=None, teacher_softcap=None, vocab_mismatch="error",
            num_items_in_batch=None, backend=None, **_):
    """The composition the fused loss must equal: materialised logits, the public logit losses, summed per token."""
    z_s = softcapped(F.linear(student_hidden, student_weight, student_bias), student_softcap)
    if teacher_logits is None:
        teacher_logits = softcapped(F.linear(teacher_hidden, teacher_weight, teacher_bias), teacher_softcap)
    z_t = teacher_logits.detach()
    options = dict(reduction="none", labels=labels, ignore_index=ignore_index, vocab_mismatch=vocab_mismatch,
                   backend=backend)
    if loss == "jsd":
        per_token = KF.jsd_loss(z_s, z_t, beta=beta, temperature=temperature, **options)
    else:
        direction = "reverse" if loss == "reverse_kl" else "forward"
        per_token = KF.kl_div_loss(z_s, z_t, temperature, direction=direction, **options)
        if loss == "kd":
            per_token = per_token * temperature ** 2
    keep = labels != ignore_index if labels is not None else torch.ones(per_token.shape, dtype=torch.bool)
    count = keep.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    total = kd_weight * per_token.sum() / count
    if ce_weight:
        ce = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index,
                             reduction="sum")
        total = total + ce_weight * ce / count
    return total


def value_and_grads(fn, inputs, **options):
    """The loss and the gradients of the student's hidden states, weight and bias (fresh leaves)."""
    leaves = {k: (v.detach().clone().requires_grad_(k.startswith("student")) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in inputs.items()}
    loss = fn(**leaves, **options)
    loss.backward()
    grads = [leaves[k].grad for k in ("student_hidden", "student_weight", "student_bias") if leaves.get(k) is not None]
    return [loss.detach()] + grads


def assert_same(got, want, rtol=2e-5, atol=1e-6):
    for what, g, w in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * max(1.0, w.abs().max().item()), msg=what)


CASES = {
    "plain": {},
    "ce": dict(ce_weight=0.4, kd_weight=0.6),
    "softcap": dict(student_softcap=3.0, teacher_softcap=4.0, ce_weight=0.2),
    "temperature": dict(temperature=2.0),
    "num_items": dict(num_items_in_batch=50, ce_weight=1.0),
    "no_bias": dict(bias=False),
    "no_labels": dict(labels=None),
}


@pytest.mark.parametrize("loss", fused_linear.LOSSES)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_unfused_composition(backend, device, loss, case):
    options = dict(CASES[case])
    inputs = make(device=device, bias=options.pop("bias", True))
    if "labels" in options:
        inputs["labels"] = options.pop("labels")
    options.update(loss=loss, beta=0.3, chunk_size=8, backend=backend)
    got = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    want = value_and_grads(unfused, inputs, **options)
    assert_same(got, want)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
@pytest.mark.parametrize("v_t", [V - 3, V + 5])
def test_vocabulary_mismatch(backend, device, loss, v_t):
    inputs = make(device=device, v_t=v_t)
    options = dict(loss=loss, ce_weight=0.5, vocab_mismatch="truncate", chunk_size=8, backend=backend)
    assert_same(value_and_grads(KF.fused_linear_distill_loss, inputs, **options),
                value_and_grads(unfused, inputs, **options))
    with pytest.raises(ValueError, match=f"student's vocabulary has {V} ids and the teacher's {v_t}.*vocab_mismatch"):
        KF.fused_linear_distill_loss(**inputs, backend=backend)


def test_precomputed_teacher_logits(backend, device):
    inputs = make(device=device)
    teacher_logits = F.linear(inputs.pop("teacher_hidden"), inputs.pop("teacher_weight"), inputs.pop("teacher_bias"))
    inputs.update(teacher_hidden=None, teacher_weight=None, teacher_logits=teacher_logits.reshape(N, V))
    options = dict(loss="reverse_kl", ce_weight=0.3, chunk_size=8, backend=backend)
    assert_same(value_and_grads(KF.fused_linear_distill_loss, inputs, **options),
                value_and_grads(unfused, inputs, **options))


def test_leading_dimensions_and_default_chunk(backend, device):
    # (batch, sequence, hidden) states, labels (batch, sequence); the default chunk covers all 29 tokens here.
    inputs = make(device=device)
    for key in ("student_hidden", "teacher_hidden"):
        inputs[key] = inputs[key][:28].reshape(4, 7, -1)
    inputs["labels"] = inputs["labels"][:28].reshape(4, 7)
    options = dict(loss="jsd", ce_weight=0.5, backend=backend)
    assert_same(value_and_grads(KF.fused_linear_distill_loss, inputs, **options),
                value_and_grads(unfused, inputs, **options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_16_bit_within_twice_the_unfused_error(backend, device, dtype, loss):
    # The tolerance rule: against the float64 composition, the fused loss errs at most about twice as much as the
    # unfused composition in the same dtype (slack: one rounding of each result to the input dtype).
    inputs = make(dtype=dtype, device=device)
    options = dict(loss=loss, ce_weight=0.3, student_softcap=5.0, chunk_size=8, backend=backend)
    got = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    plain = value_and_grads(unfused, inputs, **options)
    exact = value_and_grads(unfused, {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                      for k, v in inputs.items()}, **{**options, "backend": "torch"})
    unit = torch.finfo(dtype).eps
    for what, g, p, e in zip(("loss", "d hidden", "d weight", "d bias"), got, plain, exact):
        assert g.dtype == p.dtype, what
        slack = unit * e.abs().max().item()
        assert max_error(g, e) <= 2 * max_error(p, e) + slack, (what, max_error(g, e), max_error(p, e))


class TensorSizes(TorchDispatchMode):
    """The number of elements of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("loss", ["kd", "jsd"])
def test_no_tensor_holds_the_logits(backend, device, loss):
    inputs = make(device=device)
    leaves = {k: (v.detach().clone().requires_grad_(k.startswith("student")) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in inputs.items()}
    with TensorSizes() as mode:
        KF.fused_linear_distill_loss(**leaves, loss=loss, ce_weight=0.5, student_softcap=4.0, chunk_size=8,
                                     backend=backend).backward()
    biggest = max(mode.sizes)
    assert biggest[0] < N * V, biggest  # the largest is the weight's gradient (V x H) or a chunk's logits
    assert max(size for size, _ in mode.sizes) <= max(V * H, 8 * V, N * H)


def test_compiled_equals_eager(backend, device):
    inputs = make(device=device)
    options = dict(loss="kd", ce_weight=0.5, temperature=2.0, chunk_size=8, backend=backend)
    eager = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    compiled_fn = compile_fullgraph(lambda **kw: KF.fused_linear_distill_loss(**kw))
    assert_same(value_and_grads(compiled_fn, inputs, **options), eager, rtol=1e-6)


def test_teacher_gets_no_gradient_and_second_backward_raises():
    inputs = make()
    inputs["teacher_weight"].requires_grad_()
    loss = KF.fused_linear_distill_loss(**{**inputs, "student_weight": inputs["student_weight"].requires_grad_()},
                                        backend="torch")
    loss.backward(retain_graph=True)
    assert inputs["teacher_weight"].grad is None
    with pytest.raises(RuntimeError, match="once-differentiable"):
        loss.backward()


def test_grad_output_scales_the_gradients():
    inputs = make()
    once = value_and_grads(KF.fused_linear_distill_loss, inputs, backend="torch")
    leaves = {k: (v.detach().clone().requires_grad_(k.startswith("student")) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in inputs.items()}
    (0.25 * KF.fused_linear_distill_loss(**leaves, backend="torch")).backward()
    torch.testing.assert_close(leaves["student_weight"].grad, 0.25 * once[2])


def test_default_chunk_size():
    assert fused_linear.default_chunk_size(8192, 4096, 128256) == 256
    assert fused_linear.default_chunk_size(8192, 4096, 32000) == 1024
    assert fused_linear.default_chunk_size(100, 64, 50) == 128
    assert fused_linear.default_chunk_size(1, 4096, 128256) == 1


def test_validation_names_the_argument():
    inputs = make()
    with pytest.raises(ValueError, match="loss must be one of"):
        KF.fused_linear_distill_loss(**inputs, loss="kl")
    with pytest.raises(ValueError, match=r"student_weight must be \(vocabulary, hidden\)"):
        KF.fused_linear_distill_loss(**{**inputs, "student_weight": inputs["student_weight"].t()})
    with pytest.raises(ValueError, match="the teacher is missing"):
        KF.fused_linear_distill_loss(**{**inputs, "teacher_weight": None})
    with pytest.raises(ValueError, match="not both"):
        KF.fused_linear_distill_loss(**inputs, teacher_logits=torch.randn(N, V))
    with pytest.raises(ValueError, match="ce_weight=0.5 needs labels"):
        KF.fused_linear_distill_loss(**{**inputs, "labels": None}, ce_weight=0.5)
    with pytest.raises(ValueError, match=r"labels holds token ids outside \[0, 41\)"):
        KF.fused_linear_distill_loss(**{**inputs, "labels": torch.full((N,), V)})
    with pytest.raises(TypeError, match="tensor \\(learnable\\) temperature"):
        KF.fused_linear_distill_loss(**inputs, temperature=torch.tensor(2.0))
    with pytest.raises(ValueError, match="student_softcap must be positive"):
        KF.fused_linear_distill_loss(**inputs, student_softcap=-1.0)
    with pytest.raises(ValueError, match="num_items_in_batch must be a positive number"):
        KF.fused_linear_distill_loss(**inputs, num_items_in_batch=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        KF.fused_linear_distill_loss(**inputs, chunk_size=0)
    with pytest.raises(TypeError, match="student_weight .* and student_hidden .* must have the same dtype"):
        KF.fused_linear_distill_loss(**{**inputs, "student_weight": inputs["student_weight"].double()})


# --- the vocabulary mismatch of the plain logit losses ---------------------------------------------------------

LOGIT_LOSSES = {
    "kd": lambda s, t, b, **kw: KF.kd_loss(s, t, 2.0, target=torch.arange(s.shape[0]) % 7, ce_weight=0.3,
                                           backend=b, **kw),
    "kl": lambda s, t, b, **kw: KF.kl_div_loss(s, t, 1.5, direction="reverse", backend=b, **kw),
    "jsd": lambda s, t, b, **kw: KF.jsd_loss(s, t, beta=0.4, backend=b, **kw),
    "dkd": lambda s, t, b, **kw: KF.dkd_loss(s, t, torch.arange(s.shape[0]) % 7, backend=b, **kw),
}


@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
@pytest.mark.parametrize("teacher_vocab", [9, 15])
def test_logit_losses_truncate_a_mismatched_vocabulary(backend, device, name, teacher_vocab):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 12, generator=g).to(device).requires_grad_()
    t = torch.randn(6, teacher_vocab, generator=g).to(device)
    fn = LOGIT_LOSSES[name]
    with pytest.raises(ValueError, match=f"student's vocabulary has 12 ids and the teacher's {teacher_vocab}"):
        fn(s, t, backend)
    got = fn(s, t, backend, vocab_mismatch="truncate")
    got.backward()
    shared = min(12, teacher_vocab)
    s2 = s.detach().clone().requires_grad_()
    if name == "kd":  # the CE term over the student's whole vocabulary, the KL over the shared ids
        want = (KF.kd_loss(s2[:, :shared], t[:, :shared], 2.0, backend=backend)
                + 0.3 * F.cross_entropy(s2, torch.arange(6, device=device) % 7))
    else:
        want = fn(s2[:, :shared], t[:, :shared], backend)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(s.grad, s2.grad)


# --- the CUDA C++ row kernels behind the fused loss, in the CPU stand-in ------------------------------------------

@pytest.fixture(scope="module")
def standin_losses():
    from fastkd.cuda import standin
    if standin.unavailable_reason() is not None:
        pytest.skip(f"cannot build the CUDA stand-in: {standin.unavailable_reason()}")
    return standin.losses(standin.build())


@pytest.mark.parametrize("loss", ["kd", "reverse_kl", "jsd"])
def test_cuda_device_code_in_the_standin(standin_losses, loss):
    # The CUDA C++ kernels' device code run on CPU threads (fastkd.cuda.standin), as the "cuda" backend's rows.
    inputs = make(v_t=V + 2)
    options = dict(loss=loss, ce_weight=0.5, student_softcap=4.0, vocab_mismatch="truncate", chunk_size=16)
    got = value_and_grads(lambda **kw: standin_losses["fused_linear_distill_loss"](**kw), inputs, **options)
    want = value_and_grads(unfused, inputs, **options, backend="torch")
    assert_same(got, want)
