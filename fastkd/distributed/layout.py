"""Which slice of the vocabulary each rank holds, checked on every rank before any loss collective.

A vocabulary-parallel call hands this rank's slice of the last dimension (`local_vocab` ids) and optionally its
`vocab_range=(start, end)`. Without a range the slices are equal and in rank order: rank r holds
`[r * local_vocab, (r + 1) * local_vocab)`. Every call first all-gathers four integers per rank (start, end,
local size, rows) and every rank checks the same list: the slices must tile `[0, V)` in rank order with no gap
or overlap, each range must match its tensor, and every rank must hold the same rows. A mistake (a range made
for another group size, a shard of the wrong width, a rank with other tokens) so raises the same ValueError on
every rank, instead of a collective of mismatched shapes that would fail on some ranks and hang on others.
This check reads four integers per rank on the host: the one synchronisation of a call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import rank, world_size


@dataclass(frozen=True)
class VocabSlice:
    """This rank's ids `[start, end)` of a vocabulary of `total` ids."""
    start: int
    end: int
    total: int


def check_group(process_group) -> None:
    """`process_group` usable here: torch.distributed initialised and this process a member of the group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or pass process_group=None)")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise ValueError("this process is not a member of process_group")


def _check_range(vocab_range, local_vocab: int) -> tuple[int, int] | None:
    if vocab_range is None:
        return None
    if (not isinstance(vocab_range, (tuple, list)) or len(vocab_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab_range)):
        raise TypeError(f"vocab_range must be a pair of ints (start, end), got {vocab_range!r}")
    start, end = vocab_range
    if not 0 <= start <= end:
        raise ValueError(f"vocab_range must satisfy 0 <= start <= end, got {vocab_range!r}")
    if end - start != local_vocab:
        raise ValueError(f"vocab_range {tuple(vocab_range)} holds {end - start} ids but this rank's logits (or "
                         f"weight rows) hold {local_vocab}")
    return start, end


def vocab_slice(process_group, local_vocab: int, vocab_range, rows: int, device) -> VocabSlice:
    """This rank's slice of the vocabulary, after the every-rank check of the module docstring."""
    check_group(process_group)
    mine = _check_range(vocab_range, local_vocab)
    # -1 marks "no range given": equal slices, placed once every rank's width is known.
    start, end = mine if mine is not None else (-1, -1)
    if device.type == "cuda" or dist.get_backend(process_group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device()) if device.type != "cuda" else device
    else:
        device = torch.device("cpu")
    info = torch.tensor([start, end, local_vocab, rows], dtype=torch.int64, device=device)
    size = world_size(process_group)
    every = [torch.empty_like(info) for _ in range(size)]
    dist.all_gather(every, info, group=process_group)
    table = [tuple(int(v) for v in t.tolist()) for t in every]
    me = rank(process_group)

    listed = "; ".join(f"rank {r}: " + (f"ids [{s}, {e})" if s >= 0 else "no vocab_range")
                       + f", {w} ids, {n} rows" for r, (s, e, w, n) in enumerate(table))
    if len({n for *_, n in table}) > 1:
        raise ValueError(f"every rank of a vocabulary-parallel loss must hold the same tokens (rows), got {listed}")
    given = [s >= 0 for s, *_ in table]
    if any(given) and not all(given):
        raise ValueError(f"vocab_range must be given on every rank or on none, got {listed}")
    if not any(given):
        widths = {w for _, _, w, _ in table}
        if len(widths) > 1:
            raise ValueError(f"without vocab_range the ranks must hold equal slices of the vocabulary; pass "
                             f"vocab_range=(start, end) for unequal ones; got {listed}")
        return VocabSlice(me * local_vocab, (me + 1) * local_vocab, size * local_vocab)
    position = 0
    for r, (s, e, _, _) in enumerate(table):
        if s != position:
            raise ValueError(f"the ranks' vocab_range slices must tile [0, V) in rank order (rank {r} should start "
                             f"at {position}; a range made for another group size?), got {listed}")
        position = e
    return VocabSlice(table[me][0], table[me][1], position)
