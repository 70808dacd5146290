"""fastkd.distributed.topk and the tensor-parallel teacher cache writer, on gloo ranks (`ranks.run_ranks`).

- `sharded_topk` on 2 and 3 ranks (equal and unequal slices, an empty slice, k below, at and above a slice's
  width and at the whole vocabulary, float32 / float64 / bfloat16, -inf logits, ties, leading dimensions) equals
  `torch.topk(log_softmax(full / T), k)` of one process: the ids those of the documented tie rule (value, then
  smaller id), so the set of `torch.topk` wherever no tie straddles the k-th place; the log-probs to a few ulps;
  the same result on every rank;
- a tensor-parallel write (logits, hidden states with the weight's rows, sampled ids) reads back as the
  single-process write of the whole vocabulary, and only rank 0 makes files;
- a mismatched layout, k above the vocabulary and writers with different settings raise on every rank.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from ranks import RankError, run_ranks

from fastkd.distributed.topk import sharded_topk
from fastkd.teacher_cache import TeacherCache, TeacherCacheWriter

INF = math.inf


def _ranges(widths):
    ends = torch.tensor(widths).cumsum(0).tolist()
    return [(e - w, e) for w, e in zip(widths, ends)]


def reference(full, k, temperature):
    """torch.topk's values; the ids of the tie rule (a stable sort: equal values keep increasing id order)."""
    lp = torch.log_softmax(full.to(torch.promote_types(full.dtype, torch.float32)) / temperature, dim=-1)
    values, ids = torch.topk(lp, k, dim=-1)
    ordered = torch.sort(lp, dim=-1, descending=True, stable=True)
    return lp, values, ids, ordered.indices[..., :k]


