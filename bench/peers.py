"""Who is measured: each peer turns a case into a callable `f(*inputs) -> loss`, or says why it cannot.

- "eager": fastkd's reference, the plain PyTorch a user writes today;
- "compile": `torch.compile` of that reference (Inductor fuses it: the strongest generic peer);
- "liger": Liger-Kernel where it has the same loss (it takes log-probabilities, so `log_softmax` comes first);
- "triton", "cuda": fastkd's backends, called through the public functions as a user would.

The fused linear + distillation cases (`fused_jsd`, `fused_kl`; inputs `(h_s, W_s, h_t, W_t, labels)`):
- "eager": the unfused composition a user writes today: `F.linear` for each side's logits (`BT x V`, in the
  inputs' dtype), then fastkd's reference loss on them (`fastkd.reference.jsd_loss` / `kl_div_loss`, plain
  PyTorch computing in float32), autograd for the gradients;
- "compile": `torch.compile` of that composition;
- "liger": `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta)`,
  beta 0.5 for fused_jsd and 0 (forward KL in Liger 0.8's convention) for fused_kl;
- "triton", "cuda": `fastkd.functional.fused_linear_distill_loss(..., backend=peer)`.
The check's reference (`reference_fn`) is the eager composition on the inputs cast to float32 (logits, loss and
gradients in float32), not the eager peer: that one rounds its logits to bfloat16.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

import fastkd
from fastkd import functional, reference
from fastkd._dispatch import BackendUnavailableError, resolve

PEERS = ("eager", "compile", "liger", "triton", "cuda")
FASTKD_BACKENDS = ("triton", "cuda")


class Unavailable(Exception):
    """This peer cannot run this case here; the message says why (it goes into the row's status)."""


def build(peer: str, case, device, quick: bool = False):
    """A callable for `peer` on `case`, or `Unavailable`."""
    loss = case.loss
    if case.fused:
        return _fused(peer, case, device, quick)
    if peer == "eager":
        return functools.partial(reference.IMPLEMENTATIONS[loss.op], **loss.kwargs)
    if peer == "compile":
        if quick and torch.device(device).type == "cpu":
            raise Unavailable("skipped in --quick on CPU (Inductor's C++ compile takes longer than the run; "
                              "ask for it with --peers compile)")
        # A fresh wrapper per case; the caller resets dynamo between cases, so no recompile limit is hit.
        return torch.compile(functools.partial(reference.IMPLEMENTATIONS[loss.op], **loss.kwargs), dynamic=False)
    if peer == "liger":
        return _liger(case, device)
    if peer in FASTKD_BACKENDS:
        try:
            # resolve() takes the loss's input tensors (their device and dtype decide); an empty float32
            # tensor on the case's device stands for them.
            resolve(loss.op, peer, torch.empty(0, device=device))
        except BackendUnavailableError as err:
            raise Unavailable(str(err)) from None
        return functools.partial(getattr(functional, loss.op), backend=peer, **loss.kwargs)
    raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")


def reference_fn(case, device):
    """What the check compares every peer with: the eager peer, except for the fused cases (module docstring)."""
    if case.fused:
        return functools.partial(_upcast, functools.partial(unfused, **case.loss.kwargs))
    return build("eager", case, device)


def unfused(h_s, w_s, h_t, w_t, labels, *, loss, beta=0.5, temperature=1.0, ignore_index=-100):
    """The fused cases' unfused composition: both sides' logits by `F.linear`, then fastkd's reference loss on
    them (the eager peer; under torch.compile, the compile peer)."""
    z_s, z_t = F.linear(h_s, w_s), F.linear(h_t, w_t)
    if loss == "jsd":
        return reference.jsd_loss(z_s, z_t, beta=beta, temperature=temperature, labels=labels,
                                  ignore_index=ignore_index)
    if loss in ("forward_kl", "reverse_kl"):
        return reference.kl_div_loss(z_s, z_t, temperature, direction=loss.removesuffix("_kl"), labels=labels,
                                     ignore_index=ignore_index)
    raise ValueError(f"no unfused composition for loss={loss!r}")


def _upcast(fn, h_s, w_s, h_t, w_t, labels):
    """`fn` on the float inputs cast to float32 (the gradients flow back to the inputs in their own dtype)."""
    return fn(h_s.float(), w_s.float(), h_t.float(), w_t.float(), labels)


def _fused(peer, case, device, quick):
    kwargs = case.loss.kwargs
    if peer == "eager":
        return functools.partial(unfused, **kwargs)
    if peer == "compile":
        if quick and torch.device(device).type == "cpu":
            raise Unavailable("skipped in --quick on CPU (Inductor's C++ compile takes longer than the run)")
        return torch.compile(functools.partial(unfused, **kwargs), dynamic=False)
    if peer == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise Unavailable("liger-kernel not installed")
        if torch.device(device).type != "cuda":
            raise Unavailable("liger-kernel's chunked loss is measured on CUDA only (on a CPU it would time "
                              "Inductor's C++ code)")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except Exception as err:  # a broken install, or a version without the chunked JSD loss
            raise Unavailable(f"importing liger_kernel.chunked_loss.LigerFusedLinearJSDLoss failed: {err}") from None
        return liger_fused(case, LigerFusedLinearJSDLoss)
    if peer in FASTKD_BACKENDS:
        try:
            resolve(case.loss.op, peer, torch.empty(0, device=device))
        except BackendUnavailableError as err:
            raise Unavailable(str(err)) from None
        return functools.partial(functional.fused_linear_distill_loss, backend=peer, **kwargs)
    raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")


def liger_fused(case, loss_class):
    """`loss_class` (Liger's `LigerFusedLinearJSDLoss`, or fastkd.compat.liger's drop-in of it, which the tests
    use to check this wiring without Liger) set up to compute the case's loss: the pure distillation term
    (weight_hard_loss 0, weight_soft_loss 1), over every token (none is ignore_index) / their count, T = 1.
    Liger's beta: 0.5 is the symmetric JSD in every version; 0 is the forward KL `KL(p_t || p_s)` in Liger 0.8
    (older versions mixed the other way round: the check would then say mismatch)."""
    kwargs = case.loss.kwargs
    if kwargs["loss"] == "jsd":
        beta = kwargs.get("beta", 0.5)
    elif kwargs["loss"] == "forward_kl":
        beta = 0.0
    else:
        raise Unavailable(f"no Liger chunked loss set up for loss={kwargs['loss']!r}")
    module = loss_class(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, ignore_index=-100,
                        temperature=1.0)

    def liger_fused_jsd(h_s, w_s, h_t, w_t, labels):
        # Biases passed positionally: some Liger versions have no default for them.
        out = module(h_s, w_s, h_t, w_t, labels, None, None)
        return out[0] if isinstance(out, tuple) else out  # return_soft_hard_loss=True: (loss, soft, hard)
    return liger_fused_jsd


def liger_version() -> str:
    if importlib.util.find_spec("liger_kernel") is None:
        return ""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return "unknown"


def _liger(case, device):
    """Liger-Kernel's equivalent of the case's loss, wired so that it computes the same number.

    Liger's losses take log-probabilities (student first, teacher second) and apply no T^2:
    - kd, kl_forward: `LigerKLDIVLoss(reduction="batchmean", log_target=True)(log q_s, log p_t)` is
      `KL(p_t || q_s)` averaged over rows; kd multiplies by T^2 itself.
    - jsd, kl_reverse: `LigerJSD(beta)(log q_s, log p_t)` mixes `M = beta * p_t + (1 - beta) * q_s` and
      weighs `KL(p_t || M)` by beta, so its beta is TRL's and fastkd's; beta 1 is `KL(q_s || p_t)`, the
      reverse KL (LigerKLDIVLoss gives no gradient through its target, so it cannot do reverse KL).
    `log_softmax` runs in the input dtype, as a bf16 training script would call it; the correctness check
    decides whether that is close enough.
    """
    name = case.loss.name
    if name not in ("kd", "kl_forward", "kl_reverse", "jsd"):
        raise Unavailable(f"liger-kernel has no {case.loss.op} equivalent")
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger-kernel not installed")
    if torch.device(device).type != "cuda" and not _interpreting():
        raise Unavailable("liger-kernel runs Triton kernels on CUDA tensors (on CPU only under TRITON_INTERPRET=1)")
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception as err:  # a broken install must not stop the run
        raise Unavailable(f"importing liger-kernel failed: {err}") from None
    temperature = case.loss.kwargs.get("temperature", 1.0)
    if name in ("kd", "kl_forward"):
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        scale = temperature * temperature if name == "kd" else 1.0

        def liger_kl(s, t):
            log_q = torch.log_softmax(s / temperature if temperature != 1.0 else s, dim=-1)
            log_p = torch.log_softmax(t / temperature if temperature != 1.0 else t, dim=-1)
            loss = kl(log_q, log_p)
            return loss * scale if scale != 1.0 else loss
        return liger_kl
    jsd = LigerJSD(beta=1.0 if name == "kl_reverse" else case.loss.kwargs["beta"])

    def liger_jsd(s, t):
        return jsd(torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1))
    return liger_jsd


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_summary() -> str:
    """One line: which fastkd backends this machine has, for the run's header."""
    return ", ".join(f"{name}: {'yes' if st.available else 'no (' + st.reason + ')'}"
                     for name, st in fastkd.available_backends().items())
