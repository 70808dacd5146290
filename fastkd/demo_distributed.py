"""Distillation on torch.distributed, by example, and checked against one process doing the same steps.

    torchrun --nproc-per-node 2 -m fastkd.demo_distributed tp    # vocabulary-parallel output layers
    torchrun --nproc-per-node 2 -m fastkd.demo_distributed ddp   # DDP with relational KD over the global batch

On CPUs the ranks talk over gloo, on GPUs over NCCL (one GPU per rank, `LOCAL_RANK`). Each mode takes a few
seconds on two CPU cores.

tp: a tiny causal language model on synthetic tokens (an embedding and a GRU: the "body") whose output layer is
split by vocabulary: rank r holds rows [start, end) of the `V x H` weight, as Megatron's ColumnParallelLinear
with gather_output=False. A fixed teacher is split the same way. Every rank runs the whole body on the same
tokens and calls `fused_linear_distill_loss(..., process_group=group)` with its rows: the loss is that of the
whole vocabulary, only a few numbers per token cross the network, and the loss all-reduces the gradient of the
hidden states itself, so the body's gradient is complete on every rank and its copies stay equal without any
other communication (no DDP here: every rank holds the same tokens).

ddp: a small MLP student and a fixed MLP teacher on synthetic features; each rank holds its own samples, the
student is wrapped in DDP, and `rkd_loss(..., process_group=group)` computes the relations over the samples of
every rank. Its backward hands each rank W times its samples' share of the global loss's gradient, which DDP's
averaging over the W ranks divides back: a DDP step is a single-process step on the concatenated batch.

After training, rank 0 replays the same steps in one process without a process group, from the same
initialization and batches, and prints whether the losses and parameters agree; the demo exits 1 if they do
not.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .functional import fused_linear_distill_loss, rkd_loss

MODES = ("tp", "ddp")
SEED = 0
# A rank that never arrives (a crashed peer, a wrong MASTER_PORT) raises after this instead of hanging.
TIMEOUT = timedelta(seconds=60)
# float32 on both sides; the sums run in another order when split across ranks, so the runs agree to rounding,
# not bit for bit: each step's loss to about 1e-6, the parameters after training to 1e-5 or so of their scale
# (Adam's steps are about the learning rate whatever the gradient's size, so rounding drifts a little each step).
LOSS_TOLERANCE = 1e-5
PARAM_TOLERANCE = 1e-3
MATCH_LINE = "matches the single-process run"

# tp: the language model
VOCAB = 256  # divisible by 2, 4 and 8 ranks: equal slices, no vocab_range needed
CONTEXT = 32
BATCH = 8
STUDENT_WIDTH = 32
TEACHER_WIDTH = 64
TP_STEPS = 40
TP_LR = 3e-2
CE_WEIGHT = 0.1
KD_WEIGHT = 0.9

# ddp: relational KD
FEATURES_IN = 32
STUDENT_FEATURES = 16
TEACHER_FEATURES = 64
BATCH_PER_RANK = 32
DDP_STEPS = 30
DDP_LR = 0.05

LOG_EVERY = 10


def log(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def take_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, losses: list[float], step: int,
              logged: bool) -> None:
    """One optimizer step on `loss`, its value kept in `losses` (and printed every LOG_EVERY steps if `logged`)."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if logged and (step % LOG_EVERY == 0 or step == 1):
        log(f"step {step:3d}  loss {loss.item():.6f}")


def setup() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...); this rank's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("fastkd.demo_distributed runs under torchrun, one process per rank, e.g.\n"
                         "    torchrun --nproc-per-node 2 -m fastkd.demo_distributed tp")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible) and "
                             f"NCCL needs one per rank: start at most that many ranks per node, or run on the "
                             f"CPU (gloo) with CUDA_VISIBLE_DEVICES=")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        device = torch.device("cpu")
        # Two ranks on two cores: a second intra-op thread per rank only adds contention.
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


# --- tp: vocabulary-parallel output layers -----------------------------------------------------------------

