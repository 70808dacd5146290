"""fastkd's reference on CPU tensors against the plain PyTorch formula: `python -m bench.cpu_reference`.

A CPU user runs the reference (backend "auto" on CPU tensors), so it should cost nothing over the formula
they would write themselves. For KL, JSD and KD on (4, 512, 32000) logits in bfloat16 and float32, this
prints the median seconds of one forward + backward, the peak memory of that pass above its inputs, and the
bytes autograd saves for the backward pass (beyond the inputs), for both, with 1 thread and the default
thread count. The plain formulas upcast to float32 first, as the reference computes:

- KL: `F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1), log_target=True,
  reduction="batchmean")`, the reference's `kl_div_loss` (T = 1);
- KD: RepDistiller's `F.kl_div(F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1),
  reduction="batchmean") * T * T`, the reference's `kd_loss` (T = 4);
- JSD: TRL's `generalized_jsd_loss` (logsumexp of the two weighted log-probabilities), beta 0.5.

Each measurement runs in a fresh process: its peak resident memory (`ru_maxrss`) less its resident memory
just before the pass is the pass's peak. The student needs a gradient, the teacher does not. The time is the
best of `--reps` passes in each of `--rounds` processes, the reference's and the formula's alternating: on a
machine shared with other work the least disturbed pass is the closest to the pass's own cost.
Options: `--shape 4x512x32000`, `--losses kl,jsd,kd`, `--dtypes bfloat16,float32`, `--threads 1,0`
(0: torch's default), `--reps 3`, `--rounds 2`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
LOSSES = ("kl", "jsd", "kd")
KD_TEMPERATURE = 4.0
JSD_BETA = 0.5


def plain(loss: str):
    """The formula a user writes, computing in float32; rows are flattened so that batchmean is per token."""
    def rows(x):
        return x.reshape(-1, x.shape[-1]).float()

    if loss == "kl":
        return lambda s, t: F.kl_div(F.log_softmax(rows(s), -1), F.log_softmax(rows(t), -1), log_target=True,
                                     reduction="batchmean")
    if loss == "kd":
        T = KD_TEMPERATURE
        return lambda s, t: F.kl_div(F.log_softmax(rows(s) / T, -1), F.softmax(rows(t) / T, -1),
                                     reduction="batchmean") * (T * T)

    def jsd(s, t):
        log_s, log_t = F.log_softmax(rows(s), -1), F.log_softmax(rows(t), -1)
        beta = torch.tensor(JSD_BETA)
        mixture = torch.logsumexp(torch.stack([log_s + torch.log(1 - beta), log_t + torch.log(beta)]), dim=0)
        kl_t = F.kl_div(mixture, log_t, reduction="none", log_target=True)
        kl_s = F.kl_div(mixture, log_s, reduction="none", log_target=True)
        return (beta * kl_t + (1 - beta) * kl_s).sum() / log_s.shape[0]
    return jsd


def reference(loss: str):
    from fastkd import reference as R
    if loss == "kl":
        return lambda s, t: R.kl_div_loss(s, t)
    if loss == "kd":
        return lambda s, t: R.kd_loss(s, t, KD_TEMPERATURE)
    return lambda s, t: R.jsd_loss(s, t, beta=JSD_BETA)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    t = torch.randn(shape, generator=g, dtype=dtype)
    return s, t


def saved_bytes(fn, s, t) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass, the inputs' own left out."""
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    storages = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(s, t)
    del loss
    return sum(storages.values())


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(impl: str, loss: str, shape, dtype: str, threads: int, reps: int) -> dict:
    """Peak memory of the first forward + backward, then the times of `reps` more."""
    if threads:
        torch.set_num_threads(threads)
    fn = (reference if impl == "reference" else plain)(loss)
    s, t = inputs(shape, DTYPES[dtype])
    before = resident_bytes()
    fn(s, t).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is in KiB on Linux
    times = []
    for _ in range(reps):
        s.grad = None
        start = time.perf_counter()
        fn(s, t).backward()
        times.append(time.perf_counter() - start)
    s.grad = None
    return {"seconds": times, "peak_mb": peak / 2**20,
            "saved_mb": saved_bytes(fn, s, t) / 2**20, "threads": torch.get_num_threads()}


def measure(impl, loss, shape, dtype, threads, reps) -> dict:
    """`measure_one` in a fresh process, so that its peak memory is this pass's alone."""
    cmd = [sys.executable, "-m", "bench.cpu_reference", "--one", impl, "--losses", loss,
           "--shape", "x".join(map(str, shape)), "--dtypes", dtype, "--threads", str(threads), "--reps", str(reps)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _list(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4x512x32000")
    p.add_argument("--losses", type=_list, default=list(LOSSES))
    p.add_argument("--dtypes", type=_list, default=["bfloat16", "float32"])
    p.add_argument("--threads", type=_list, default=["1", "0"], help="thread counts; 0 is torch's default")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    p.add_argument("--one", choices=("reference", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split("x"))
    bad = [x for x in args.losses if x not in LOSSES] + [x for x in args.dtypes if x not in DTYPES]
    if bad:
        p.error(f"unknown {bad}; losses {LOSSES}, dtypes {tuple(DTYPES)}")
    if args.one:
        print(json.dumps(measure_one(args.one, args.losses[0], shape, args.dtypes[0], int(args.threads[0]),
                                     args.reps)))
        return 0

    print(f"fwd+bwd on CPU, shape {args.shape}, best of {args.reps} x {args.rounds}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; memory in MB above the inputs (peak; saved for the backward pass)")
    print(f"{'threads':>7} {'loss':<4} {'dtype':<9} {'reference s':>11} {'plain s':>8} {'ratio':>6} "
          f"{'ref peak':>9} {'plain peak':>10} {'ref saved':>9} {'plain saved':>11}")
    for threads in (int(x) for x in args.threads):
        for loss in args.losses:
            for dtype in args.dtypes:
                runs = {"reference": [], "plain": []}
                for _ in range(args.rounds):
                    for impl in runs:
                        runs[impl].append(measure(impl, loss, shape, dtype, threads, args.reps))
                ref, base = runs["reference"][0], runs["plain"][0]
                ref_s, base_s = (min(t for run in runs[impl] for t in run["seconds"]) for impl in runs)
                print(f"{ref['threads']:>7} {loss:<4} {dtype:<9} {ref_s:>11.4g} {base_s:>8.4g} {ref_s / base_s:>6.2f} "
                      f"{ref['peak_mb']:>9.0f} {base['peak_mb']:>10.0f} {ref['saved_mb']:>9.0f} "
                      f"{base['saved_mb']:>11.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
