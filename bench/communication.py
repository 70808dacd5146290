"""The bytes each of fastkd's distributed losses sends over the network per call, forward and backward: a model,
collective by collective, read off the implementation (`python -m bench --communication` prints the table).

Convention: bytes SENT BY EACH RANK, by the bandwidth-optimal ring algorithms (NCCL's and gloo's for large
tensors), latency and protocol headers left out. For a tensor of S bytes on W ranks:

    all-reduce   2 (W - 1) / W x S        (reduce-scatter then all-gather, each (W - 1) / W x S)
    all-gather   (W - 1) / W x T          T the gathered tensor, every rank's part together (W x each part)
    reduce-scatter  (W - 1) / W x S       S the whole tensor reduced, each rank keeping 1 / W of it

What is counted, from fastkd/distributed/ (N rows, W ranks; "c" the loss's compute dtype: float32 for 16- and
32-bit inputs, float64 for float64; every all-reduce below is of N numbers in c unless it says otherwise):

- Every vocabulary-parallel call first checks the layout: an all-gather of 4 int64 per rank (`layout.vocab_slice`).
- Vocabulary parallel (`vocab_parallel`): a log-softmax over the split vocabulary is a max all-reduce and a sum
  all-reduce per row (`shifted_logsumexp`); where it runs under autograd, the gradient of its log-sum, which
  every slice's terms share, is summed over the ranks in the backward (`copy_to_ranks`: one more). The
  divergences (`kl_div_loss` forward and reverse, `kd_loss`'s KL) normalise both sides together (a max and a
  sum all-reduce of 2 x N, `shifted_logsumexps`) and sum their per-row partials: 3 all-reduces; `jsd_loss` sums
  its two partials (to the mixture) as one of 2 x N. Their
  student gradient comes in closed form with the forward (`_StudentDivergence`): no backward collective. On a
  kernel backend (`kernels=True`: "auto" on CUDA tensors) the slice operators hand both sides' statistics over as
  `(N, 2)` float32 pairs: 3 all-reduces of 2 x N (maxima, sums, partial sums) for each of these divergences.
  `kd_loss`'s CE term normalises the student again at T = 1 under autograd and sums the label's log-probability
  from the slice holding it: 3 more, 1 in the backward. `sparse_kd_loss` normalises the student under autograd
  and sums the terms of the teacher's k slots, each on the slice holding its id, then over the ranks (an
  all-reduce of N, not the N x k log-probabilities); the "bucket" tail adds the count of ids outside the set and
  the normaliser of the student's mass there (3 more). A tensor temperature adds the
  all-reduce of its gradient in the backward (its own size; not modelled here).
- `fused_linear_distill_loss(process_group=...)`: the layout check and the same per-row numbers chunk by chunk
  (N rows in all), plus the all-reduce of the hidden states' gradient, N x H in the hidden states' dtype; all of
  it in the forward pass, where the fused loss makes its gradients (the backward only scales them).

- Relational losses under DDP (`functional.global_batch`, `collectives.gather_rows`): per side an all-gather of
  each rank's row count, row shape and dtype (a few int64, checked alike on every rank) and of the features
  (W x B x D, B the batch of each rank); the backward reduce-scatters the gradient of the gathered student
  features, W x B x D_s (the teacher's side has none), so each rank receives its own rows'. DDP's own
  all-reduce of the parameters' gradients is the same with any loss and not counted.
- FSDP2 (`fastkd/distributed/dtensor.py`): an output weight given as a sharded `DTensor` to the fused loss is
  all-gathered once per call (V x H; the teacher's too, without a gradient) and the student's weight gradient
  reduce-scattered back, as FSDP2 does for any parameter; the rows of each rank are its own, nothing else crosses.
  (DTensor's collectives are not the `torch.distributed` calls the test below records: this one is not checked.)
- `distributed.topk.sharded_topk`: the layout check, the normalisers (2 all-reduces of N, in c), and one
  all-gather of every rank's k candidates per row, value (c) and int64 id: W x N x k x (c + 8) gathered.

Against gathering the logits (Megatron's gather_output=True, or an all-gather before a single-process loss):
N x V per side in the logits' dtype, all-gathered; its backward (keeping one's slice) sends nothing, and the fused
alternative still all-reduces the hidden states' gradient, counted there as here.

`tests/test_bench.py` runs each of these on 2 gloo ranks and checks that the collectives it makes are the
model's, one for one; a change to the losses' communication fails it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INT64 = 8
VOCAB_LOSSES = ("kl_div_loss", "jsd_loss", "kd_loss", "sparse_kd_loss")
TAILS = ("renormalize", "none", "bucket")


@dataclass(frozen=True)
class Collective:
    """One collective of a call: `elements` of `itemsize` bytes reduced (all-reduce), or gathered or scattered in
    all, every rank's part together (all-gather, reduce-scatter)."""
    what: str
    op: str  # "all_reduce", "all_gather" or "reduce_scatter"
    elements: int
    itemsize: int
    when: str  # "forward" or "backward"

    def sent(self, world: int) -> float:
        """Bytes each rank sends (module docstring)."""
        size = self.elements * self.itemsize
        if self.op == "all_reduce":
            return 2 * (world - 1) * size / world
        if self.op in ("all_gather", "reduce_scatter"):
            return (world - 1) * size / world
        raise ValueError(f"unknown collective {self.op!r}")