class Body(nn.Module):
    """Token ids `(B, L)` to hidden states `(B, L, H)`, causal (a GRU reads left to right)."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.GRU(width, width, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.embed(tokens))[0]


def language_models() -> tuple[Body, torch.Tensor, Body, torch.Tensor]:
    """The student's body and whole `V x H` output weight, then the teacher's, from the demo's seed (every rank
    and the single-process replay build the same ones; a real run would initialise only its own rows)."""
    torch.manual_seed(SEED)
    student, teacher = Body(STUDENT_WIDTH), Body(TEACHER_WIDTH)
    student_out = nn.Linear(STUDENT_WIDTH, VOCAB, bias=False).weight.detach()
    # A teacher sharper than its random initialisation, so there is something to learn.
    teacher_out = 8.0 * nn.Linear(TEACHER_WIDTH, VOCAB, bias=False).weight.detach()
    teacher.requires_grad_(False)
    return student, student_out, teacher, teacher_out


def token_batches(steps: int) -> list[torch.Tensor]:
    """Synthetic sequences, the same on every rank (tensor parallelism splits the model, not the data)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=generator) for _ in range(steps)]


def train_lm(body: Body, out_weight: nn.Parameter, teacher: Body, teacher_weight: torch.Tensor,
             batches: list[torch.Tensor], device: torch.device, group=None) -> list[float]:
    """Next-token KD (0.9 forward KL to the teacher + 0.1 CE on the labels), with `out_weight` this rank's rows
    of the output layer under `group`, or the whole layer without one. The code is the same either way."""
    optimizer = torch.optim.Adam(list(body.parameters()) + [out_weight], lr=TP_LR)
    losses = []
    for step, batch in enumerate(batches, 1):
        batch = batch.to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]  # labels: global token ids, on every rank
        with torch.no_grad():
            teacher_hidden = teacher(inputs)
        loss = fused_linear_distill_loss(body(inputs), out_weight, teacher_hidden, teacher_weight, labels,
                                         loss="forward_kl", ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT,
                                         process_group=group)
        take_step(optimizer, loss, losses, step, logged=group is not None)
    return losses


def tensor_parallel(device: torch.device) -> bool:
    world, rank = dist.get_world_size(), dist.get_rank()
    if VOCAB % world:
        raise SystemExit(f"tp splits the vocabulary of {VOCAB} into equal slices: use a world size dividing it, "
                         f"got {world}")
    rows = VOCAB // world
    start, end = rank * rows, (rank + 1) * rows
    log(f"tp: {world} ranks ({dist.get_backend()}), vocabulary {VOCAB} split into slices of {rows}; "
        f"student {STUDENT_WIDTH} wide, teacher {TEACHER_WIDTH}; {TP_STEPS} steps of {BATCH}x{CONTEXT} tokens")
    body, student_out, teacher, teacher_out = language_models()
    body, teacher = body.to(device), teacher.to(device)
    # This rank's rows of each output layer: the only part of the model that differs between ranks.
    out_slice = nn.Parameter(student_out[start:end].clone().to(device))
    teacher_slice = teacher_out[start:end].to(device)
    batches = token_batches(TP_STEPS)
    losses = train_lm(body, out_slice, teacher, teacher_slice, batches, device, group=dist.group.WORLD)

    # The whole trained output layer, for rank 0's comparison: slices in rank order.
    slices = [torch.empty_like(out_slice.detach()) for _ in range(world)]
    dist.all_gather(slices, out_slice.detach().contiguous())
    trained = {name: p.detach().cpu() for name, p in body.named_parameters()}
    trained["output.weight"] = torch.cat(slices).cpu()
    if rank != 0:
        return True

    body, student_out, teacher, teacher_out = language_models()
    body, teacher = body.to(device), teacher.to(device)
    out_weight = nn.Parameter(student_out.clone().to(device))
    single = train_lm(body, out_weight, teacher, teacher_out.to(device), batches, device)
    replayed = {name: p.detach().cpu() for name, p in body.named_parameters()}
    replayed["output.weight"] = out_weight.detach().cpu()
    return compare(losses, single, trained, replayed)


# --- ddp: global-batch relational KD -------------------------------------------------------------------------

def feature_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(SEED)
    student = nn.Sequential(nn.Linear(FEATURES_IN, 64), nn.ReLU(), nn.Linear(64, STUDENT_FEATURES))
    teacher = nn.Sequential(nn.Linear(FEATURES_IN, 128), nn.Tanh(), nn.Linear(128, TEACHER_FEATURES))
    teacher.requires_grad_(False)
    return student, teacher


