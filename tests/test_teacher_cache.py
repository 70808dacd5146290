"""fastkd.teacher_cache: a round trip gives back exactly what the teacher's logits say, and nothing is lost or
read corrupted.

- top-k: ids and log-probs are `topk(log_softmax(z / T))`, bit for bit after the cast to the stored dtype;
  sampled: distinct ids with counts summing to n, log-probs `log(count / n)`, reproducible, independent of the
  batching, and distributed as the teacher says;
- `write_hidden` stores what `write` of its logits stores, without an N x V tensor;
- shards with sequences of every length, `collate`, DataLoader workers, pickling;
- a write killed by SIGKILL, an exception inside the `with` block and a failed index write leave an unfinished
  cache that the reader refuses and `resume=True` finishes into what an uninterrupted write gives;
- truncated, foreign, missing and corrupted files raise naming the file; overwrite and locking semantics;
- bytes per token, and argument validation.
"""
from __future__ import annotations

import math
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd import teacher_cache as tc
from fastkd.teacher_cache import TeacherCache, TeacherCacheError, TeacherCacheWriter, collate

REPO = Path(__file__).resolve().parent.parent
V = 50


def logits(b, s, v=V, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, s, v, generator=g)).to(dtype)


def items(cache):
    return [cache[i] for i in range(len(cache))]


def assert_same_items(a, b):
    assert len(a) == len(b)
    for (ia, la), (ib, lb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert la.dtype == lb.dtype and torch.equal(la, lb)


def topk_of(z, temperature, k, dtype):
    values, ids = torch.topk(torch.log_softmax(z.float() / temperature, dim=-1), k, dim=-1)
    return ids, values.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("logprob_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
def test_topk_round_trip_is_exact(tmp_path, logprob_dtype, logit_dtype):
    z = logits(3, 6, dtype=logit_dtype)
    lengths = [6, 1, 4]
    with TeacherCacheWriter(tmp_path / "c", k=7, temperature=0.7, logprob_dtype=logprob_dtype,
                            metadata={"teacher": "tiny"}) as w:
        assert w.write(z, lengths) == range(0, 3)
    cache = TeacherCache(tmp_path / "c")
    assert len(cache) == 3 and cache.lengths.tolist() == lengths and cache.num_tokens == 11
    for j, (ids, lp) in enumerate(items(cache)):
        want_ids, want_lp = topk_of(z[j, :lengths[j]], 0.7, 7, logprob_dtype)
        assert ids.dtype == torch.int64 and torch.equal(ids, want_ids)
        assert lp.dtype == logprob_dtype and torch.equal(lp, want_lp)
    assert (cache.mode, cache.k, cache.samples, cache.temperature, cache.vocab_size, cache.width) == \
        ("topk", 7, None, 0.7, V, 7)
    assert cache.logprob_dtype == logprob_dtype and cache.format_version == tc.FORMAT_VERSION
    assert cache.index_dtype == torch.uint16  # 50 ids fit
    assert cache.user_metadata == {"teacher": "tiny"} and cache.settings["created_by"].startswith("fastkd ")


def test_int32_ids_and_a_large_vocabulary(tmp_path):
    z = logits(2, 3, v=70000, scale=1.0)
    with TeacherCacheWriter(tmp_path / "c", k=4, logprob_dtype=torch.float32) as w:
        w.write(z)
    cache = TeacherCache(tmp_path / "c")
    assert cache.index_dtype == torch.int32
    for j, (ids, lp) in enumerate(items(cache)):
        want_ids, want_lp = topk_of(z[j], 1.0, 4, torch.float32)
        assert torch.equal(ids, want_ids) and torch.equal(lp, want_lp)


def write_sampled(path, z, lengths=None, seed=5, samples=12, batches=1, **kw):
    with TeacherCacheWriter(path, mode="sampled", samples=samples, seed=seed, temperature=1.5, **kw) as w:
        seqs = [z[j, :n] for j, n in enumerate(lengths or [z.shape[1]] * len(z))]
        for part in np.array_split(np.arange(len(seqs)), batches):
            w.write([seqs[j] for j in part])
    return TeacherCache(path)


def test_sampled_round_trip(tmp_path):
    z = logits(4, 9, scale=1.0)
    cache = write_sampled(tmp_path / "a", z, lengths=[9, 1, 5, 9])
    assert (cache.mode, cache.samples, cache.k, cache.width, cache.seed, cache.temperature) == \
        ("sampled", 12, None, 12, 5, 1.5)
    for j in range(len(cache)):
        ids, lp = cache[j]
        same_ids, counts = cache.counts(j)
        assert torch.equal(ids, same_ids) and (counts.sum(-1) == 12).all()
        used = counts > 0
        assert torch.equal(lp, torch.log(counts.double() / 12).to(torch.float16))
        assert (lp[~used] == -math.inf).all() and (ids[~used] == 0).all()
        for row_ids, row_used in zip(ids, used):
            kept = row_ids[row_used]
            assert len(kept.unique()) == len(kept) and (kept >= 0).all() and (kept < V).all()
    # The same seed draws the same, whatever the batching; another seed draws otherwise.
    assert_same_items(items(cache), items(write_sampled(tmp_path / "b", z, lengths=[9, 1, 5, 9], batches=3)))
    other = write_sampled(tmp_path / "c", z, lengths=[9, 1, 5, 9], seed=6)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(items(cache), items(other)))


def test_sampled_follows_the_teacher(tmp_path):
    """Over 300 tokens x 64 draws of one distribution at T = 2, each id's count is within 5 standard deviations
    of its expectation; ids of probability 0 (logit -inf) are never drawn."""
    row = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0, -math.inf, 0.5])
    z = row.expand(1, 300, 7).contiguous()
    with TeacherCacheWriter(tmp_path / "c", mode="sampled", samples=64, temperature=2.0, seed=1) as w:
        w.write(z)
    ids, counts = TeacherCache(tmp_path / "c").counts(0)
    totals = torch.zeros(7, dtype=torch.float64).scatter_add_(0, ids.flatten(), counts.flatten().double())
    p = torch.softmax(row.double() / 2.0, -1)
    expected = p * 300 * 64
    assert totals[5] == 0
    assert ((totals - expected).abs() <= 5 * (expected * (1 - p)).sqrt() + 1e-9).all(), (totals, expected)


