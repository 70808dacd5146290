"""The run: for each case, check every peer against the reference, then time the ones that agree.

A peer is timed only after it computed the same loss and student gradient as fastkd's reference on the
same inputs: a fast wrong answer is recorded as "mismatch: <error>", never as a time. Every failure
(unavailable, OOM, an exception) becomes a row's status, so one case cannot stop the run; rows are
appended after each case, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import contextlib
import itertools
import time

import torch

from . import peers as peers_mod
from . import results, timing, traffic
from .cases import PASSES, Case, shape_label

# Relative tolerances per input dtype, for the loss (relative to |loss|) and the gradient (max abs error
# relative to max |grad|). float32 leaves room for TF32 matrix products in the RKD kernels; 16-bit
# inputs give 16-bit gradients (bf16 keeps 8 bits: 2^-8 = 0.4% of the largest entry per element).
TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 2e-2}
L2_BYTES = 50 * 2**20   # an input set smaller than this sits in a Hopper L2: rotate among several
ROTATE_SETS = 4


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float32, a chunk of rows at a time (an N x V float32 copy may not fit)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    step = max(1, (1 << 26) // max(1, a.shape[1]))
    return max(float((a[i:i + step].float() - b[i:i + step].float()).abs().max())
               for i in range(0, a.shape[0], step))


def _max_abs(a: torch.Tensor) -> float:
    return _max_abs_diff(a, torch.zeros_like(a[:1]).expand_as(a))


def grad_leaves(inputs) -> list:
    """The inputs that need a gradient: the student (logit losses, RKD, AT), or the student's hidden states and
    output weight (fused cases)."""
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def loss_and_grad(fn, inputs):
    """(loss, gradient of each input that needs one, in order): the student's, or for the fused cases
    (dh_s, dW_s)."""
    leaves = grad_leaves(inputs)
    for x in leaves:
        x.grad = None
    loss = fn(*inputs)
    loss.backward()
    grads = []
    for x in leaves:
        grads.append(x.grad)
        x.grad = None
    return (float(loss.detach().float()), *grads)


def disagreement(ref, got) -> float:
    """The larger of the loss's relative error and each gradient's max error relative to its largest entry
    (`ref` and `got` as `loss_and_grad` returns them; a gradient missing on one side is an infinite error)."""
    ref_loss, *ref_grads = ref
    loss, *grads = got
    loss_err = abs(loss - ref_loss) / max(abs(ref_loss), 1e-6)
    if not (loss_err == loss_err) or len(grads) != len(ref_grads):  # NaN, or a gradient missing
        return float("inf")
    worst = loss_err
    for grad, ref_grad in zip(grads, ref_grads):
        if grad is None or ref_grad is None:
            return float("inf")
        grad_err = _max_abs_diff(grad, ref_grad) / max(_max_abs(ref_grad), 1e-30)
        worst = max(worst, grad_err if grad_err == grad_err else float("inf"))
    return worst


# fastkd's kernel losses make the gradient in the forward pass and scale it in place in the backward, so a
# graph cannot be backpropagated twice (retain_graph=True); the error they raise then says so.
ONCE_DIFFERENTIABLE = "once-differentiable"
DERIVED_BWD = "ok (bwd = fwd+bwd - fwd: the graph cannot be backpropagated twice)"


def _derived_bwd_ms(fn, sets, students, device, quick):
    """A backward pass that cannot be replayed, timed as a whole step less its forward pass."""
    order = itertools.cycle(range(len(sets)))
    fwd = timing.median_ms(lambda: fn(*sets[next(order)]), device, quick=quick)
    step = timing.median_ms(lambda: fn(*sets[next(order)]).backward(), device, grad_to_none=students, quick=quick)
    return max(step - fwd, 0.0)


def time_pass(fn, sets, pass_, device, quick):
    """(median ms, peak MB above the inputs, status) of one pass, rotating among the input sets."""
    students = [x for inputs in sets for x in grad_leaves(inputs)]  # their .grad reset before each call
    status = "ok"
    order = itertools.cycle(range(len(sets)))
    if pass_ in ("fwd", "fwd-nograd"):
        # "fwd": autograd on and the student requiring a gradient, as in training (fastkd's kernels write the
        # student's gradient here); "fwd-nograd": under torch.no_grad(), as in inference (no gradient written).
        def call():
            fn(*sets[next(order)])
        with torch.no_grad() if pass_ == "fwd-nograd" else contextlib.nullcontext():
            ms = timing.median_ms(call, device, quick=quick)
            base = timing.allocated(device)
            peak = timing.peak_mb_above(base, lambda: fn(*sets[0]), device)
    elif pass_ == "bwd":
        # One graph per input set, kept (retain_graph) so the same backward runs again and again.
        losses = [fn(*inputs) for inputs in sets]

        def call():
            losses[next(order)].backward(retain_graph=True)
        try:
            ms = timing.median_ms(call, device, grad_to_none=students, quick=quick)
        except RuntimeError as err:
            if ONCE_DIFFERENTIABLE not in str(err):
                raise
            ms, status = _derived_bwd_ms(fn, sets, students, device, quick), DERIVED_BWD
        del losses, call
        for s in students:
            s.grad = None
        base = timing.allocated(device)
        loss = fn(*sets[0])   # the forward graph counts: it is what the backward pass holds
        peak = timing.peak_mb_above(base, loss.backward, device)
        del loss
    elif pass_ == "fwd+bwd":
        def call():
            fn(*sets[next(order)]).backward()
        ms = timing.median_ms(call, device, grad_to_none=students, quick=quick)
        for s in students:
            s.grad = None
        base = timing.allocated(device)
        peak = timing.peak_mb_above(base, lambda: fn(*sets[0]).backward(), device)
    else:
        raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
    for s in students:
        s.grad = None
    return ms, peak, status


def run_case(case: Case, peers, passes, device, quick, env, copy_gbps, log=print, mm_tflops=None) -> list[dict]:
    rows = []
    tol = TOLERANCE[case.dtype]

    def add(peer, pass_, status, ms=None, peak=None, err=None):
        min_bytes = case.min_bytes(pass_)
        gbps = min_bytes / (ms * 1e-3) / 1e9 if ms else None
        # Fused cases: the matrix-product FLOPs this peer runs in this pass (cases.FLOPS_SPLIT), their rate, and
        # its share of the device's measured matmul rate (none for a pass that runs no product, e.g. fastkd's bwd).
        flops = case.flops(pass_, peer)
        tflops = flops / (ms * 1e-3) / 1e12 if ms and flops else None
        # fastkd's own kernels: the bytes their design moves (bench/traffic.py), and the share of copy bandwidth
        # that is at this time (none for a pass that moves no N x V bytes, e.g. bwd at grad_output 1).
        path = case.path_bytes(peer, pass_) if peer in peers_mod.FASTKD_BACKENDS else None
        path_gbps = path / (ms * 1e-3) / 1e9 if ms and path else None
        rows.append({**env, "loss": case.loss.name, "shape": shape_label(case.shape), "dtype": case.dtype,
                     "peer": peer, "pass": pass_, "median_ms": ms, "peak_mb": peak, "min_bytes": min_bytes,
                     "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps if gbps else None,
                     "copy_gbps": copy_gbps, "max_err": err, "status": status, "path_bytes": path,
                     "pct_path": 100 * path_gbps / copy_gbps if path_gbps else None,
                     "flops": flops, "tflops": tflops,
                     "pct_mm": 100 * tflops / mm_tflops if tflops and mm_tflops else None,
                     "mm_tflops": mm_tflops if flops is not None else None})

    def all_passes(peer, status, err=None):
        for p in passes:
            add(peer, p, status, err=err)
        log(f"  {peer:8s} {status}")

    torch._dynamo.reset()  # a fresh compile cache per case: no recompile limit, no stale guards
    try:
        n_sets = ROTATE_SETS if case.input_bytes() < L2_BYTES else 1
        sets = [case.make_inputs(device, seed=i) for i in range(2 if quick else n_sets)]
    except Exception as err:
        if not timing.is_oom(err):
            raise
        timing.free_memory(device)
        for peer in peers:
            all_passes(peer, "OOM (inputs)")
        return rows

    # The reference answer, at full size if it fits, else on the first rows (which is still a check). It is the
    # eager peer itself, except for the fused cases: the unfused composition in float32 (bench/peers.py).
    eager = peers_mod.build("eager", case, device)
    reference = eager if not case.fused else peers_mod.reference_fn(case, device)
    check_inputs, note = sets[0], ""
    try:
        ref = loss_and_grad(reference, check_inputs)
    except Exception as err:
        if not timing.is_oom(err):
            raise
        timing.free_memory(device)
        check_inputs = case.check_slice(sets[0])
        note = f" (checked on the first {check_inputs[0].shape[0]} rows: the reference OOMs at full size)"
        ref = loss_and_grad(reference, check_inputs)

    for peer in peers:
        try:
            fn = eager if peer == "eager" else peers_mod.build(peer, case, device, quick)
        except peers_mod.Unavailable as why:
            all_passes(peer, f"unavailable: {why}")
            continue
        try:
            err = disagreement(ref, loss_and_grad(fn, check_inputs))
        except Exception as exc:
            timing.free_memory(device)
            all_passes(peer, "OOM" if timing.is_oom(exc) else f"error: {type(exc).__name__}: {_short(exc)}")
            continue
        if not err <= tol:
            all_passes(peer, f"mismatch: max error {err:.3g} > {tol:g}", err)
            continue
        times = []
        for pass_ in passes:
            try:
                ms, peak, status = time_pass(fn, sets, pass_, device, quick)
            except Exception as exc:
                timing.free_memory(device)
                status = "OOM" if timing.is_oom(exc) else f"error: {type(exc).__name__}: {_short(exc)}"
                add(peer, pass_, status, err=err)
                times.append(f"{pass_} {status}")
                continue
            add(peer, pass_, status + note, ms, peak, err)
            times.append(f"{pass_} {ms:.4g} ms" + (f" {peak:.0f} MB" if peak is not None else ""))
        log(f"  {peer:8s} " + "  ".join(times) + f"  (max err {err:.2g})")
        timing.free_memory(device)
    del sets, ref, check_inputs
    timing.free_memory(device)
    return rows


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def done_cases(out, env) -> set:
    """(loss, shape, dtype) already measured in `out` on this device at this commit: --resume skips them."""
    try:
        rows = results.read_rows(out)
    except FileNotFoundError:
        return set()
    return {(r["loss"], r["shape"], r["dtype"]) for r in rows
            if r["device"] == env["device"] and r["commit"] == env["commit"] and r["mode"] == env["mode"]}


def run(cases, peers, passes, device, quick, out, resume=False, budget_min=None, log=print) -> list[dict]:
    """Run the cases, appending rows to `out` after each; returns every row written."""
    env = results.environment(device, "quick" if quick else "full")
    copy_gbps = timing.copy_bandwidth_gbps(device, quick=quick)
    # The matmul rate the fused cases' FLOP rates are a share of: measured once, and only when one runs.
    mm_tflops = timing.matmul_tflops(device, quick=quick) if any(c.fused for c in cases) else None
    log(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda'] or '-'} | "
        f"commit {env['commit']}")
    log(f"fastkd backends: {peers_mod.backend_summary()}")
    if mm_tflops:
        log(f"matmul rate (fused cases' roofline): {mm_tflops:.1f} TFLOP/s ({timing.matmul_note(device)})")
    log(f"copy bandwidth: {copy_gbps:.1f} GB/s | {len(cases)} cases x peers {', '.join(peers)} x passes "
        f"{', '.join(passes)} -> {out}")
    log("passes: fwd-nograd = forward under torch.no_grad(); fwd = forward with the student requiring a gradient "
        "(fastkd's kernels write it there); bwd = the backward alone; fwd+bwd = forward then loss.backward()")
    skip = done_cases(out, env) if resume else set()
    start, written = time.monotonic(), []
    for i, case in enumerate(cases, 1):
        if (case.loss.name, shape_label(case.shape), case.dtype) in skip:
            log(f"[{i}/{len(cases)}] {case.label}: already in {out} for this device and commit, skipped")
            continue
        if budget_min is not None and time.monotonic() - start > 60 * budget_min:
            log(f"time budget of {budget_min} min spent: stopping before {case.label}; "
                f"run again with --resume to go on")
            break
        log(f"[{i}/{len(cases)}] {case.label}" + traffic.progress_note(case, passes, peers))
        rows = run_case(case, peers, passes, device, quick, env, copy_gbps, log, mm_tflops=mm_tflops)
        results.append_rows(out, rows)
        written.extend(rows)
    return written