def global_batches(world: int, steps: int) -> list[torch.Tensor]:
    """Each step's global batch; rank r takes rows [r * BATCH_PER_RANK, (r + 1) * BATCH_PER_RANK)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return [torch.randn(world * BATCH_PER_RANK, FEATURES_IN, generator=generator) for _ in range(steps)]


def train_features(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], device: torch.device,
                   group=None) -> list[float]:
    """RKD (distance and angle) between the student's and the teacher's features, plain SGD."""
    optimizer = torch.optim.SGD(student.parameters(), lr=DDP_LR)
    losses = []
    for step, x in enumerate(batches, 1):
        x = x.to(device)
        with torch.no_grad():
            f_t = teacher(x)
        loss = rkd_loss(student(x), f_t, process_group=group)
        take_step(optimizer, loss, losses, step, logged=group is not None)
    return losses


def data_parallel(device: torch.device) -> bool:
    world, rank = dist.get_world_size(), dist.get_rank()
    log(f"ddp: {world} ranks ({dist.get_backend()}), {BATCH_PER_RANK} samples per rank, RKD over the global batch "
        f"of {world * BATCH_PER_RANK}; {DDP_STEPS} SGD steps")
    student, teacher = feature_models()
    student, teacher = student.to(device), teacher.to(device)
    model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    batches = global_batches(world, DDP_STEPS)
    mine = [x[rank * BATCH_PER_RANK:(rank + 1) * BATCH_PER_RANK] for x in batches]
    # Every rank prints the same loss: the relations run over the whole batch on each.
    losses = train_features(model, teacher, mine, device, group=dist.group.WORLD)
    if rank != 0:
        return True

    student, teacher = feature_models()
    student, teacher = student.to(device), teacher.to(device)
    single = train_features(student, teacher, batches, device)
    trained = {name: p.detach().cpu() for name, p in model.module.named_parameters()}
    replayed = {name: p.detach().cpu() for name, p in student.named_parameters()}
    return compare(losses, single, trained, replayed)


# --- the check ------------------------------------------------------------------------------------------------

def compare(losses: list[float], single: list[float], trained: dict, replayed: dict) -> bool:
    """Rank 0: the distributed run against the single-process replay, every step's loss and every parameter."""
    # Relative: to the loss, and to each tensor's largest entry (both at least 1).
    loss_gap = max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(losses, single))
    param_gap = max((trained[name] - replayed[name]).abs().max().item() / max(replayed[name].abs().max().item(), 1.0)
                    for name in replayed)
    summary = (f"final loss {losses[-1]:.6f} (single process {single[-1]:.6f}); largest relative loss difference "
               f"over the steps {loss_gap:.1e} (tolerance {LOSS_TOLERANCE:.0e}), largest relative parameter "
               f"difference {param_gap:.1e} (tolerance {PARAM_TOLERANCE:.0e})")
    ok = loss_gap <= LOSS_TOLERANCE and param_gap <= PARAM_TOLERANCE
    print(f"{MATCH_LINE}: {summary}" if ok else f"does NOT match the single-process run: {summary}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node 2 -m fastkd.demo_distributed",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=MODES, help="tp: vocabulary-parallel fused loss; ddp: global-batch RKD")
    args = parser.parse_args(argv)
    device = setup()
    try:
        ok = (tensor_parallel if args.mode == "tp" else data_parallel)(device)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


def leave(status) -> None:
    """Exit with `status` (as `sys.exit` reads it) without finalizing the interpreter.

    Under torch 2.14 a gloo worker thread drops its last reference to a finished collective's tensors just after
    the caller's wait returns; when the interpreter is already shutting down, that thread can no longer take the
    GIL to release their Python objects and the process aborts ("terminate called without an active exception",
    SIGABRT in ProcessGroupGloo::runLoop, seen in about one CPU run in ten). Nothing is left to finalize once
    the group is destroyed and the output flushed, so the process ends here instead."""
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


if __name__ == "__main__":
    try:
        leave(main())
    except SystemExit as stop:
        leave(stop.code)