def _check(world: int, **sizes: int) -> None:
    if world < 1:
        raise ValueError(f"world must be at least 1 rank, got {world}")
    for name, value in sizes.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def compute_itemsize(dtype: torch.dtype) -> int:
    """The bytes of one per-row number: the losses compute in float32 at least (fastkd.functional docstring)."""
    return torch.promote_types(dtype, torch.float32).itemsize


def layout_check(world: int) -> Collective:
    return Collective("layout check (start, end, width, rows per rank)", "all_gather", 4 * world, INT64, "forward")


def _normalisers(side: str, rows: int, c: int, gradient: bool = False) -> list[Collective]:
    """A log-softmax over the split vocabulary; `gradient`: under autograd, where the gradient of its log-sum
    is summed over the slices in the backward (`copy_to_ranks`)."""
    out = [Collective(f"{side} row maximum", "all_reduce", rows, c, "forward"),
           Collective(f"{side} row sum of exp", "all_reduce", rows, c, "forward")]
    if gradient:
        out.append(Collective(f"{side} log-sum's gradient", "all_reduce", rows, c, "backward"))
    return out


def _loss_rows(loss: str, rows: int, c: int, ce: bool, tail: str, kernels: bool = False) -> list[Collective]:
    """The per-row collectives of a vocabulary-parallel loss (module docstring), without the layout check;
    `kernels`: the divergence's statistics made by a kernel backend's slice operators (float32 pairs)."""
    if loss not in VOCAB_LOSSES:
        raise ValueError(f"unknown vocabulary-parallel loss {loss!r}; choose from {VOCAB_LOSSES}")
    if loss == "sparse_kd_loss":
        if tail not in TAILS:
            raise ValueError(f"unknown tail {tail!r}; choose from {TAILS}")
        out = _normalisers("student", rows, c, gradient=True)
        out.append(Collective("partial sums of the teacher's k slots' terms", "all_reduce", rows, c, "forward"))
        if tail == "bucket":
            out.append(Collective("ids outside the teacher's set", "all_reduce", rows, c, "forward"))
            out += _normalisers("student tail", rows, c)
    elif kernels:
        out = [Collective("row maxima, both sides", "all_reduce", 2 * rows, 4, "forward"),
               Collective("row sums of exp, both sides", "all_reduce", 2 * rows, 4, "forward"),
               Collective("divergence partial sums", "all_reduce", 2 * rows, 4, "forward")]
    else:
        # The student's divergence gradient comes in closed form with its forward: no backward collective. Both
        # sides' normalisers travel together (`vocab_parallel.shifted_logsumexps`).
        out = _normalisers("both sides'", 2 * rows, c)
        # JSD sums its two KL partials (to the mixture) in one all-reduce of 2 x N.
        out.append(Collective("divergence partial sums", "all_reduce", 2 * rows if loss == "jsd_loss" else rows,
                              c, "forward"))
    if ce:
        if loss != "kd_loss":
            raise ValueError(f"{loss} has no CE term; ce=True is for kd_loss")
        out += _ce_term(rows, c)
    return out


def _ce_term(rows: int, c: int) -> list[Collective]:
    """CE on the split vocabulary: the student's normaliser at T = 1, the label's log-probability."""
    return (_normalisers("student (T = 1, for CE)", rows, c, gradient=True)
            + [Collective("label log-probability", "all_reduce", rows, c, "forward")])