def test_samples_beyond_the_vocabulary_use_at_most_v_slots(tmp_path):
    with TeacherCacheWriter(tmp_path / "c", mode="sampled", samples=300, vocab_size=5) as w:
        w.write(logits(1, 2, v=5))
    cache = TeacherCache(tmp_path / "c")
    assert cache.width == 5 and cache.settings["value_dtype"] == "uint16"
    assert (cache.counts(0)[1].sum(-1) == 300).all()


class CreatedTensors(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_write_hidden_equals_write_of_the_logits(tmp_path, mode):
    """Integer-valued hidden states and weights make exact logits whatever the order of the sums; a left-padded
    attention mask; chunks of 4 tokens, so no tensor of all tokens x V is made."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randint(-3, 4, (3, 8, 6), generator=g).float()
    weight = torch.randint(-3, 4, (V, 6), generator=g).float()
    bias = torch.randint(-3, 4, (V,), generator=g).float()
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :7] = 0
    size = {"k": 5} if mode == "topk" else {"samples": 9}
    with TeacherCacheWriter(tmp_path / "h", mode=mode, temperature=3.0, **size) as w, CreatedTensors() as seen:
        w.write_hidden(hidden, weight, bias, attention_mask=mask, chunk_size=4)
    assert seen.largest < 3 * 8 * V
    z = hidden @ weight.t() + bias
    with TeacherCacheWriter(tmp_path / "z", mode=mode, temperature=3.0, **size) as w:
        w.write(z, attention_mask=mask)
    hidden_cache = TeacherCache(tmp_path / "h")
    assert hidden_cache.lengths.tolist() == [8, 3, 1]
    assert_same_items(items(hidden_cache), items(TeacherCache(tmp_path / "z")))


def test_write_hidden_with_softcap_and_a_list(tmp_path):
    g = torch.Generator().manual_seed(4)
    hidden = [torch.randn(n, 6, generator=g) for n in (5, 1, 3)]
    weight = torch.randn(V, 6, generator=g)
    with TeacherCacheWriter(tmp_path / "c", k=6, logprob_dtype=torch.float32) as w:
        w.write_hidden(hidden, weight, softcap=2.0, chunk_size=2)
    for h, (ids, lp) in zip(hidden, items(TeacherCache(tmp_path / "c"))):
        want_ids, want_lp = topk_of(2.0 * torch.tanh(h @ weight.t() / 2.0), 1.0, 6, torch.float32)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(lp, want_lp)


def test_shards_never_split_a_sequence(tmp_path):
    z = logits(6, 7)
    lengths = [3, 1, 0, 7, 2, 5]
    with TeacherCacheWriter(tmp_path / "c", k=3, shard_tokens=5) as w:
        w.write(z[:3], lengths[:3])
        w.write(z[3:], lengths[3:], chunk_size=2)
    index = tc._load_json(tmp_path / "c" / tc.INDEX)
    assert [(s["tokens"], s["sequences"]) for s in index["shards"]] == [(4, 3), (7, 1), (2, 1), (5, 1)]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == \
        ["index.json"] + [f"shard-0000{i}.fkd" for i in range(4)]
    cache = TeacherCache(tmp_path / "c", verify=True)
    assert cache.lengths.tolist() == lengths
    for j, (ids, lp) in enumerate(items(cache)):
        assert torch.equal(ids, topk_of(z[j, :lengths[j]], 1.0, 3, torch.float16)[0])
    assert cache[-1][0].shape == (5, 3) and cache[2][0].shape == (0, 3) and cache[2][1].shape == (0, 3)


# ----------------------------------------------------------------------------------------------------------
# batches, workers

def test_collate_pads_with_unused_slots(tmp_path):
    with TeacherCacheWriter(tmp_path / "c", k=4) as w:
        w.write(logits(3, 5), [5, 2, 1])
    cache = TeacherCache(tmp_path / "c")
    batch = collate([cache[1], cache[0], cache[2]])
    assert batch.indices.shape == (3, 5, 4) and batch.logprobs.dtype == torch.float16
    assert batch.mask.tolist() == [[True] * 2 + [False] * 3, [True] * 5, [True] + [False] * 4]
    assert torch.equal(batch.indices[0, :2], cache[1][0]) and torch.equal(batch.logprobs[1], cache[0][1])
    assert (batch.indices[~batch.mask] == 0).all() and (batch.logprobs[~batch.mask] == -math.inf).all()
    indices, logprobs, mask = collate([cache[2]], pad_to=6)
    assert indices.shape == (1, 6, 4) and mask.sum() == 1
    with pytest.raises(ValueError, match="pad_to is 1, but a sequence of the batch has 5 tokens"):
        collate([cache[0]], pad_to=1)
    with pytest.raises(ValueError, match="non-empty list"):
        collate([])
    with pytest.raises(ValueError, match=r"batch\[1\] has indices"):
        collate([cache[0], (cache[1][0][:, :2], cache[1][1][:, :2])])


def test_dataloader_workers_and_pickling(tmp_path):
    with TeacherCacheWriter(tmp_path / "c", k=4, shard_tokens=8) as w:
        w.write(logits(6, 5), [5, 4, 3, 2, 1, 5])
    cache = TeacherCache(tmp_path / "c")
    cache[0]  # maps a shard here: the workers get none of it
    assert pickle.loads(pickle.dumps(cache))._maps == {}
    assert_same_items(items(pickle.loads(pickle.dumps(cache))), items(cache))
    loader = torch.utils.data.DataLoader(cache, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    want = [collate(items(cache)[j:j + 2]) for j in range(0, 6, 2)]
    for got, expected in zip(batches, want):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# interrupted writes

KILLED_WRITER = """
import os, signal, sys, torch
from fastkd.teacher_cache import TeacherCacheWriter
batches = torch.load(sys.argv[2])
w = TeacherCacheWriter(sys.argv[1], mode="sampled", samples=8, seed=5, shard_tokens=10)
for i, (z, lengths) in enumerate(batches):
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    w.write(z, lengths)
"""


def batches_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(logits(4, 6, seed=seed * 100 + i), torch.randint(1, 7, (4,), generator=g)) for i in range(n)]


def sequences_of(batches):
    return [z[j, :n] for z, lengths in batches for j, n in enumerate(lengths.tolist())]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_write_is_refused_then_resumed(tmp_path):
    batches = batches_of(5)
    torch.save(batches, tmp_path / "batches.pt")
    path = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), str(tmp_path / "batches.pt")],
                         cwd=REPO, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    names = {p.name for p in path.iterdir()}
    assert "index.json" not in names and "progress.json" in names
    assert any(name.endswith(".partial") for name in names)  # the open shard, cut off

    with pytest.raises(TeacherCacheError, match=f"{path}.*unfinished.*resume=True"):
        TeacherCache(path)
    with pytest.raises(TeacherCacheError, match=r"unfinished teacher cache \(\d+ shards, \d+ sequences recorded"):
        TeacherCacheWriter(path, mode="sampled", samples=8, seed=5)
    with pytest.raises(ValueError, match=r"seed=6 \(recorded: 5\)"):
        TeacherCacheWriter(path, mode="sampled", samples=8, seed=6, resume=True)

    sequences = sequences_of(batches)
    with TeacherCacheWriter(path, mode="sampled", samples=8, seed=5, shard_tokens=10, resume=True) as w:
        done = w.num_sequences
        assert 0 < done < 12 and not any(p.name.endswith(".partial") for p in path.iterdir())
        assert w.write(sequences[done:]) == range(done, len(sequences))
    with TeacherCacheWriter(tmp_path / "whole", mode="sampled", samples=8, seed=5) as w:
        for z, lengths in batches:
            w.write(z, lengths)
    assert_same_items(items(TeacherCache(path, verify=True)), items(TeacherCache(tmp_path / "whole")))


def test_an_exception_keeps_what_was_written(tmp_path):
    batches = batches_of(4, seed=1)
    path = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        with TeacherCacheWriter(path, k=5, shard_tokens=1000) as w:
            for z, lengths in batches[:2]:
                w.write(z, lengths)
            raise KeyboardInterrupt
    assert not (path / "index.json").exists()
    with TeacherCacheWriter(path, k=5, resume=True) as w:
        assert w.num_sequences == 8  # the open shard was closed, not lost
        for z, lengths in batches[2:]:
            w.write(z, lengths)
    with TeacherCacheWriter(tmp_path / "whole", k=5) as w:
        w.write(sequences_of(batches))
    assert_same_items(items(TeacherCache(path)), items(TeacherCache(tmp_path / "whole")))


def test_the_index_is_written_last(tmp_path, monkeypatch):
    real = tc._write_json_atomically

    def no_index(file, content):
        if file.name == tc.INDEX:
            raise OSError(28, "No space left on device")
        real(file, content)
    monkeypatch.setattr(tc, "_write_json_atomically", no_index)
    path = tmp_path / "c"
    with pytest.raises(OSError, match="No space"):
        with TeacherCacheWriter(path, k=3, shard_tokens=4) as w:
            w.write(logits(3, 3))
    with pytest.raises(TeacherCacheError, match="index.json is missing"):
        TeacherCache(path)
    monkeypatch.setattr(tc, "_write_json_atomically", real)
    with TeacherCacheWriter(path, k=3, resume=True) as w:
        assert w.num_sequences == 3
    assert len(TeacherCache(path)) == 3


def test_a_failed_batch_writes_nothing(tmp_path):
    z = logits(3, 4)
    z[2, 1, 7] = math.nan
    with TeacherCacheWriter(tmp_path / "c", k=3) as w:
        w.write(z[:1])
        with pytest.raises(ValueError, match=r"logits of sequence 3 \(the batch's 2, token 1\) are NaN"):
            w.write(z)
        assert w.num_sequences == 1
        z2 = logits(1, 2)
        z2[0, 0] = -math.inf
        with pytest.raises(ValueError, match="all -inf"):
            w.write(z2)
    with TeacherCacheWriter(tmp_path / "d", k=3) as w:
        with pytest.raises(ValueError, match="NaN"):
            w.write(z[2:])
        assert w.vocab_size is None  # a failed first batch settles nothing
        w.write(logits(1, 2, v=9))
    assert TeacherCache(tmp_path / "d").vocab_size == 9
    assert len(TeacherCache(tmp_path / "c")) == 1


# ----------------------------------------------------------------------------------------------------------
# damaged files

@pytest.fixture
def finished(tmp_path):
    path = tmp_path / "c"
    with TeacherCacheWriter(path, k=4, shard_tokens=6) as w:
        w.write(logits(4, 5))
    return path


def test_truncated_shard_names_the_file(finished):
    shard = finished / "shard-00001.fkd"
    shard.write_bytes(shard.read_bytes()[:-9])
    with pytest.raises(TeacherCacheError, match=f"{shard} is truncated"):
        TeacherCache(finished)


def test_foreign_files_name_the_file(finished, tmp_path):
    shard = finished / "shard-00000.fkd"
    size = shard.stat().st_size
    shard.write_bytes(np.random.default_rng(0).bytes(size))
    with pytest.raises(TeacherCacheError, match=f"{shard} is not a fastkd teacher cache shard"):
        TeacherCache(finished)
    # A whole shard of another cache (another k) in its place.
    with TeacherCacheWriter(tmp_path / "other", k=2, shard_tokens=6) as w:
        w.write(logits(4, 5))
    shard.write_bytes((tmp_path / "other" / "shard-00000.fkd").read_bytes())
    with pytest.raises(TeacherCacheError, match=f"{shard} does not match the cache's index: width 2 .index: 4."):
        TeacherCache(finished)
    (finished / "shard-00000.fkd").unlink()
    with pytest.raises(TeacherCacheError, match=f"{shard} is missing"):
        TeacherCache(finished)


def test_damaged_index_names_the_file(finished):
    index = finished / "index.json"
    text = index.read_text()
    index.write_text(text[:len(text) // 2])
    with pytest.raises(TeacherCacheError, match=f"{index} is not a valid teacher cache index"):
        TeacherCache(finished)
    index.write_text(text.replace('"version": 1', '"version": 2'))
    with pytest.raises(TeacherCacheError, match="format version 2; this fastkd reads version 1"):
        TeacherCache(finished)
    index.write_text('{"hello": 1}')
    with pytest.raises(TeacherCacheError, match="not a fastkd teacher cache index"):
        TeacherCache(finished)


def test_a_flipped_byte_is_found_by_verify(finished):
    shard = finished / "shard-00001.fkd"
    data = bytearray(shard.read_bytes())
    data[tc.HEADER_BYTES + 5] ^= 0x10
    shard.write_bytes(bytes(data))
    cache = TeacherCache(finished)  # the cheap checks pass: same size, same header
    with pytest.raises(TeacherCacheError, match=f"{shard} is corrupted: CRC-32"):
        cache.verify()
    with pytest.raises(TeacherCacheError, match=f"{shard} is corrupted"):
        TeacherCache(finished, verify=True)


def test_missing_or_unfinished_caches(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no teacher cache at {tmp_path / 'nowhere'}"):
        TeacherCache(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="index.json does not exist"):
        TeacherCache(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# overwrite, resume, lock

def test_overwrite_and_resume_semantics(finished):
    (finished / "README").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{finished} already holds a finished teacher cache.*overwrite=True"):
        TeacherCacheWriter(finished, k=4)
    with pytest.raises(FileExistsError, match="finished"):
        TeacherCacheWriter(finished, k=4, resume=True)
    with pytest.raises(ValueError, match="pass one"):
        TeacherCacheWriter(finished, k=4, resume=True, overwrite=True)
    with TeacherCacheWriter(finished, k=2, overwrite=True) as w:
        w.write(logits(1, 3))
    cache = TeacherCache(finished)
    assert len(cache) == 1 and cache.k == 2
    assert sorted(p.name for p in finished.iterdir()) == ["README", "index.json", "shard-00000.fkd"]


def test_resume_without_a_journal_starts_again(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    (path / "shard-00000.fkd.partial").write_bytes(b"half")
    with pytest.raises(TeacherCacheError, match="unfinished teacher cache: its write was interrupted"):
        TeacherCacheWriter(path, k=3)
    with TeacherCacheWriter(path, k=3, resume=True) as w:
        assert w.num_sequences == 0
        w.write(logits(2, 2))
    assert len(TeacherCache(path)) == 2 and not (path / "shard-00000.fkd.partial").exists()


def test_one_writer_at_a_time(tmp_path):
    pytest.importorskip("fcntl")
    with TeacherCacheWriter(tmp_path / "c", k=3) as w:
        with pytest.raises(TeacherCacheError, match="another TeacherCacheWriter is writing"):
            TeacherCacheWriter(tmp_path / "c", k=3, overwrite=True)
        w.write(logits(1, 2))
    assert len(TeacherCache(tmp_path / "c")) == 1


# ----------------------------------------------------------------------------------------------------------
# bytes per token

def test_bytes_per_token(tmp_path):
    llama3 = tc.storage_report(128256, k=64)
    assert (llama3.bytes_per_token, llama3.full_logits_bytes_per_token) == (64 * 4 + 64 * 2, 128256 * 2)
    assert llama3.ratio == pytest.approx(668.0) and "384 bytes per token against 256512" in str(llama3)
    sampled = tc.storage_report(128256, mode="sampled", samples=12)
    assert sampled.bytes_per_token == 12 * 4 + 12  # int32 ids, uint8 counts
    assert tc.storage_report(50257, k=64).bytes_per_token == 64 * 2 + 64 * 2  # uint16 ids
    # 6 bytes of ids, 2 to align the float32s, 12 of them
    assert tc.storage_report(50257, k=3, logprob_dtype=torch.float32).bytes_per_token == 20
    assert tc.storage_report(100, k=4, full_dtype=torch.float32).full_logits_bytes_per_token == 400

    with TeacherCacheWriter(tmp_path / "c", k=4, vocab_size=V) as w:
        assert w.storage().bytes_per_token == 16
        w.write(logits(2, 50))
    report = TeacherCache(tmp_path / "c").storage()
    assert report.bytes_per_token == 16 and 16 < report.on_disk_bytes_per_token < 40


# ----------------------------------------------------------------------------------------------------------
# validation

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="dense", k=3), ValueError, r"mode must be one of \('topk', 'sampled'\)"),
    (dict(), ValueError, "k is required with mode='topk'"),
    (dict(k=3, samples=4), ValueError, "samples is for mode='sampled'"),
    (dict(mode="sampled"), ValueError, "samples is required"),
    (dict(mode="sampled", samples=4, k=3), ValueError, "k is for mode='topk'"),
    (dict(k=0), ValueError, "k must be at least 1, got 0"),
    (dict(k=2.0), TypeError, "k must be an int, got float"),
    (dict(k=3, temperature=0.0), ValueError, "temperature must be positive"),
    (dict(k=3, logprob_dtype=torch.float64), TypeError, "logprob_dtype must be"),
    (dict(k=3, index_dtype=torch.int64), TypeError, "index_dtype must be"),
    (dict(k=3, index_dtype=torch.uint16, vocab_size=70000), ValueError, "index_dtype=torch.uint16 holds ids below"),
    (dict(k=60, vocab_size=50), ValueError, "k must be at most vocab_size 50, got 60"),
    (dict(k=3, seed="1"), TypeError, "seed must be an int"),
    (dict(k=3, shard_tokens=0), ValueError, "shard_tokens must be at least 1"),
    (dict(k=3, metadata={"f": object()}), TypeError, "metadata must be JSON-serialisable"),
    (dict(k=3, metadata=[1]), TypeError, "metadata must be a dict"),
])
def test_writer_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        TeacherCacheWriter(tmp_path / "c", **kwargs)


def test_write_arguments(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        TeacherCacheWriter(tmp_path / "file", k=3)
    z = logits(2, 4)
    w = TeacherCacheWriter(tmp_path / "c", k=3)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        w.write(z.long())
    with pytest.raises(ValueError, match=r"logits must be a batch \(B, S, V\)"):
        w.write(z[0])
    with pytest.raises(TypeError, match="logits must be a tensor .* or a list"):
        w.write("z")
    with pytest.raises(ValueError, match=r"lengths must hold one count per sequence \(2\), got 3"):
        w.write(z, [1, 2, 3])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        w.write(z, [1, 5])
    with pytest.raises(TypeError, match="lengths must be"):
        w.write(z, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="not both"):
        w.write(z, [1, 2], attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of shape \(2, 4\)"):
        w.write(z, attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="attention_mask must be a bool or integer tensor"):
        w.write(z, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="a list of logits gives each sequence as it is"):
        w.write([z[0]], [4])
    with pytest.raises(ValueError, match=r"logits\[1\] has shape"):
        w.write([z[0], z[1, :, :7]])
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        w.write(z, chunk_size=0)
    w.write(z)
    with pytest.raises(ValueError, match="vocabulary is 51 in this batch, 50 in the cache"):
        w.write(logits(1, 2, v=51))
    with pytest.raises(ValueError, match=r"weight must be the output layer \(V, H\)"):
        w.write_hidden(torch.randn(1, 2, 4), torch.randn(4))
    with pytest.raises(ValueError, match="hidden has 4 features and weight 5"):
        w.write_hidden(torch.randn(1, 2, 4), torch.randn(V, 5))
    with pytest.raises(ValueError, match=r"bias must have shape \(50,\)"):
        w.write_hidden(torch.randn(1, 2, 4), torch.randn(V, 4), torch.randn(3))
    w.close()
    w.close()
    with pytest.raises(RuntimeError, match="is closed"):
        w.write(z)
    cache = TeacherCache(tmp_path / "c")
    with pytest.raises(IndexError, match="sequence 2 out of range"):
        cache[2]
    with pytest.raises(ValueError, match="counts.. is for a sampled cache"):
        cache.counts(0)
    with pytest.raises(ValueError, match="vocabulary is unknown"):
        with TeacherCacheWriter(tmp_path / "empty", k=3):
            pass


def test_a_non_contiguous_batch(tmp_path):
    z = logits(5, 3)  # read as (3, 5, V) through a transpose: a batch that is not contiguous
    with TeacherCacheWriter(tmp_path / "c", k=4) as w:
        w.write(z.transpose(0, 1), [5, 2, 4], chunk_size=3)
    for j, (ids, lp) in enumerate(items(TeacherCache(tmp_path / "c"))):
        want_ids, want_lp = topk_of(z[:[5, 2, 4][j], j], 1.0, 4, torch.float16)
        assert torch.equal(ids, want_ids) and torch.equal(lp, want_lp)
