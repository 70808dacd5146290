"""The collectives of fastkd's distributed losses, as autograd functions, and the layout checks before them.

Two kinds of distribution, two conventions for what crosses the network in the backward pass:

- Vocabulary parallel (tensor parallel): every rank holds the same tokens and a slice of the vocabulary, and
  every rank computes the same loss of the whole vocabulary. A sum over the vocabulary is a local partial sum
  then `sum_over_ranks`: forward all-reduce, backward identity (Megatron's "reduce from the tensor-parallel
  region"). That is exact: with `S = sum_r s_r` and every rank holding the same loss `L(S)`, the gradient of
  rank r's partial is `dL/dS`, which rank r already has. A tensor that every rank holds whole and that feeds
  the slices (a learnable temperature, the hidden states of a sharded output layer) enters through
  `copy_to_ranks`: forward identity, backward all-reduce of its gradient, the sum of every slice's part.
  The row maximum that keeps `exp` in range is `max_over_ranks`, without a gradient: a logsumexp does not
  depend on the shift, so no gradient flows through it.
- Data parallel (DDP): every rank holds its own samples and a relational loss needs the whole batch.
  `gather_rows` all-gathers a tensor along dim 0 (ranks of different batch sizes allowed), and its backward
  reduce-scatters the gradient of the gathered tensor: each rank gets the sum over the ranks of its own rows'.
  Every rank then holds W times the gradient of the global loss with respect to its own rows, and DDP's
  averaging over the W ranks divides it back: one DDP step equals one single-process step on the concatenated
  batch (SimCLR's GatherLayer).

Every collective runs on `group` (None: the default group) and is bounded by the group's timeout (set at
`init_process_group(timeout=...)`): a rank that never arrives raises there rather than hanging forever.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(group) -> int:
    return dist.get_world_size(group)


def rank(group) -> int:
    return dist.get_rank(group)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        ctx.rank = dist.get_rank(group)
        longest = max(sizes)
        padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        # Every rank's rows padded to the longest, as in the forward; rank r receives the sum over the ranks of
        # part r. A reduce-scatter sends (W - 1) / W of the gathered gradient, half an all-reduce's 2 (W - 1) / W.
        longest = max(ctx.sizes)
        padded = grad.new_zeros((len(ctx.sizes) * longest,) + tuple(grad.shape[1:]))
        start = 0
        for r, size in enumerate(ctx.sizes):
            padded[r * longest:r * longest + size] = grad[start:start + size]
            start += size
        mine = grad.new_empty((longest,) + tuple(grad.shape[1:]))
        dist.reduce_scatter(mine, list(padded.split(longest)), op=dist.ReduceOp.SUM, group=ctx.group)
        return mine[:ctx.sizes[ctx.rank]], None, None


# Every dtype torch has, in a fixed order: a rank's dtype crosses the network as its index here.
_DTYPES = tuple(dict.fromkeys(v for v in vars(torch).values() if isinstance(v, torch.dtype)))
_MAX_ROW_DIMS = 6


def sum_over_ranks(x: Tensor, group) -> Tensor:
    """The sum of `x` over the ranks of `group` (every rank gets it); the gradient passes through unchanged."""
    return _SumOverRanks.apply(x, group)


def max_over_ranks(x: Tensor, group) -> Tensor:
    """The elementwise maximum of `x` over the ranks, without a gradient (a shift: module docstring)."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def copy_to_ranks(x: Tensor, group) -> Tensor:
    """`x` itself; in the backward pass its gradient is summed over the ranks (module docstring)."""
    return _CopyToRanks.apply(x, group)


def batch_sizes(x: Tensor, group) -> list[int]:
    """Every rank's number of rows of `x`, in rank order, after checking that every rank's rows have the same shape
    and dtype (one small all-gather, read on the host). A mismatch raises the same ValueError on every rank, where
    gathering rows of different sizes would abort a gloo rank and hang or corrupt NCCL."""
    row_shape = tuple(x.shape[1:])
    # The row shape's dims padded to a fixed length, so every rank sends the same number of integers.
    dims = list(row_shape)[:_MAX_ROW_DIMS] + [-1] * (_MAX_ROW_DIMS - len(row_shape))
    mine = torch.tensor([x.shape[0], len(row_shape), _DTYPES.index(x.dtype)] + dims, dtype=torch.int64,
                        device=x.device)
    every = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(every, mine, group=group)
    table = [[int(v) for v in t.tolist()] for t in every]
    if len({tuple(info[1:]) for info in table}) > 1 or len(row_shape) > _MAX_ROW_DIMS:
        listed = "; ".join(f"rank {r}: {info[0]} rows of shape {tuple(d for d in info[3:3 + info[1]])} in "
                           f"{_DTYPES[info[2]]}" for r, info in enumerate(table))
        raise ValueError(f"every rank's rows must have the same shape and dtype to be gathered, got {listed}")
    return [info[0] for info in table]


def gather_rows(x: Tensor, group) -> Tensor:
    """The rows of `x` from every rank, concatenated in rank order (module docstring for the gradient)."""
    sizes = batch_sizes(x, group)
    if x.shape[0] == 0 and max(sizes) == 0:
        return x
    return _GatherRows.apply(x, group, sizes)
