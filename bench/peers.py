"""Who is measured: each peer turns a case into a callable `f(*inputs) -> loss`, or says why it cannot.

- "eager": fastkd's reference, the plain PyTorch a user writes today;
- "compile": `torch.compile` of that reference (Inductor fuses it: the strongest generic peer);
- "liger": Liger-Kernel where it has the same loss (it takes log-probabilities, so `log_softmax` comes first);
- "triton", "cuda": fastkd's backends, called through the public functions as a user would.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

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