def _topk_cases(rank, world_size, cases):
    out = []
    for full, widths, k, temperature in cases:
        ranges = _ranges(widths) if widths else None
        start, end = ranges[rank] if ranges else (rank * full.shape[-1] // world_size,
                                                  (rank + 1) * full.shape[-1] // world_size)
        out.append(sharded_topk(full[..., start:end], k, dist.group.WORLD,
                                vocab_range=ranges[rank] if ranges else None, temperature=temperature))
    return out


def _cases(world_size):
    g = torch.Generator().manual_seed(world_size)
    cases = []
    odd = [10, 20, 7] if world_size == 3 else [30, 7]
    for dtype in (torch.float32, torch.float64):
        full = (3 * torch.randn(5, 37, generator=g)).to(dtype)
        for k in (3, 7, 10, 12, 37):
            cases.append((full, odd, k, 1.0))
        cases.append((full, odd, 9, 2.5))
    even = (2 * torch.randn(2, 3, 12 * world_size, generator=g))
    for k in (5, 12, 13, 12 * world_size):
        cases.append((even, None, k, 0.7))
    cases.append((even.bfloat16(), None, 6, 1.0))
    # -inf: scattered, a whole slice of a row, all but one id of a row; k reaching into them.
    masked = torch.randn(4, 37, generator=g)
    masked[0, ::3] = -INF
    masked[1, :odd[0]] = -INF
    masked[2, 1:] = -INF
    for k in (4, 20, 37):
        cases.append((masked, odd, k, 1.0))
    # Ties everywhere, across slices and at the k-th place; an empty slice on 3 ranks.
    tied = torch.randint(0, 3, (6, 37), generator=g).float()
    for k in (1, 5, 11, 30):
        cases.append((tied, odd, k, 1.0))
        if world_size == 3:
            cases.append((tied, [20, 0, 17], k, 1.0))
    return cases


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_topk_equals_single_process_topk(world_size):
    cases = _cases(world_size)
    results = run_ranks(world_size, _topk_cases, cases)
    for i, (full, widths, k, temperature) in enumerate(cases):
        lp, values, topk_ids, rule_ids = reference(full, k, temperature)
        ids, logprobs = results[0][i]
        for other in results[1:]:  # every rank the same, bit for bit
            assert torch.equal(other[i][0], ids) and torch.equal(other[i][1], logprobs)
        assert ids.dtype == torch.int64 and ids.shape == values.shape and logprobs.dtype == values.dtype
        assert torch.equal(ids, rule_ids), (i, widths, k)
        tiny = torch.finfo(values.dtype).eps * 8
        torch.testing.assert_close(logprobs, values, rtol=tiny, atol=tiny)
        torch.testing.assert_close(logprobs, lp.gather(-1, ids), rtol=tiny, atol=tiny)
        # torch.topk's set of ids where no tie straddles the k-th place.
        rows = full.reshape(-1, full.shape[-1]).shape[0]
        flat_lp, flat_ids, flat_topk = lp.reshape(rows, -1), ids.reshape(rows, -1), topk_ids.reshape(rows, -1)
        for r in range(rows):
            kth = flat_lp[r].sort(descending=True).values
            if k == flat_lp.shape[1] or kth[k - 1] != kth[k]:
                assert set(flat_ids[r].tolist()) == set(flat_topk[r].tolist()), (i, r)


def test_sharded_topk_without_group_is_log_softmax_topk():
    full = torch.randn(3, 4, 29, requires_grad=True)
    ids, logprobs = sharded_topk(full, 6, temperature=1.5)
    values, expected = torch.topk(torch.log_softmax(full / 1.5, dim=-1), 6)
    assert torch.equal(ids, expected) and torch.equal(logprobs, values) and not logprobs.requires_grad
    with pytest.raises(ValueError, match="k must be at most the vocabulary size 29, got 30"):
        sharded_topk(full, 30)
    with pytest.raises(ValueError, match="k must be a positive int"):
        sharded_topk(full, 0)
    with pytest.raises(ValueError, match="vocab_range"):
        sharded_topk(full, 2, vocab_range=(0, 29))


# ----------------------------------------------------------------------------------------------------------
# the writer

def _tp_writes(rank, world_size, folder, full, hidden, weight, bias, widths):
    ranges = _ranges(widths)
    start, end = ranges[rank]
    group = dist.group.WORLD
    path = os.path.join(folder, f"rank{rank}")  # rank 1 must not make its directory
    returned = []
    with TeacherCacheWriter(os.path.join(path, "topk"), k=6, temperature=2.0, process_group=group,
                            vocab_range=ranges[rank], shard_tokens=7) as w:
        returned.append(w.write(full[..., start:end], lengths=[5, 3, 4]))
        returned.append(w.write([full[0, :2, start:end], full[1, :0, start:end]], chunk_size=1))
        returned.append((w.num_sequences, w.num_tokens, w.vocab_size))
    with TeacherCacheWriter(os.path.join(path, "hidden"), k=9, logprob_dtype=torch.float32,
                            process_group=group, vocab_range=ranges[rank]) as w:
        returned.append(w.write_hidden(hidden, weight[start:end], bias[start:end], softcap=5.0, chunk_size=4))
    with TeacherCacheWriter(os.path.join(path, "sampled"), mode="sampled", samples=40, seed=3,
                            process_group=group, vocab_range=ranges[rank]) as w:
        returned.append(w.write(full[..., start:end], attention_mask=torch.ones(full.shape[:2], dtype=torch.long)))
    return returned, sorted(os.listdir(folder))


def _single_writes(folder, full, hidden, weight, bias):
    with TeacherCacheWriter(os.path.join(folder, "topk"), k=6, temperature=2.0, shard_tokens=7) as w:
        w.write(full, lengths=[5, 3, 4])
        w.write([full[0, :2], full[1, :0]])
    with TeacherCacheWriter(os.path.join(folder, "hidden"), k=9, logprob_dtype=torch.float32) as w:
        w.write_hidden(hidden, weight, bias, softcap=5.0)
    with TeacherCacheWriter(os.path.join(folder, "sampled"), mode="sampled", samples=40, seed=3) as w:
        w.write(full, attention_mask=torch.ones(full.shape[:2], dtype=torch.long))


def _assert_caches_equal(a, b, exact):
    a, b = TeacherCache(a, verify=True), TeacherCache(b, verify=True)
    assert len(a) == len(b) and a.settings["vocab_size"] == b.settings["vocab_size"]
    assert [s["tokens"] for s in a._content["shards"]] == [s["tokens"] for s in b._content["shards"]]
    for i in range(len(a)):
        (ia, la), (ib, lb) = a[i], b[i]
        assert torch.equal(ia, ib), i
        if exact:
            assert torch.equal(la, lb)
        else:  # the stored dtype's rounding of values a few float32 ulps apart
            torch.testing.assert_close(la.float(), lb.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("widths", [[25, 25], [31, 19]])
def test_tensor_parallel_write_equals_single_process_write(tmp_path, widths):
    g = torch.Generator().manual_seed(sum(widths[:1]))
    full = 3 * torch.randn(3, 5, 50, generator=g)
    hidden, weight, bias = torch.randn(2, 6, 8, generator=g), torch.randn(50, 8, generator=g), torch.randn(50)
    results = run_ranks(2, _tp_writes, str(tmp_path / "tp"), full, hidden, weight, bias, widths)
    _single_writes(str(tmp_path / "one"), full, hidden, weight, bias)
    (returned0, listing0), (returned1, listing1) = results
    assert returned0 == returned1 == [range(0, 3), range(3, 5), (5, 14, 50), range(0, 2), range(0, 3)]
    assert listing0 == listing1 == ["rank0"]  # rank 1 made nothing
    tp = tmp_path / "tp" / "rank0"
    _assert_caches_equal(tp / "topk", tmp_path / "one" / "topk", exact=False)
    _assert_caches_equal(tp / "hidden", tmp_path / "one" / "hidden", exact=False)
    _assert_caches_equal(tp / "sampled", tmp_path / "one" / "sampled", exact=True)


# ----------------------------------------------------------------------------------------------------------
# errors on every rank

def _gaps(rank, world_size):
    # Rank 1 claims [12, 20): a gap after rank 0's [0, 10).
    sharded_topk(torch.randn(2, 10 if rank == 0 else 8), 3, dist.group.WORLD,
                 vocab_range=(0, 10) if rank == 0 else (12, 20))


def _caught(rank, world_size, folder):
    errors = []
    calls = [
        lambda: sharded_topk(torch.randn(2, 5), 11, dist.group.WORLD),  # k above V = 10
        lambda: sharded_topk(torch.randn(2, 5 + rank), 2, dist.group.WORLD),  # unequal, no vocab_range
        lambda: sharded_topk(torch.randn(2 + rank, 5), 2, dist.group.WORLD),  # other tokens
        lambda: TeacherCacheWriter(os.path.join(folder, str(rank)), k=4 + rank, process_group=dist.group.WORLD),
    ]
    for call in calls:
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_mismatched_layout_raises_on_every_rank(tmp_path):
    with pytest.raises(RankError) as caught:
        run_ranks(2, _gaps)
    assert sorted(caught.value.errors) == [0, 1]
    for text in caught.value.errors.values():
        assert "ValueError" in text and "tile [0, V)" in text

    per_rank = run_ranks(2, _caught, str(tmp_path))
    assert per_rank[0] == per_rank[1]
    k_above, unequal, rows, settings = per_rank[0]
    assert "k must be at most the vocabulary size 10, got 11" in k_above
    assert "vocab_range" in unequal and "same tokens" in rows and "same settings" in settings
    assert not os.listdir(tmp_path)  # the writers stopped before rank 0 made its directory


def _tp_resume(rank, world_size, folder, full):
    group, half = dist.group.WORLD, full.shape[-1] // 2
    mine = full[..., rank * half:(rank + 1) * half]
    try:
        with TeacherCacheWriter(folder, k=3, process_group=group, shard_tokens=4) as w:
            w.write(mine[:2])
            raise KeyboardInterrupt  # the job dies after the first batch
    except KeyboardInterrupt:
        pass
    with TeacherCacheWriter(folder, k=3, process_group=group, shard_tokens=4, resume=True) as w:
        stored = w.num_sequences
        w.write(mine[stored:])
    try:  # rank 0 refuses the finished cache; every rank raises
        TeacherCacheWriter(folder, k=3, process_group=group)
    except Exception as e:
        return stored, f"{type(e).__name__}: {e}"


def test_tensor_parallel_resume_and_opening_errors(tmp_path):
    full = torch.randn(4, 3, 20, generator=torch.Generator().manual_seed(5))
    (stored0, error0), (stored1, error1) = run_ranks(2, _tp_resume, str(tmp_path / "tp"), full)
    assert stored0 == stored1 == 2
    assert error0.startswith("FileExistsError") and "already holds a finished teacher cache" in error0
    assert error1.startswith("TeacherCacheError") and "rank 0 of process_group could not open" in error1
    with TeacherCacheWriter(tmp_path / "one", k=3, shard_tokens=4) as w:
        w.write(full)
    _assert_caches_equal(tmp_path / "tp", tmp_path / "one", exact=False)
