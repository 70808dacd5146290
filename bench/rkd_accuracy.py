"""RKD accuracy on the batches training produces: `python -m bench.rkd_accuracy [--standin]`.

For near-duplicate rows (relative gaps 1e-2 to 1e-5, student or teacher side), tight clusters and a large
common offset, prints each kernel backend's error against the float64 reference beside eager float32's (the
reference run in float32): loss value relative, gradient relative to its largest entry. The tolerance rule
asks for at most twice eager's error (or 8 roundings, 8 * 2^-24, where eager is more accurate than that).

Backends: "triton" (on a GPU, else in Triton's interpreter when TRITON_INTERPRET=1 is set), "cuda" with a GPU,
and with `--standin` the CUDA C++ kernels' device code on the CPU (fastkd.cuda.standin: compiles csrc/ with
g++ the first time, a minute or two).
"""
from __future__ import annotations

import argparse

import torch

import fastkd
from fastkd import functional as KF
from fastkd import reference

FLOOR = 8 * 2.0 ** -24
LOSSES = ("rkd_loss", "rkd_angle_loss", "rkd_distance_loss")


def features(*shape, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64) + offset).float()


def near_duplicates(gap, side, seed, B=18, D=64):
    """Four rows `gap` (relative to the row norm) from four others, on the student or the teacher side."""
    s, t = features(B, D, seed=seed), features(B, D, seed=seed + 1)
    x = s if side == "student" else t
    for a in range(4):
        x[B - 1 - a] = x[a] + gap * x[a].norm() / D ** 0.5 * features(D, seed=seed + 10 + a)
    return s, t


def clusters(noise, seed, B=20, D=64):
    """Four clusters of five copies each plus `noise`, on both sides."""
    s = features(4, D, seed=seed).repeat_interleave(5, 0)[:B] + noise * features(B, D, seed=seed + 1)
    t = features(4, D, seed=seed + 2).repeat_interleave(5, 0)[:B] + noise * features(B, D, seed=seed + 3)
    return s, t


def cases():
    out = {f"student rows {g:g} apart": near_duplicates(g, "student", 100 + i) for i, g in
           enumerate((1e-2, 1e-3, 1e-4, 1e-5))}
    out.update({f"teacher rows {g:g} apart": near_duplicates(g, "teacher", 200 + i) for i, g in
                enumerate((1e-3, 1e-5))})
    out["clusters, 0.05 noise"] = clusters(0.05, 7)
    out["clusters, 1e-3 noise"] = clusters(1e-3, 8)
    out["offset 1e3"] = (features(16, 64, seed=3) + 1e3, features(16, 64, seed=4) - 1e3)
    return out


def value_and_grad(fn, s, t):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t)
    loss.backward()
    return loss.detach().double(), s.grad.double()


def errors(got, exact):
    (v, g), (v64, g64) = got, exact
    return (abs(v - v64) / abs(v64)).item(), ((g - g64).abs().max() / g64.abs().max()).item()


def standin_losses():
    from fastkd.cuda import standin
    return standin.losses(standin.build("fastkd_standin_rkd", only=["rkd.cu"]))  # a build of its own: RKD only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rkd_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--standin", action="store_true", help="also the CUDA kernels in the CPU stand-in")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, from " + ", ".join(LOSSES))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = {}
    statuses = fastkd.available_backends()
    for name in ("triton", "cuda"):
        if statuses[name].available:
            backends[name] = lambda loss, name=name: (lambda s, t: getattr(KF, loss)(s, t, backend=name))
    if args.standin:
        standin = standin_losses()
        backends["cuda (stand-in)"] = lambda loss: standin[loss]
    print(f"device {device}; error against float64 as value / gradient, eager float32 in parentheses; "
          f"'!' marks a miss of the tolerance rule")
    misses = 0
    for case, (s, t) in cases().items():
        s, t = s.to(device), t.to(device)
        for loss in args.losses.split(","):
            exact = value_and_grad(getattr(reference, loss), s.double(), t.double())
            eager = errors(value_and_grad(getattr(reference, loss), s, t), exact)
            cells = []
            for name, make in backends.items():
                err = errors(value_and_grad(make(loss), s, t), exact)
                miss = any(e > 2 * max(r, FLOOR) for e, r in zip(err, eager))
                misses += miss
                cells.append(f"{name} {err[0]:.1e} / {err[1]:.1e}{' !' if miss else ''}")
            print(f"{case:26s} {loss:18s} (eager {eager[0]:.1e} / {eager[1]:.1e})  " + "  ".join(cells))
    print(f"{misses} misses")
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