def vocab_parallel(loss: str, *, rows: int, world: int, dtype: torch.dtype = torch.bfloat16, ce: bool = False,
                   tail: str = "renormalize", kernels: bool = False) -> list[Collective]:
    """`kl_div_loss`, `jsd_loss`, `kd_loss` (`ce`: with its CE term), `sparse_kd_loss` (`tail`; the teacher's k
    does not count: its slots' terms are summed per slice) with the logits of `dtype` split by vocabulary over
    `world` ranks; `kernels`: on a kernel backend (module docstring)."""
    _check(world, rows=rows)
    return [layout_check(world)] + _loss_rows(loss, rows, compute_itemsize(dtype), ce, tail, kernels)


def fused(*, rows: int, hidden: int, world: int, dtype: torch.dtype = torch.bfloat16, ce: bool = False,
          jsd: bool = False, sparse: bool = False, tail: str = "renormalize",
          kernels: bool = False) -> list[Collective]:
    """`fused_linear_distill_loss(process_group=...)`, hidden states and weights of `dtype`: a KL or KD divergence,
    JSD (`jsd`), or with `sparse` a teacher cache and its `tail`; `ce`: with the CE term. Every
    collective runs in the forward pass, the backward ones of the row losses included: the fused loss makes its
    gradients there. `kernels`: the divergence on a kernel backend's slice operators (not for a sparse teacher)."""
    _check(world, rows=rows, hidden=hidden)
    loss = "sparse_kd_loss" if sparse else "jsd_loss" if jsd else "kd_loss"
    out = [layout_check(world)] + _loss_rows(loss, rows, compute_itemsize(dtype), False, tail, kernels and not sparse)
    if ce:
        out += _ce_term(rows, compute_itemsize(dtype))
    out.append(Collective("hidden states' gradient (N x H)", "all_reduce", rows * hidden, dtype.itemsize, "forward"))
    return [Collective(c.what, c.op, c.elements, c.itemsize, "forward") for c in out]


def relational(*, batch: int, student_dim: int, teacher_dim: int, world: int,
               dtype: torch.dtype = torch.float32) -> list[Collective]:
    """A relational loss (`rkd_loss`, `sp_loss`, `cc_loss`, `pkt_loss`, ...) over the global batch, `batch`
    samples on each of `world` ranks."""
    _check(world, batch=batch, student_dim=student_dim, teacher_dim=teacher_dim)
    gathered = world * batch
    # Before each gather, every rank's rows, row shape and dtype, checked alike on every rank
    # (`collectives.batch_sizes`: 3 int64 and the row shape's dims padded to a fixed count, read from there).
    from fastkd.distributed import collectives
    info = 3 + collectives._MAX_ROW_DIMS
    return [Collective("student row count, shape and dtype", "all_gather", world * info, INT64, "forward"),
            Collective("student features (W x B x D_s)", "all_gather", gathered * student_dim, dtype.itemsize,
                       "forward"),
            Collective("teacher row count, shape and dtype", "all_gather", world * info, INT64, "forward"),
            Collective("teacher features (W x B x D_t)", "all_gather", gathered * teacher_dim, dtype.itemsize,
                       "forward"),
            Collective("gradient of the gathered student features", "reduce_scatter", gathered * student_dim,
                       dtype.itemsize, "backward")]


def fsdp_weights(*, vocab: int, hidden: int, world: int, dtype: torch.dtype = torch.bfloat16,
                 teacher_hidden: int | None = None) -> list[Collective]:
    """The fused loss with its output weights as FSDP2 `DTensor`s: the student's `vocab x hidden` weight (and the
    teacher's `vocab x teacher_hidden`, when given as one) gathered, the student's gradient reduce-scattered."""
    _check(world, vocab=vocab, hidden=hidden)
    out = [Collective("student weight (V x H)", "all_gather", vocab * hidden, dtype.itemsize, "forward")]
    if teacher_hidden is not None:
        out.append(Collective("teacher weight (V x H_t)", "all_gather", vocab * teacher_hidden, dtype.itemsize,
                              "forward"))
    out.append(Collective("student weight's gradient", "reduce_scatter", vocab * hidden, dtype.itemsize,
                          "backward"))
    return out


def sharded_topk(*, rows: int, k: int, world: int, dtype: torch.dtype = torch.bfloat16) -> list[Collective]:
    """`fastkd.distributed.topk.sharded_topk` of logits of `dtype` (no backward: the teacher's side)."""
    _check(world, rows=rows, k=k)
    c = compute_itemsize(dtype)
    return [layout_check(world)] + _normalisers("teacher", rows, c) + [
        Collective("k candidates per rank (value, int64 id)", "all_gather", world * rows * k, c + INT64, "forward")]


