"""The top-k of `log_softmax(logits / T)` when the vocabulary is split over the ranks (tensor parallelism).

Rank r of `process_group` holds the logits of the ids `[start_r, end_r)` (`layout.vocab_slice`). With
`z = logits / T`, `m = max_v z_v` and `s = sum_v exp(z_v - m)` over the FULL vocabulary, the log-probability of
id v is `(z_v - m) - log s`, and the k largest ids of the row are the k largest `z_v`:
- the normalisers (`vocab_parallel.shifted_logsumexp`): `m` is a max all-reduce of each rank's row maximum,
  `s` a sum all-reduce of each rank's `sum exp(z_v - m)` taken after it (exact: every term is `<= 1`, no
  rescaling between ranks);
- the candidates: each id of the global top-k is in the top-min(k, V_r) of its own rank, so each rank sends its
  top-min(k, V_r) (value and global id, padded to k) in one all-gather, and the global top-k is chosen among
  the k x W candidates of the row.
Per row that is 2 floats for the normalisers and `k * W * (value + id)` bytes for the candidates
(`k * W * 12` for float32 logits, 8-byte ids); never `V` numbers. Every rank gets the same result.

Ties: ids are ranked by value, then by smaller id. The result is the k first ids of that order, on every rank
and every number of ranks, and it is a top-k: its values are those of `torch.topk` of the full row, and where no
tie straddles the k-th place its set of ids is that of `torch.topk` too (which does not say which of tied ids
it keeps). The ids come back in that order (largest first). A NaN logit counts as the largest (as in
`torch.topk`); its row's log-probs are NaN, as are those of a row that is -inf everywhere, as `log_softmax`
gives. The arithmetic is in float32, or float64 for float64 logits. Without a group the log-probs are
`torch.log_softmax`'s bit for bit; across ranks `s` is summed in another order, so they agree with it to a few
units in the last place. Nothing is differentiable (the teacher's side of distillation): a call under grad
mode returns tensors without a gradient.
"""
from __future__ import annotations

import math
from numbers import Integral

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks as checks
from .collectives import world_size
from .layout import vocab_slice
from .vocab_parallel import shifted_logsumexp


def _local_topk(key: Tensor, k: int) -> Tensor:
    """The ids of the k largest entries of each row of `key` (no NaN), ties to the smaller id, in increasing id
    order: all those above the k-th value, then the first of those equal to it."""
    kth = torch.topk(key, k, dim=-1).values[:, -1:]
    above = key > kth
    tied = key == kth
    need = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= need))
    return chosen.nonzero()[:, 1].view(len(key), k)


def _order(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k first candidates of each row by value (largest first), then by smaller id; NaN first."""
    by_id = torch.argsort(ids, dim=-1, stable=True)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = torch.argsort(values, dim=-1, descending=True, stable=True)[:, :k]
    return values.gather(-1, by_value), ids.gather(-1, by_value)


@torch.no_grad()
def sharded_topk(logits: Tensor, k: int, process_group=None, *, vocab_range: tuple[int, int] | None = None,
                 temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The k largest ids of `log_softmax(logits / temperature)` over the whole vocabulary and their log-probs
    (module docstring): `(ids (..., k) int64 global ids, logprobs (..., k))`, largest first, the log-probs in
    float32 (float64 for float64 logits).

    logits: `(..., V_local)`, this rank's slice of the vocabulary; the ranks hold the same rows.
    process_group: the ranks that split the vocabulary; None: `logits` is the whole vocabulary (no collective).
    vocab_range: `(start, end)` of this rank's slice; None: equal slices in rank order (`layout.vocab_slice`).
    Communicates 2 floats and `k * W * (value + id)` bytes per row; every rank gets the same result.
    """
    checks.check_float_tensor("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension (..., V), got a 0-d tensor")
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(k)
    temperature = checks.check_positive("temperature", temperature)
    lead, local = logits.shape[:-1], logits.shape[-1]
    rows = math.prod(lead)
    z = logits.reshape(rows, local).to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if process_group is None:
        if vocab_range is not None:
            raise ValueError("vocab_range is for a vocabulary split over a process_group; without one the logits "
                             "are the whole vocabulary")
        start, total = 0, local
    else:
        where = vocab_slice(process_group, local, vocab_range, rows, logits.device)
        start, total = where.start, where.total
    if k > total:
        raise ValueError(f"k must be at most the vocabulary size {total}, got {k}")

    if process_group is not None:
        m, s = shifted_logsumexp(z, process_group)

    width = min(k, local)
    key = torch.where(torch.isnan(z), math.inf, z)  # NaN first, as torch.topk; no NaN in the comparisons
    ids = _local_topk(key, width) if width else z.new_zeros((rows, 0), dtype=torch.int64)
    values = z.gather(-1, ids)
    ids = ids + start
    if process_group is not None:
        # Padded to k: slot value -inf and id `total`, after every real id in the order, so never chosen
        # over one. Values and ids travel as the bytes of one tensor: one all-gather.
        pad = k - width
        values = torch.cat([values, values.new_full((rows, pad), -math.inf)], -1)
        ids = torch.cat([ids, ids.new_full((rows, pad), total)], -1)
        packed = torch.cat([values.view(torch.uint8), ids.view(torch.uint8)], -1)
        parts = [torch.empty_like(packed) for _ in range(world_size(process_group))]
        dist.all_gather(parts, packed, group=process_group)
        split = k * values.element_size()
        values = torch.cat([p[:, :split].contiguous().view(values.dtype) for p in parts], -1)
        ids = torch.cat([p[:, split:].contiguous().view(torch.int64) for p in parts], -1)
    values, ids = _order(values, ids, k)
    if process_group is None:  # bit for bit torch's log_softmax
        logprobs = torch.log_softmax(z, dim=-1).gather(-1, ids)
    else:
        logprobs = (values - m[:, None]) - torch.log(s)[:, None]
    return ids.reshape(*lead, k), logprobs.reshape(*lead, k)
