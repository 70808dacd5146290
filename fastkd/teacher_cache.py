"""A teacher cache on disk: the teacher's sparse distribution per token, written once, read by every epoch.

Distilling from a cache instead of a live teacher needs, per token, the few ids that carry the teacher's mass:
- `mode="topk"`: the `k` largest ids of `log_softmax(logits / T)` and their log-probs, normalised over the
  teacher's full vocabulary (computed in float32, or float64 for float64 logits, then rounded once to
  `logprob_dtype`), so the tail mass `1 - sum exp(logprobs)` stays known (`sparse_kd_loss(..., tail="bucket")`);
- `mode="sampled"`: `n` ids drawn per token from `softmax(logits / T)` with replacement (random-sampling KD,
  Anshumann et al. 2025), duplicates merged: the distinct ids and their counts, read back as the log-probs
  `log(count / n)` (use `tail="renormalize"`). Unused slots hold id 0 and count 0 (log-prob -inf).

`TeacherCacheWriter` takes the teacher's logits, or its hidden states and output layer (`write_hidden`, logits
made by chunks of tokens, never all at once), batch by batch; `TeacherCache` is a `torch.utils.data.Dataset` of
per-sequence `(indices, logprobs)`; `collate` pads a list of them into a batch. A tensor-parallel teacher (its vocabulary split over
the ranks of a `process_group`) writes with every rank passing its slice: the top-k and the draws are those of
the whole vocabulary (`fastkd.distributed.topk`), and only rank 0 of the group writes files. `storage_report` gives the bytes
per token against full logits (`V = 128256, k = 64`: 384 bytes against 256512 for bfloat16 logits, 668x less).

Files of a cache directory
- `shard-00000.fkd`, `shard-00001.fkd`, ...: the data. A sequence is never split; a shard is closed when the
  next sequence would take it past `shard_tokens` (a longer sequence gets a shard of its own). Each shard is
    header   64 bytes, little-endian: magic b"FASTKDTC" | format version u16 | header size u16 (64) |
             width u32 (slots per token) | record size u32 | offset of the values in a record u32 |
             tokens u64 | sequences u64 | id dtype 8 ASCII bytes | value dtype 8 ASCII bytes | 8 zero bytes
    records  `tokens` records of `record size` bytes: `width` ids, then (at the values offset) `width`
             values, padded to a multiple of the wider item; ids are "int32" or "uint16", values are the
             log-probs ("float16", "bfloat16" as its raw 16 bits, "float32") or the counts ("uint8",
             "uint16", "int32"); `numpy.memmap(file, dtype=<record dtype>, offset=64, shape=(tokens,))`
    lengths  `sequences` little-endian u64: the token count of each sequence of the shard, in order
  A shard is written as `shard-XXXXX.fkd.partial`, its header filled in last, fsynced and renamed: a file under
  its final name is always whole.
- `progress.json`: the journal of an unfinished write (settings, and each closed shard's tokens, sequences,
  size and CRC-32), replaced atomically after every shard, removed once the index is written.
- `index.json`: the same as the journal for a finished cache; written last, atomically (temporary file, fsync,
  `os.replace`, fsync of the directory). A directory without it is an unfinished cache, never read as a
  finished one.

What is checked
- Always, when a cache is opened (a few bytes per shard): the index is a fastkd teacher cache of a known
  version, every shard exists, has the size its header and the index say, and its header (magic, version,
  dtypes, width, counts) agrees with the index; a truncated or foreign file raises `TeacherCacheError` naming it.
- On demand (`verify=True`, `TeacherCache.verify()`; reads every byte): each shard's CRC-32 against the index.
  A flipped bit inside the records passes the cheap checks; it costs a full read to find, so it is not done on
  every open. CRC-32 finds accidental damage, not deliberate tampering.

An interrupted write (crash, kill, exception) leaves the closed shards and the journal:
`TeacherCacheWriter(path, resume=True, <same settings>)` keeps them, deletes what was not recorded, and says in
`num_sequences` how many sequences are stored, so the caller skips them and writes the rest; the result equals
an uninterrupted write (sampled ids are drawn from a generator seeded per sequence, so they do not depend on
batching, chunking or resumption). Opening such a directory otherwise raises, saying how to resume or
`overwrite=True`. An exception inside the `with` block closes the sequences already written as a shard first.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from . import __version__
from . import _checks as checks

__all__ = ["TeacherCacheWriter", "TeacherCache", "TeacherBatch", "TeacherCacheError", "StorageReport", "collate",
           "storage_report", "FORMAT_VERSION"]

FORMAT = "fastkd.teacher_cache"
FORMAT_VERSION = 1
MODES = ("topk", "sampled")
INDEX = "index.json"
PROGRESS = "progress.json"
LOCK = ".writer.lock"
MAGIC = b"FASTKDTC"
_HEADER = struct.Struct("<8sHHIIIQQ8s8s8x")
HEADER_BYTES = _HEADER.size  # 64
_SHARD_NAME = re.compile(r"shard-(\d{5,})\.fkd(\.partial)?$")

# dtype name (as in the index and the shard headers) -> little-endian numpy dtype of the bytes on disk.
_NUMPY = {"int32": "<i4", "uint16": "<u2", "uint8": "u1", "float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}
_LOGPROB_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_INDEX_DTYPES = {torch.int32: "int32", torch.uint16: "uint16"}
_TORCH = {name: dtype for dtype, name in {**_LOGPROB_DTYPES, **_INDEX_DTYPES}.items()}

# Rows of float32 logits made at once by `write` (64 MB), unless chunk_size says otherwise.
_CHUNK_ELEMENTS = 1 << 24
_READ_BLOCK = 1 << 24


class TeacherCacheError(RuntimeError):
    """A cache directory that cannot be used as asked: unfinished, truncated, foreign or corrupted, or being
    written by another writer. The message names the file and says what to do."""


# ----------------------------------------------------------------------------------------------------------
# layout

@dataclass(frozen=True)
class _Layout:
    """The settings that fix the bytes on disk, once the vocabulary is known."""
    mode: str
    width: int
    index_dtype: str
    value_dtype: str

    @property
    def values_offset(self) -> int:
        item = np.dtype(_NUMPY[self.value_dtype]).itemsize
        return _round_up(self.width * np.dtype(_NUMPY[self.index_dtype]).itemsize, item)

    @property
    def record_bytes(self) -> int:
        items = (np.dtype(_NUMPY[self.index_dtype]).itemsize, np.dtype(_NUMPY[self.value_dtype]).itemsize)
        return _round_up(self.values_offset + self.width * items[1], max(items))

    @property
    def record_dtype(self) -> np.dtype:
        return np.dtype({"names": ["ids", "values"],
                         "formats": [(_NUMPY[self.index_dtype], (self.width,)),
                                     (_NUMPY[self.value_dtype], (self.width,))],
                         "offsets": [0, self.values_offset], "itemsize": self.record_bytes})


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _count_dtype(samples: int) -> str:
    return "uint8" if samples <= 0xFF else "uint16" if samples <= 0xFFFF else "int32"


def _auto_index_dtype(vocab_size: int) -> str:
    # Half the id bytes for the vocabularies that allow it (GPT-2's 50257, Llama 2's 32000).
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def _layout(mode: str, k: int | None, samples: int | None, vocab_size: int, index_dtype: str | None,
            logprob_dtype: str) -> _Layout:
    ids = index_dtype or _auto_index_dtype(vocab_size)
    if mode == "topk":
        return _Layout(mode, k, ids, logprob_dtype)
    return _Layout(mode, min(samples, vocab_size), ids, _count_dtype(samples))


# ----------------------------------------------------------------------------------------------------------
# bytes per token

@dataclass(frozen=True)
class StorageReport:
    """Bytes per token of a cache against the teacher's full logits.

    bytes_per_token: one token's record (ids and values, with alignment padding).
    full_logits_bytes_per_token: `vocab_size` logits in `full_dtype`.
    on_disk_bytes_per_token: every file of an open cache (headers, sequence lengths, index) over its tokens;
        None where nothing is written yet.
    """
    vocab_size: int
    bytes_per_token: int
    full_logits_bytes_per_token: int
    full_dtype: torch.dtype
    on_disk_bytes_per_token: float | None = None

    @property
    def ratio(self) -> float:
        """How many times smaller than the full logits."""
        return self.full_logits_bytes_per_token / self.bytes_per_token

    def __str__(self) -> str:
        disk = "" if self.on_disk_bytes_per_token is None else \
            f" ({self.on_disk_bytes_per_token:.1f} on disk with headers and index)"
        return (f"{self.bytes_per_token} bytes per token{disk} against {self.full_logits_bytes_per_token} for full "
                f"{str(self.full_dtype).replace('torch.', '')} logits over {self.vocab_size} ids: "
                f"{self.ratio:.1f}x smaller")


def storage_report(vocab_size: int, *, mode: str = "topk", k: int | None = None, samples: int | None = None,
                   logprob_dtype: torch.dtype = torch.float16, index_dtype: torch.dtype | None = None,
                   full_dtype: torch.dtype = torch.bfloat16) -> StorageReport:
    """The bytes per token a cache with these settings stores, against full logits in `full_dtype` (the
    teacher's usual bfloat16), without writing anything."""
    checks.check_choice("mode", mode, MODES)
    vocab_size = _positive_int("vocab_size", vocab_size)
    k, samples = _mode_sizes(mode, k, samples)
    layout = _layout(mode, k, samples, vocab_size, _index_dtype_name(index_dtype, vocab_size),
                     _logprob_dtype_name(logprob_dtype))
    return _report(layout, vocab_size, full_dtype)


def _report(layout: _Layout, vocab_size: int, full_dtype: torch.dtype, on_disk: float | None = None):
    if not isinstance(full_dtype, torch.dtype) or not full_dtype.is_floating_point:
        raise TypeError(f"full_dtype must be a floating torch.dtype, got {full_dtype!r}")
    return StorageReport(vocab_size, layout.record_bytes, vocab_size * full_dtype.itemsize, full_dtype, on_disk)


# ----------------------------------------------------------------------------------------------------------
# argument checks

def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _mode_sizes(mode: str, k: object, samples: object) -> tuple[int | None, int | None]:
    if mode == "topk":
        if samples is not None:
            raise ValueError("samples is for mode='sampled'; mode='topk' keeps the k largest ids (pass k)")
        if k is None:
            raise ValueError("k is required with mode='topk': how many of the largest ids to keep per token")
        return _positive_int("k", k), None
    if k is not None:
        raise ValueError("k is for mode='topk'; mode='sampled' draws `samples` ids per token (pass samples)")
    if samples is None:
        raise ValueError("samples is required with mode='sampled': how many ids to draw per token")
    return None, _positive_int("samples", samples)


def _logprob_dtype_name(dtype: object) -> str:
    if dtype not in _LOGPROB_DTYPES:
        raise TypeError(f"logprob_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    return _LOGPROB_DTYPES[dtype]


def _index_dtype_name(dtype: object, vocab_size: int | None) -> str | None:
    if dtype is None:
        return None
    if dtype not in _INDEX_DTYPES:
        raise TypeError(f"index_dtype must be None (uint16 when the vocabulary fits, else int32), torch.int32 or "
                        f"torch.uint16, got {dtype!r}")
    if dtype == torch.uint16 and vocab_size is not None and vocab_size > 1 << 16:
        raise ValueError(f"index_dtype=torch.uint16 holds ids below 65536, but vocab_size is {vocab_size}")
    return _INDEX_DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------
# files

def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; a no-op where directories cannot be opened (Windows)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without directory fsync
            raise
    finally:
        os.close(fd)


def _write_json_atomically(path: Path, content: dict) -> None:
    """Readers see the old file or the new one, never a part: write beside it, fsync, rename, fsync the dir."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.fkd"


def _own_files(path: Path) -> list[Path]:
    """The files a writer makes (other files in the directory are left alone)."""
    names = {INDEX, PROGRESS, INDEX + ".tmp", PROGRESS + ".tmp"}
    return sorted(p for p in path.iterdir() if p.name in names or _SHARD_NAME.match(p.name))


def _read_header(file: Path, layout: _Layout, tokens: int, sequences: int, size: int | None = None) -> None:
    """The cheap check of a shard: its size, magic, version and fields against what the index says."""
    try:
        actual = file.stat().st_size
    except FileNotFoundError:
        raise TeacherCacheError(f"teacher cache shard {file} is missing (listed in the index)") from None
    with open(file, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise TeacherCacheError(f"{file} is not a fastkd teacher cache shard (no {MAGIC!r} magic at its start): a "
                                f"foreign or overwritten file")
    magic, version, header, width, record, values_at, n_tokens, n_sequences, ids, values = _HEADER.unpack(raw)
    if version != FORMAT_VERSION or header != HEADER_BYTES:
        raise TeacherCacheError(f"{file} is a teacher cache shard of format version {version}; this fastkd reads "
                                f"version {FORMAT_VERSION}")
    want = (layout.width, layout.record_bytes, layout.values_offset, tokens, sequences,
            layout.index_dtype, layout.value_dtype)
    got = (width, record, values_at, n_tokens, n_sequences, ids.rstrip(b"\0").decode("ascii", "replace"),
           values.rstrip(b"\0").decode("ascii", "replace"))
    if got != want:
        fields = ("width", "record bytes", "values offset", "tokens", "sequences", "id dtype", "value dtype")
        diff = ", ".join(f"{name} {g} (index: {w})" for name, g, w in zip(fields, got, want) if g != w)
        raise TeacherCacheError(f"{file} does not match the cache's index: {diff}; it belongs to another cache")
    expected = HEADER_BYTES + tokens * layout.record_bytes + 8 * sequences
    if actual != expected or (size is not None and size != expected):
        state = "truncated" if actual < expected else "longer than its header says"
        raise TeacherCacheError(f"{file} is {state}: {actual} bytes, expected {expected} ({tokens} tokens of "
                                f"{layout.record_bytes} bytes and {sequences} sequence lengths after a "
                                f"{HEADER_BYTES}-byte header)")


def _read_lengths(file: Path, layout: _Layout, tokens: int, sequences: int) -> np.ndarray:
    lengths = np.fromfile(file, dtype="<u8", count=sequences, offset=HEADER_BYTES + tokens * layout.record_bytes)
    if int(lengths.sum()) != tokens:
        raise TeacherCacheError(f"{file} is corrupted: its sequence lengths sum to {int(lengths.sum())}, its header "
                                f"says {tokens} tokens")
    return lengths.astype(np.int64)


def _crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        f.seek(HEADER_BYTES)
        while block := f.read(_READ_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _load_json(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TeacherCacheError(f"{file} is not a valid teacher cache index: {e}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise TeacherCacheError(f"{file} is not a fastkd teacher cache index (no \"format\": \"{FORMAT}\")")
    if content.get("version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{file} is a teacher cache of format version {content.get('version')}; this fastkd "
                                f"reads version {FORMAT_VERSION}")
    return content


def _layout_of(settings: dict) -> _Layout:
    return _Layout(settings["mode"], settings["width"], settings["index_dtype"], settings["value_dtype"])


def _shard_lengths(path: Path, content: dict, source: Path) -> tuple[_Layout, list[np.ndarray]]:
    """Each listed shard checked cheaply, and its sequence lengths."""
    try:
        layout = _layout_of(content["settings"])
        shards = [(s["file"], int(s["tokens"]), int(s["sequences"]), int(s["bytes"]), int(s["crc32"]))
                  for s in content["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherCacheError(f"{source} is not a valid teacher cache index: missing or bad field {e}") from None
    lengths = []
    for name, tokens, sequences, size, _ in shards:
        _read_header(path / name, layout, tokens, sequences, size)
        lengths.append(_read_lengths(path / name, layout, tokens, sequences))
    return layout, lengths


def _sequence_seed(seed: int, sequence: int) -> int:
    """A generator seed for one sequence, so that what is drawn for it does not depend on the batches."""
    digest = hashlib.blake2b(f"{seed}:{sequence}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------------
# the teacher's rows

def _topk_rows(z: Tensor, temperature: float, k: int) -> tuple[Tensor, Tensor]:
    lp = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)) / temperature, dim=-1)
    values, ids = torch.topk(lp, k, dim=-1)
    return ids, values


def _sampled_rows(z: Tensor, temperature: float, samples: int, width: int, u: Tensor) -> tuple[Tensor, Tensor]:
    """`samples` ids per row drawn with replacement by inverting the CDF at the uniforms `u (rows, samples)`, and
    merged: the distinct ids in increasing order and their counts (slots past them hold id 0 and count 0); and
    each row's probability total, NaN where the logits are not usable."""
    p = torch.softmax(z.to(torch.promote_types(z.dtype, torch.float32)) / temperature, dim=-1)
    # A float64 CDF: a float32 one over 10^5 ids misplaces the tail ids by its rounding.
    cdf = torch.cumsum(p, dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u * total, right=True).clamp_(max=z.shape[-1] - 1)
    return _merged(drawn, width) + (total.squeeze(1),)


def _sharded_sampled_rows(z: Tensor, temperature: float, width: int, u: Tensor, group,
                          vocab_range) -> tuple[Tensor, Tensor, Tensor]:
    """`_sampled_rows` of a vocabulary split over the ranks of `group` (`fastkd.distributed.layout`), every rank
    getting the same result. The CDF of the whole row is the ranks' CDFs end to end, in rank order: with the
    global row maximum `m` and each rank's mass `e_r = sum exp(z / T - m)` over its slice (all-gathered, W
    numbers per row), a draw `x = u * sum_r e_r` belongs to the rank r with `sum_{q<r} e_q <= x < sum_{q<=r} e_q`
    and is found there in the rank's own CDF at `x - sum_{q<r} e_q`; the drawn ids are combined by a max
    all-reduce (-1 where a rank does not own the draw). The ids are those one process draws from the whole
    logits but for the rounding of the CDF: a draw within ~1e-7 of the boundary between two ids may fall on
    the other one (the CDF is of unnormalised masses here, normalised there)."""
    import torch.distributed as dist
    from .distributed.collectives import max_over_ranks, rank, world_size
    from .distributed.layout import vocab_slice
    rows, local = z.shape
    where = vocab_slice(group, local, vocab_range, rows, z.device)
    x = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    m = max_over_ranks(x.amax(-1) if local else x.new_full((rows,), -math.inf), group)
    cdf = torch.cumsum(torch.exp(x - m[:, None]), dim=-1, dtype=torch.float64)
    mass = cdf[:, -1].contiguous() if local else cdf.new_zeros(rows)
    masses = [torch.empty_like(mass) for _ in range(world_size(group))]
    dist.all_gather(masses, mass, group=group)
    ends = torch.cumsum(torch.stack(masses, dim=1), dim=1)  # (rows, W): where each rank's mass ends
    total = ends[:, -1:]
    point = u * total
    owner = torch.searchsorted(ends, point, right=True)
    # `point` may round up to the total: it then belongs to the last rank with any mass.
    last = torch.where(torch.stack(masses, dim=1) > 0, torch.arange(len(masses), device=z.device), 0).amax(1)
    owner = torch.minimum(owner, last[:, None])
    me = rank(group)
    drawn = torch.full_like(owner, -1)
    if local:
        before = ends[:, me - 1:me] if me else torch.zeros_like(total)
        found = torch.searchsorted(cdf, point - before, right=True).clamp_(max=local - 1) + where.start
        drawn = torch.where(owner == me, found, drawn)
    dist.all_reduce(drawn, op=dist.ReduceOp.MAX, group=group)
    return _merged(drawn, width) + (total.squeeze(1),)


def _merged(drawn: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The distinct ids of each row of draws, in increasing order, and their counts, in `width` slots."""
    drawn, _ = torch.sort(drawn, dim=-1)
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = torch.cumsum(new, dim=-1) - 1
    ids = torch.zeros_like(drawn).scatter_(1, slot, drawn)
    counts = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    return ids[:, :width], counts[:, :width]


def _bad_rows(values: Tensor) -> Tensor:
    """Rows whose log-probs are NaN: a NaN or +inf logit, or every logit -inf (the row's log-sum-exp is NaN)."""
    return torch.isnan(values).any(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# the writer

class TeacherCacheWriter:
    """Write a teacher cache (module docstring) batch by batch; use it as a context manager.

    path: the cache directory (made if missing).
    mode: "topk" (the `k` largest ids and their log-probs) or "sampled" (`samples` ids drawn per token, merged
        into distinct ids and counts).
    k, samples: the one `mode` needs.
    temperature: the log-probs are those of `softmax(logits / temperature)`; recorded in the index.
    logprob_dtype: float16 (default), bfloat16 or float32: the stored top-k log-probs (sampled mode stores exact
        counts; this is then the dtype `TeacherCache` gives their log-probs in).
    index_dtype: None (uint16 when the vocabulary has at most 65536 ids, else int32), torch.int32 or torch.uint16.
    vocab_size: the teacher's vocabulary; None takes it from the first batch. Every batch must have it.
    seed: the sampled mode's seed (each sequence's draws come from a generator seeded by it and the sequence's
        number); ignored by top-k.
    shard_tokens: tokens per shard before it is closed (a sequence is never split); at most this much work is
        lost by a crash.
    metadata: a JSON-serialisable dict stored in the index (the teacher's name, the dataset);
        `TeacherCache.user_metadata`.
    resume: continue an interrupted write with the same settings (`num_sequences` says how many are stored);
        starts a new cache where there is none.
    overwrite: delete the cache already at `path` (its files only) and start again.
    process_group: a tensor-parallel teacher whose vocabulary is split over the ranks of this group
        (`fastkd.distributed.layout`): every rank makes a writer with the same arguments and calls `write` with
        the same tokens and its slice of the logits `(..., V_local)` (or `write_hidden` with its rows of the
        output weight `(V_local, H)` and bias); the top-k is `fastkd.distributed.topk.sharded_topk`, the
        sampled ids are drawn from the whole vocabulary's CDF (`_sharded_sampled_rows`). Only rank 0 of the
        group touches `path` (the directory, its lock, the shards, the index); the other ranks compute, take
        part in the collectives and keep the same `num_sequences`, but write nothing. The constructor, `write`
        and `write_hidden` are collective calls of the group. `vocab_size` is the whole vocabulary.
    vocab_range: `(start, end)`, this rank's slice of the vocabulary; None: equal slices in rank order.

    `write`/`write_hidden` return the range of sequence numbers they stored. `close()` (the end of the `with`
    block) writes the index; without it the directory stays an unfinished cache.
    """

    def __init__(self, path: str | os.PathLike, *, mode: str = "topk", k: int | None = None,
                 samples: int | None = None, temperature: float = 1.0,
                 logprob_dtype: torch.dtype = torch.float16, index_dtype: torch.dtype | None = None,
                 vocab_size: int | None = None, seed: int = 0, shard_tokens: int = 1 << 20,
                 metadata: dict | None = None, resume: bool = False, overwrite: bool = False,
                 process_group=None, vocab_range: tuple[int, int] | None = None):
        checks.check_choice("mode", mode, MODES)
        k, samples = _mode_sizes(mode, k, samples)
        temperature = checks.check_positive("temperature", temperature)
        if vocab_size is not None:
            vocab_size = _positive_int("vocab_size", vocab_size)
        if mode == "topk" and vocab_size is not None and k > vocab_size:
            raise ValueError(f"k must be at most vocab_size {vocab_size}, got {k}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
            try:
                metadata = json.loads(json.dumps(metadata))
            except (TypeError, ValueError) as e:
                raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
        if resume and overwrite:
            raise ValueError("resume=True continues the cache at path and overwrite=True deletes it: pass one")
        if process_group is None and vocab_range is not None:
            raise ValueError("vocab_range is for a vocabulary split over a process_group; pass process_group too")
        if process_group is not None:
            from .distributed.layout import check_group
            check_group(process_group)
        self.process_group, self.vocab_range = process_group, vocab_range
        # Only rank 0 of a tensor-parallel group touches the files (class docstring).
        self._writes = process_group is None or torch.distributed.get_rank(process_group) == 0
        self.path = Path(path)
        self.mode, self.k, self.samples, self.temperature = mode, k, samples, temperature
        self.seed = int(seed)
        self.shard_tokens = _positive_int("shard_tokens", shard_tokens)
        self.metadata = metadata
        self._logprob_dtype = _logprob_dtype_name(logprob_dtype)
        self._index_dtype = _index_dtype_name(index_dtype, vocab_size)
        self.vocab_size = vocab_size
        self._layout = None
        if vocab_size is not None:
            self._adopt(self._plan(vocab_size), vocab_size)
        self._shards: list[dict] = []
        self.num_sequences = 0
        self.num_tokens = 0
        self._file = None
        self._closed = False
        self._lock = None
        if process_group is None:
            self._open(resume, overwrite)
        else:
            self._open_on_rank_zero(resume, overwrite)

    # -- opening ------------------------------------------------------------------------------------------

    def _open(self, resume: bool, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"path {self.path} is a file; a teacher cache is a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._open_directory(resume, overwrite)
        except BaseException:
            self._release_lock()
            raise

    def _open_on_rank_zero(self, resume: bool, overwrite: bool) -> None:
        """The ranks first check that they compute the same thing (a different k or temperature would make
        collectives of different shapes later), then rank 0 opens the directory and tells the others what it
        holds (a resumed cache's sequences and vocabulary), or that it failed: every rank raises then."""
        import torch.distributed as dist
        group = self.process_group
        mine = {"mode": self.mode, "k": self.k, "samples": self.samples, "temperature": self.temperature,
                "seed": self.seed, "vocab_size": self.vocab_size}
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        differ = [f"rank {r}: {theirs}" for r, theirs in enumerate(every) if theirs != every[0]]
        if differ:
            raise ValueError(f"every rank of process_group must make its TeacherCacheWriter with the same settings; "
                             f"rank 0: {every[0]}, {'; '.join(differ)}")
        state, error = [None], None
        if self._writes:
            try:
                self._open(resume, overwrite)
            except Exception as e:
                error = e
            state[0] = {"error": None if error is None else f"{type(error).__name__}: {error}",
                        "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
                        "vocab_size": self.vocab_size, "index_dtype": self._index_dtype}
        dist.broadcast_object_list(state, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        if error is not None:
            raise error
        state = state[0]
        if state["error"] is not None:
            raise TeacherCacheError(f"rank 0 of process_group could not open the teacher cache at {self.path}: "
                                    f"{state['error']}")
        if not self._writes:
            self._index_dtype = state["index_dtype"]
            if state["vocab_size"] is not None:
                self._adopt(self._plan(state["vocab_size"]), state["vocab_size"])
            self.num_sequences, self.num_tokens = state["num_sequences"], state["num_tokens"]

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): one writer per directory is then the caller's rule
            return
        self._lock = open(self.path / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock.close()
            self._lock = None
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise TeacherCacheError(f"another TeacherCacheWriter is writing {self.path}") from None
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _open_directory(self, resume: bool, overwrite: bool) -> None:
        index, progress = self.path / INDEX, self.path / PROGRESS
        if overwrite:
            # The index goes first: a crash while deleting leaves an unfinished cache, never a finished one with
            # shards missing.
            for file in [index] + [f for f in _own_files(self.path) if f != index]:
                file.unlink(missing_ok=True)
            _fsync_dir(self.path)
            return
        if index.exists():
            raise FileExistsError(f"{self.path} already holds a finished teacher cache ({index}); pass "
                                  f"overwrite=True to replace it, or read it with TeacherCache")
        stray = _own_files(self.path)
        if not resume:
            if stray:
                recorded = ""
                if progress.exists():
                    content = _load_json(progress)
                    recorded = (f" ({len(content.get('shards', []))} shards, {content.get('sequences', 0)} sequences "
                                f"recorded in {progress})")
                raise TeacherCacheError(f"{self.path} holds an unfinished teacher cache{recorded}: its write was "
                                        f"interrupted. Pass resume=True to continue it (the writer's num_sequences "
                                        f"says how many sequences to skip), or overwrite=True to start again")
            return
        if progress.exists():
            self._resume(_load_json(progress))
        keep = {PROGRESS} | {s["file"] for s in self._shards}
        for file in stray:
            if file.name not in keep:
                file.unlink()
        _fsync_dir(self.path)

    def _resume(self, content: dict) -> None:
        progress = self.path / PROGRESS
        _, lengths = _shard_lengths(self.path, content, progress)  # a malformed journal raises here, naming it
        settings = content["settings"]
        given = {"mode": self.mode, "k": self.k, "samples": self.samples, "temperature": self.temperature,
                 "logprob_dtype": self._logprob_dtype}
        if self.mode == "sampled":
            given["seed"] = self.seed
        for name, value in (("vocab_size", self.vocab_size), ("index_dtype", self._index_dtype),
                            ("metadata", self.metadata)):
            if value is not None:
                given[name] = value
        differ = [f"{name}={value!r} (recorded: {settings.get(name)!r})" for name, value in given.items()
                  if settings.get(name) != value]
        if differ:
            raise ValueError(f"resume=True needs the settings of the interrupted write in {progress}; these differ: "
                             f"{', '.join(differ)}")
        self._index_dtype = settings.get("index_dtype")
        self.metadata = settings.get("metadata")
        self._adopt(self._plan(settings.get("vocab_size")), settings.get("vocab_size"))
        self._shards = list(content["shards"])
        self.num_sequences = sum(len(x) for x in lengths)
        self.num_tokens = sum(int(x.sum()) for x in lengths)

    def _plan(self, vocab_size: int) -> _Layout:
        """The layout for this vocabulary; nothing is changed until `_adopt` (a batch that fails leaves none)."""
        if self.mode == "topk" and self.k > vocab_size:
            raise ValueError(f"k must be at most the vocabulary size {vocab_size}, got {self.k}")
        if self._index_dtype == "uint16" and vocab_size > 1 << 16:
            raise ValueError(f"index_dtype=torch.uint16 holds ids below 65536, but the vocabulary has {vocab_size}")
        return _layout(self.mode, self.k, self.samples, vocab_size, self._index_dtype, self._logprob_dtype)

    def _adopt(self, layout: _Layout, vocab_size: int) -> None:
        self._layout, self._index_dtype, self.vocab_size = layout, layout.index_dtype, vocab_size

    # -- settings -----------------------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        """What the index records about how the cache was made (`TeacherCache.settings`)."""
        layout = self._layout
        return {"mode": self.mode, "k": self.k, "samples": self.samples, "temperature": self.temperature,
                "vocab_size": self.vocab_size, "logprob_dtype": self._logprob_dtype,
                "index_dtype": self._index_dtype, "value_dtype": None if layout is None else layout.value_dtype,
                "width": None if layout is None else layout.width,
                "record_bytes": None if layout is None else layout.record_bytes,
                "seed": self.seed if self.mode == "sampled" else None, "metadata": self.metadata,
                "created_by": f"fastkd {__version__}"}

    def storage(self, full_dtype: torch.dtype = torch.bfloat16) -> StorageReport:
        """Bytes per token of this cache against full logits in `full_dtype` (`storage_report`)."""
        if self._layout is None:
            raise ValueError("the vocabulary size is not known before the first write; pass vocab_size")
        return _report(self._layout, self.vocab_size, full_dtype)

    # -- writing ------------------------------------------------------------------------------------------

    def write(self, logits: Tensor | Sequence[Tensor], lengths: Sequence[int] | Tensor | None = None, *,
              attention_mask: Tensor | None = None, chunk_size: int | None = None) -> range:
        """Store a batch of sequences from the teacher's logits.

        logits: `(B, S, V)`, one sequence per row, or a list of `(S_i, V)` tensors; any floating dtype and
            device (the log-softmax runs there, in float32 or wider).
        lengths: `(B,)` token counts of right-padded rows (the first `lengths[b]` tokens of row b are kept), or
        attention_mask: `(B, S)`, the tokens kept where nonzero, in order (left padding works too);
            neither: all `S` tokens. Neither goes with a list.
        chunk_size: rows of logits processed at once (default: about 2^24 logits).
        Returns the numbers of the stored sequences. A batch whose logits fail a check (NaN) stores nothing.
        """
        pieces, seq_lengths = self._pieces("logits", logits, lengths, attention_mask)
        vocab = pieces[0][0].shape[-1] if pieces else (self.vocab_size or 1)
        vocab, per_rank = self._vocabulary(pieces, vocab)
        chunk = self._chunk(chunk_size, max(1, _CHUNK_ELEMENTS // per_rank))
        return self._store(seq_lengths, _chunks(pieces, chunk), vocab)

    def write_hidden(self, hidden: Tensor | Sequence[Tensor], weight: Tensor, bias: Tensor | None = None,
                     lengths: Sequence[int] | Tensor | None = None, *, attention_mask: Tensor | None = None,
                     softcap: float | None = None, chunk_size: int | None = None) -> range:
        """Store a batch of sequences from the teacher's last hidden states and output layer: the logits
        `softcap(hidden @ weight.T + bias)` are made `chunk_size` tokens at a time (default as
        `fastkd.fused_linear.default_chunk_size`), never for the whole batch.

        hidden: `(B, S, H)` or a list of `(S_i, H)`; weight: `(V, H)`; bias: `(V,)` or None; softcap: the
        teacher's final-logit softcap `c tanh(z / c)` (Gemma 2) or None. lengths / attention_mask as in `write`.
        """
        from .fused_linear import _logits, default_chunk_size
        pieces, seq_lengths = self._pieces("hidden", hidden, lengths, attention_mask)
        checks.check_float_tensor("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight must be the output layer (V, H), got shape {tuple(weight.shape)}")
        if pieces and pieces[0][0].shape[-1] != weight.shape[1]:
            raise ValueError(f"hidden has {pieces[0][0].shape[-1]} features and weight {weight.shape[1]} (weight is "
                             f"(V, H)): they must be equal")
        if bias is not None:
            checks.check_float_tensor("bias", bias)
            if bias.shape != (weight.shape[0],):
                raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if pieces:
            checks.check_same_device(hidden=pieces[0][0], weight=weight, bias=bias)
        if softcap is not None:
            softcap = checks.check_positive("softcap", softcap)
        rows = sum(len(r) if r is not None else len(t) for t, r in pieces)
        vocab, per_rank = self._vocabulary(pieces, weight.shape[0])
        chunk = self._chunk(chunk_size, default_chunk_size(rows, weight.shape[1], per_rank))
        zs = (_logits(h, weight, bias, softcap) for h in _chunks(pieces, chunk))
        return self._store(seq_lengths, zs, vocab)

    def _vocabulary(self, pieces, local: int) -> tuple[int, int]:
        """The whole vocabulary, and the ids per rank that size the default chunk: the same on every rank, so
        that the ranks' chunks, hence their collectives, agree. Checks the ranks' slices (`vocab_slice`)."""
        if self.process_group is None or not pieces:
            return local, local
        from .distributed.layout import vocab_slice
        rows = sum(len(r) if r is not None else len(t) for t, r in pieces)
        total = vocab_slice(self.process_group, local, self.vocab_range, rows, pieces[0][0].device).total
        return total, max(1, -(-total // torch.distributed.get_world_size(self.process_group)))

    @staticmethod
    def _chunk(chunk_size, default: int) -> int:
        return default if chunk_size is None else _positive_int("chunk_size", chunk_size)

    def _pieces(self, name: str, x, lengths, attention_mask):
        """The batch as (tensor 2-d, selected rows or None) pieces in token order, and each sequence's length."""
        if self._closed:
            raise RuntimeError(f"the TeacherCacheWriter of {self.path} is closed")
        if isinstance(x, torch.Tensor):
            checks.check_float_tensor(name, x)
            if x.dim() != 3:
                raise ValueError(f"{name} must be a batch (B, S, {'V' if name == 'logits' else 'H'}) or a list of "
                                 f"(S_i, {'V' if name == 'logits' else 'H'}) tensors, got shape {tuple(x.shape)}")
            if x.shape[-1] == 0:
                raise ValueError(f"{name} has an empty last dimension: shape {tuple(x.shape)}")
            b, s = x.shape[:2]
            if lengths is not None and attention_mask is not None:
                raise ValueError("pass lengths or attention_mask, not both")
            if attention_mask is not None:
                if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (b, s):
                    raise ValueError(f"attention_mask must be a tensor of shape {(b, s)}, got "
                                     f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
                if attention_mask.is_floating_point() or attention_mask.is_complex():
                    raise TypeError(f"attention_mask must be a bool or integer tensor, got {attention_mask.dtype}")
                keep = attention_mask.to(x.device) != 0
            else:
                counts = self._lengths(lengths, b, s)
                keep = torch.arange(s, device=x.device)[None, :] < torch.tensor(counts, device=x.device)[:, None]
            seq_lengths = keep.sum(1).tolist()
            rows = keep.reshape(-1).nonzero().squeeze(1)
            return [(x, rows)], seq_lengths
        if not isinstance(x, Sequence) or isinstance(x, (str, bytes)):
            raise TypeError(f"{name} must be a tensor (B, S, ...) or a list of (S_i, ...) tensors, "
                            f"got {type(x).__name__}")
        if lengths is not None or attention_mask is not None:
            raise ValueError(f"lengths and attention_mask are for a padded batch; a list of {name} gives each "
                             f"sequence as it is")
        pieces = []
        for i, t in enumerate(x):
            checks.check_float_tensor(f"{name}[{i}]", t)
            if t.dim() != 2 or t.shape[-1] == 0:
                raise ValueError(f"{name}[{i}] must be one sequence (S_i, {'V' if name == 'logits' else 'H'}), "
                                 f"got shape {tuple(t.shape)}")
            if t.shape[-1] != x[0].shape[-1] or t.device != x[0].device:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} on {t.device}, {name}[0] "
                                 f"{tuple(x[0].shape)} on {x[0].device}: the last dimension and device must agree")
            pieces.append((t, None))
        return pieces, [len(t) for t, _ in pieces]

    @staticmethod
    def _lengths(lengths, b: int, s: int) -> list[int]:
        if lengths is None:
            return [s] * b
        if isinstance(lengths, torch.Tensor):
            if lengths.is_floating_point() or lengths.dim() != 1:
                raise TypeError(f"lengths must be a 1-d integer tensor or a list of ints, got {lengths.dtype} "
                                f"of shape {tuple(lengths.shape)}")
            lengths = lengths.tolist()
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or \
                not all(isinstance(n, Integral) and not isinstance(n, bool) for n in lengths):
            raise TypeError(f"lengths must be a list of ints or a 1-d integer tensor, got {lengths!r}")
        if len(lengths) != b:
            raise ValueError(f"lengths must hold one count per sequence ({b}), got {len(lengths)}")
        if any(not 0 <= n <= s for n in lengths):
            raise ValueError(f"lengths must lie in [0, {s}] (the sequence dimension), got {list(lengths)}")
        return [int(n) for n in lengths]

    def _store(self, seq_lengths: list[int], zs, vocab: int) -> range:
        first = self.num_sequences
        if not seq_lengths:
            return range(first, first)
        if self.vocab_size is not None and vocab != self.vocab_size:
            raise ValueError(f"the teacher's vocabulary is {vocab} in this batch, {self.vocab_size} in the cache: "
                             f"every batch must have the same")
        layout = self._layout or self._plan(vocab)
        u = None
        if self.mode == "sampled":
            u = torch.cat([torch.rand(n, self.samples, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(_sequence_seed(self.seed, first + j)))
                           for j, n in enumerate(seq_lengths)])
        ids_parts, value_parts, at = [], [], 0
        for z in zs:
            if self.mode == "topk":
                if self.process_group is None:
                    ids, values = _topk_rows(z, self.temperature, self.k)
                else:
                    from .distributed.topk import sharded_topk
                    ids, values = sharded_topk(z, self.k, self.process_group, vocab_range=self.vocab_range,
                                               temperature=self.temperature)
                bad = _bad_rows(values)
                values = values.to(_TORCH[layout.value_dtype])
            elif self.process_group is None:
                ids, values, total = _sampled_rows(z, self.temperature, self.samples, layout.width,
                                                   u[at:at + len(z)].to(z.device))
                bad = torch.isnan(total)
            else:
                ids, values, total = _sharded_sampled_rows(z, self.temperature, layout.width,
                                                           u[at:at + len(z)].to(z.device), self.process_group,
                                                           self.vocab_range)
                bad = torch.isnan(total)
            if bad.any():
                row = at + int(bad.nonzero()[0])
                sequence = int(np.searchsorted(np.cumsum(seq_lengths), row, side="right"))
                raise ValueError(f"the teacher's logits of sequence {first + sequence} (the batch's {sequence}, "
                                 f"token {row - sum(seq_lengths[:sequence])}) are NaN, +inf or all -inf; nothing "
                                 f"of this batch was written")
            ids_parts.append(ids.cpu())
            value_parts.append(values.cpu())
            at += len(z)
        if self._layout is None:
            self._adopt(layout, vocab)
        records = np.empty(at, dtype=layout.record_dtype)
        if at:
            records["ids"] = torch.cat(ids_parts).numpy()
            values = torch.cat(value_parts)
            if layout.value_dtype == "bfloat16":
                values = values.view(torch.int16)
            records["values"] = values.numpy()
        start = 0
        for n in seq_lengths:
            self._append(records[start:start + n])
            start += n
        return range(first, self.num_sequences)

    # -- shards -------------------------------------------------------------------------------------------

    def _append(self, records: np.ndarray) -> None:
        """One sequence into the open shard, after closing it if the sequence would take it past shard_tokens."""
        if not self._writes:  # a rank other than 0 of a tensor-parallel group: counts only
            self.num_sequences += 1
            self.num_tokens += len(records)
            return
        if self._file is not None and self._file_tokens and self._file_tokens + len(records) > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            self._partial = self.path / (_shard_name(len(self._shards)) + ".partial")
            self._file = open(self._partial, "wb")
            self._file.write(bytes(HEADER_BYTES))  # filled in when the shard is closed
            self._file_tokens, self._file_lengths, self._crc = 0, [], 0
        data = records.tobytes()
        self._file.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._file_tokens += len(records)
        self._file_lengths.append(len(records))
        self.num_sequences += 1
        self.num_tokens += len(records)

    def _close_shard(self) -> None:
        """Finish the open shard: lengths, header, fsync, rename to its final name, then record it in the
        journal. A crash before the journal is written loses the shard, never trusts a part of it."""
        f, layout = self._file, self._layout
        lengths = np.asarray(self._file_lengths, dtype="<u8").tobytes()
        f.write(lengths)
        crc = zlib.crc32(lengths, self._crc)
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_BYTES, layout.width, layout.record_bytes,
                             layout.values_offset, self._file_tokens, len(self._file_lengths),
                             layout.index_dtype.encode(), layout.value_dtype.encode()))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        name = _shard_name(len(self._shards))
        os.replace(self._partial, self.path / name)
        _fsync_dir(self.path)
        size = HEADER_BYTES + self._file_tokens * layout.record_bytes + len(lengths)
        self._shards.append({"file": name, "tokens": self._file_tokens, "sequences": len(self._file_lengths),
                             "bytes": size, "crc32": crc})
        _write_json_atomically(self.path / PROGRESS, self._content(complete=False))

    def _content(self, complete: bool) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "complete": complete, "settings": self.settings,
                "sequences": self.num_sequences if complete else sum(s["sequences"] for s in self._shards),
                "tokens": self.num_tokens if complete else sum(s["tokens"] for s in self._shards),
                "shards": self._shards}

    def close(self) -> None:
        """Close the last shard and write the index (last, atomically): the cache is finished. Idempotent."""
        if self._closed:
            return
        if self._layout is None:
            self._abort()
            raise ValueError(f"nothing was written to {self.path} and vocab_size was not given: the cache's "
                             f"vocabulary is unknown, no index was written")
        if not self._writes:
            self._closed = True
            return
        try:
            if self._file is not None:
                self._close_shard()
            _write_json_atomically(self.path / INDEX, self._content(complete=True))
            (self.path / PROGRESS).unlink(missing_ok=True)
            _fsync_dir(self.path)
            (self.path / LOCK).unlink(missing_ok=True)
        except BaseException:
            self._abort()  # what was recorded stays, to resume
            raise
        self._closed = True
        self._release_lock()

    def _abort(self) -> None:
        """After an exception: the sequences written so far closed as a shard (write() appends whole batches
        only, so the open shard holds whole sequences), no index; the directory is left to resume."""
        self._closed = True
        try:
            if self._file is not None:
                committed = HEADER_BYTES + self._file_tokens * self._layout.record_bytes
                self._file.flush()
                self._file.truncate(committed)
                self._file.seek(committed)
                self._close_shard()
        except OSError:
            # The disk refused: the .partial file stays and is deleted on resume; the original error matters.
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self._release_lock()

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._abort()

    def __repr__(self) -> str:
        size = f"k={self.k}" if self.mode == "topk" else f"samples={self.samples}"
        return (f"TeacherCacheWriter({str(self.path)!r}, mode={self.mode!r}, {size}, temperature={self.temperature}, "
                f"{self.num_sequences} sequences, {self.num_tokens} tokens)")


def _chunks(pieces, chunk: int):
    """Rows of the pieces, in order, at most `chunk` at a time (a chunk never spans two pieces). A piece is a
    2-d tensor (all its rows), or a 3-d batch and the flat numbers of its kept rows (gathered by chunk, so a
    non-contiguous batch is never copied whole)."""
    for tensor, rows in pieces:
        if rows is None:
            for start in range(0, len(tensor), chunk):
                yield tensor[start:start + chunk]
            continue
        s = tensor.shape[1]
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            yield tensor[part // s, part % s]


# ----------------------------------------------------------------------------------------------------------
# the reader

class TeacherCache(torch.utils.data.Dataset):
    """A finished teacher cache as a `torch.utils.data.Dataset` of sequences, memory-mapped.

    `cache[i]` is `(indices, logprobs)` of sequence i: `indices (S_i, width)` int64 (what `gather` wants,
    whatever the stored id dtype), `logprobs (S_i, width)` in `logprob_dtype` (top-k: the stored values as they
    were written; sampled: `log(count / samples)` computed in float64 and rounded once, -inf in unused slots).
    `counts(i)` gives a sampled cache's exact counts. The shards are mapped lazily in each process, so the
    dataset pickles into DataLoader workers. `collate` pads a list of items into a batch.

    Opening checks every shard cheaply (module docstring); `verify=True` also checks their CRC-32 (a full read).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no teacher cache at {self.path}: not a directory")
        index = self.path / INDEX
        if not index.exists():
            progress = self.path / PROGRESS
            if progress.exists() or _own_files(self.path):
                raise TeacherCacheError(f"{self.path} holds an unfinished teacher cache: {index} is missing (the "
                                        f"index is written last; its write was interrupted). Finish it with "
                                        f"TeacherCacheWriter({str(self.path)!r}, resume=True, <same settings>)")
            raise FileNotFoundError(f"no teacher cache at {self.path}: {index} does not exist")
        content = _load_json(index)
        if not content.get("complete"):
            raise TeacherCacheError(f"{index} describes an unfinished cache")
        self._layout, lengths = _shard_lengths(self.path, content, index)
        self._content = content
        self._settings = content["settings"]
        self._files = [s["file"] for s in content["shards"]]
        self._crcs = [int(s["crc32"]) for s in content["shards"]]
        # Per sequence: its shard, its first record there, its length.
        self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._shard = np.repeat(np.arange(len(lengths)), [len(x) for x in lengths])
        self._start = np.concatenate([np.cumsum(x) - x for x in lengths]) if lengths else np.zeros(0, np.int64)
        if len(self._lengths) != content.get("sequences") or int(self._lengths.sum()) != content.get("tokens"):
            raise TeacherCacheError(f"{index} is inconsistent: it counts {content.get('sequences')} sequences and "
                                    f"{content.get('tokens')} tokens, its shards hold {len(self._lengths)} and "
                                    f"{int(self._lengths.sum())}")
        self._maps: dict[int, np.ndarray] = {}
        if verify:
            self.verify()

    # -- metadata -----------------------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        """How the cache was made, as recorded in the index (mode, k or samples, temperature, vocab_size,
        dtypes, width, seed, metadata, created_by)."""
        return dict(self._settings)

    mode = property(lambda self: self._settings["mode"], doc="'topk' or 'sampled'")
    k = property(lambda self: self._settings["k"], doc="ids kept per token (top-k), else None")
    samples = property(lambda self: self._settings["samples"], doc="ids drawn per token (sampled), else None")
    temperature = property(lambda self: self._settings["temperature"],
                           doc="the temperature of the stored log-probs: softmax(logits / temperature)")
    vocab_size = property(lambda self: self._settings["vocab_size"], doc="the teacher's vocabulary size")
    width = property(lambda self: self._layout.width, doc="slots per token: k, or min(samples, vocab_size)")
    seed = property(lambda self: self._settings["seed"], doc="the sampled mode's seed, else None")
    user_metadata = property(lambda self: self._settings["metadata"], doc="the writer's `metadata` dict, or None")
    format_version = property(lambda self: self._content["version"], doc="the on-disk format's version")
    num_tokens = property(lambda self: int(self._lengths.sum()), doc="tokens over all sequences")

    @property
    def logprob_dtype(self) -> torch.dtype:
        return _TORCH[self._settings["logprob_dtype"]]

    @property
    def index_dtype(self) -> torch.dtype:
        """The ids' dtype on disk (items give int64)."""
        return _TORCH[self._layout.index_dtype]

    @property
    def lengths(self) -> Tensor:
        """Each sequence's token count, `(len(self),)` int64."""
        return torch.from_numpy(self._lengths.copy())

    def storage(self, full_dtype: torch.dtype = torch.bfloat16) -> StorageReport:
        """Bytes per token against full logits in `full_dtype`, and on disk with every file counted."""
        files = [self.path / f for f in self._files] + [self.path / INDEX]
        on_disk = sum(f.stat().st_size for f in files) / max(1, self.num_tokens)
        return _report(self._layout, self.vocab_size, full_dtype, on_disk)

    def verify(self) -> None:
        """Read every shard and check its CRC-32 against the index; raises `TeacherCacheError` naming the first
        damaged file."""
        for name, crc in zip(self._files, self._crcs):
            actual = _crc32(self.path / name)
            if actual != crc:
                raise TeacherCacheError(f"{self.path / name} is corrupted: CRC-32 {actual:#010x} of its data, "
                                        f"{crc:#010x} in the index")

    # -- items --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._lengths)

    def _records(self, i: int) -> np.ndarray:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise TypeError(f"a teacher cache is indexed by an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a teacher cache of {n} sequences")
        i = int(i) % n
        shard, start, length = int(self._shard[i]), int(self._start[i]), int(self._lengths[i])
        if length == 0:
            return np.zeros(0, dtype=self._layout.record_dtype)
        records = self._maps.get(shard)
        if records is None:
            tokens = int(self._content["shards"][shard]["tokens"])
            records = np.memmap(self.path / self._files[shard], dtype=self._layout.record_dtype, mode="r",
                                offset=HEADER_BYTES, shape=(tokens,))
            self._maps[shard] = records
        return records[start:start + length]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        records = self._records(i)
        indices = torch.from_numpy(records["ids"].astype(np.int64))
        values = np.array(records["values"])
        if self.mode == "sampled":
            counts = torch.from_numpy(values.astype(np.float64))
            return indices, torch.log(counts / self.samples).to(self.logprob_dtype)
        if self._layout.value_dtype == "bfloat16":
            return indices, torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
        return indices, torch.from_numpy(values)

    def counts(self, i: int) -> tuple[Tensor, Tensor]:
        """A sampled cache's sequence i as stored: `(indices (S_i, width) int64, counts (S_i, width) int64)`."""
        if self.mode != "sampled":
            raise ValueError(f"counts() is for a sampled cache; {self.path} is a top-k cache")
        records = self._records(i)
        return (torch.from_numpy(records["ids"].astype(np.int64)),
                torch.from_numpy(records["values"].astype(np.int64)))

    def __getstate__(self) -> dict:
        # Memory maps are per process: a DataLoader worker maps the shards it reads itself.
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        size = f"k={self.k}" if self.mode == "topk" else f"samples={self.samples}"
        return (f"TeacherCache({str(self.path)!r}, mode={self.mode!r}, {size}, temperature={self.temperature}, "
                f"{len(self)} sequences, {self.num_tokens} tokens)")


# ----------------------------------------------------------------------------------------------------------
# batches

class TeacherBatch(NamedTuple):
    """Padded teacher sequences: `indices (B, L, width)` int64 (0 in padding), `logprobs (B, L, width)` (-inf in
    padding, so padded slots are unused), `mask (B, L)` bool (True on real tokens). Give the student's labels
    `ignore_index` where `mask` is False: a padded token has no teacher distribution."""
    indices: Tensor
    logprobs: Tensor
    mask: Tensor


def collate(batch: Sequence[tuple[Tensor, Tensor]], pad_to: int | None = None) -> TeacherBatch:
    """Pad a list of `TeacherCache` items on the right to the longest sequence, or to `pad_to` tokens (the
    student's padded length); use as a DataLoader's `collate_fn`, or inside one."""
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) == 0:
        raise ValueError("batch must be a non-empty list of (indices, logprobs) items of a TeacherCache")
    for j, item in enumerate(batch):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)):
            raise TypeError(f"batch[{j}] must be an (indices, logprobs) pair of tensors, got {type(item).__name__}")
        if item[0].dim() != 2 or item[0].shape != item[1].shape or item[0].shape[1] != batch[0][0].shape[1] or \
                item[1].dtype != batch[0][1].dtype:
            raise ValueError(f"batch[{j}] has indices {tuple(item[0].shape)} and logprobs {tuple(item[1].shape)} "
                             f"{item[1].dtype}; batch[0] {tuple(batch[0][0].shape)} {batch[0][1].dtype}: every item "
                             f"needs (S_i, width) of both, one width, one dtype")
    longest = max(len(ids) for ids, _ in batch)
    if pad_to is not None:
        pad_to = checks.check_int("pad_to", pad_to)
        if pad_to < longest:
            raise ValueError(f"pad_to is {pad_to}, but a sequence of the batch has {longest} tokens")
        longest = pad_to
    width = batch[0][0].shape[1]
    indices = torch.zeros((len(batch), longest, width), dtype=torch.int64)
    logprobs = torch.full((len(batch), longest, width), -math.inf, dtype=batch[0][1].dtype)
    mask = torch.zeros((len(batch), longest), dtype=torch.bool)
    for j, (ids, lp) in enumerate(batch):
        indices[j, :len(ids)] = ids
        logprobs[j, :len(ids)] = lp
        mask[j, :len(ids)] = True
    return TeacherBatch(indices, logprobs, mask)