def gathered_logits(*, rows: int, vocab: int, world: int, dtype: torch.dtype = torch.bfloat16,
                    sides: int = 2) -> list[Collective]:
    """What the vocabulary-parallel losses avoid: all-gathering the `rows x vocab` logits of `sides` models."""
    _check(world, rows=rows, vocab=vocab)
    return [Collective("logits (N x V)", "all_gather", rows * vocab, dtype.itemsize, "forward")] * sides


def totals(collectives: list[Collective], world: int) -> tuple[float, float]:
    """(forward, backward) bytes sent by each rank."""
    forward = sum(c.sent(world) for c in collectives if c.when == "forward")
    backward = sum(c.sent(world) for c in collectives if c.when == "backward")
    return forward, backward


def human(size: float) -> str:
    # From 1000 of a unit the next one up: "0.98 GiB", not "1002.00 MiB".
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if size >= scale * 1000 / 1024:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"


# The table's shapes (the divergences as on a GPU, where "auto" runs them on the kernels' slice operators): a
# Llama 3 sized output layer (V = 128256, H = 4096) over 8192 tokens in bfloat16, a
# teacher cache of top-64, and RKD on 512-wide features of 256 samples per rank in float32.
ROWS, VOCAB, HIDDEN, TOPK = 8192, 128256, 4096, 64
BATCH, FEATURES = 256, 512
WORLDS = (2, 4, 8)


def cases(world: int) -> list[tuple[str, str, list[Collective], list[Collective] | None]]:
    """(loss, shape, its collectives, the gathering alternative's or None) at the table's shapes."""
    bf16 = torch.bfloat16
    logits = f"N={ROWS} V={VOCAB} bf16"
    fused_shape = f"N={ROWS} H={HIDDEN} V={VOCAB} bf16"
    gather_both = gathered_logits(rows=ROWS, vocab=VOCAB, world=world, dtype=bf16)
    gather_one = gathered_logits(rows=ROWS, vocab=VOCAB, world=world, dtype=bf16, sides=1)
    hidden_grad = fused(rows=ROWS, hidden=HIDDEN, world=world, dtype=bf16)[-1:]
    return [
        ("kl_div_loss", logits, vocab_parallel("kl_div_loss", rows=ROWS, world=world, dtype=bf16, kernels=True),
         gather_both),
        ("jsd_loss", logits, vocab_parallel("jsd_loss", rows=ROWS, world=world, dtype=bf16, kernels=True),
         gather_both),
        ("kd_loss + CE", logits, vocab_parallel("kd_loss", rows=ROWS, world=world, dtype=bf16, ce=True, kernels=True),
         gather_both),
        ("sparse_kd_loss, bucket", f"{logits} k={TOPK}",
         vocab_parallel("sparse_kd_loss", rows=ROWS, world=world, dtype=bf16, tail="bucket"),
         gather_one),
        ("fused_linear_distill_loss + CE", fused_shape,
         fused(rows=ROWS, hidden=HIDDEN, world=world, dtype=bf16, ce=True, kernels=True), gather_both + hidden_grad),
        ("fused_linear_distill_loss, FSDP2 DTensor weights", f"V={VOCAB} H={HIDDEN} bf16",
         fsdp_weights(vocab=VOCAB, hidden=HIDDEN, world=world, teacher_hidden=HIDDEN), None),
        ("sharded_topk (teacher cache)", f"{logits} k={TOPK}",
         sharded_topk(rows=ROWS, k=TOPK, world=world, dtype=bf16), gather_one),
        ("rkd_loss, sp_loss, cc_loss, pkt_loss", f"B={BATCH}/rank D={FEATURES} fp32",
         relational(batch=BATCH, student_dim=FEATURES, teacher_dim=FEATURES, world=world), None),
    ]


def table_lines(worlds=WORLDS) -> list[str]:
    lines = ["Bytes sent per rank per call (ring all-reduce 2(W-1)/W x size, all-gather (W-1)/W x total; "
             "bench/communication.py)",
             "",
             "| loss | shape | W | forward | backward | total | gathering the logits instead | less |",
             "|---|---|---|---|---|---|---|---|"]
    # Grouped by loss, one line per world size.
    for index in range(len(cases(worlds[0]))):
        for world in worlds:
            loss, shape, ours, alternative = cases(world)[index]
            forward, backward = totals(ours, world)
            if alternative is None:
                instead, ratio = "-", "-"
            else:
                other = sum(totals(alternative, world))
                instead, ratio = human(other), f"{other / (forward + backward):,.0f}x"
            lines.append(f"| {loss} | {shape} | {world} | {human(forward)} | {human(backward)} | "
                         f"{human(forward + backward)} | {instead} | {ratio} |")
    return lines
