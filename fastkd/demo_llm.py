"""Distilling a small byte-level language model from a cached teacher, on text every Python install has.

The text is the source of a fixed list of modules of the Python standard library (`STDLIB_MODULES`, read from
`sysconfig.get_paths()["stdlib"]`; Python Software Foundation License), so nothing is downloaded. That source
changes a little from one Python version to the next, so the numbers depend on the Python version too: the demo
prints it with the text's size and digest. Tokens are bytes (vocabulary 256), so bits per token are bits per byte.

A causal transformer teacher is trained on the first 90% of each file. The students learn from a transfer set, a
seeded sample of the teacher's training windows (Hinton et al.'s term: the data the teacher's outputs are
matched on); the teacher's top-k and sampled next-byte distributions over it are written once with
`TeacherCacheWriter`. Then one smaller student, from the same initialization and with the same batches, is
trained five ways, the four distilled ones through `fused_linear_distill_loss`: alone (cross-entropy), with
full-logit KD (the live teacher's hidden states and output layer at every step), from the top-k cache with the
missing mass renormalized away or kept as one bucket, and from the sampled cache. Each is scored on the last 10%
of every file.
"""
from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .demo import machine, run_setup
from .functional import fused_linear_distill_loss
from .teacher_cache import TeacherCache, TeacherCacheWriter, collate

VOCAB = 256  # bytes
IGNORE_INDEX = -100

# Modules present as single files from Python 3.10 to 3.13 at least (`string`, `pathlib`, `zipfile` and
# `datetime` became packages or wrappers, PEP 594 removed others). Their sizes still differ by a few percent.
STDLIB_MODULES = (
    "argparse", "ast", "calendar", "configparser", "dataclasses", "difflib", "enum", "fractions", "functools",
    "gettext", "heapq", "inspect", "locale", "pprint", "random", "shutil", "statistics", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "traceback", "typing",
)
VALIDATION_FRACTION = 0.1

TEMPERATURE = 1.0  # the bucket tail needs T = 1; the other students use the same, for a like-for-like table
# Mostly the teacher, some labels: with only the KD term, the top-k student's renormalized (overconfident)
# targets cost it more than the labels' help (measured with an earlier, weaker teacher and top-8: at CE 0 the
# renormalized student fell behind the student alone).
CE_WEIGHT = 0.3
KD_WEIGHT = 0.7
WARMUP_STEPS = 20

MODES = ("alone", "full_kd", "topk_renormalize", "topk_bucket", "sampled")


@dataclass(frozen=True)
class Size:
    layers: int
    width: int
    heads: int

    def __str__(self) -> str:
        return f"{self.layers}x{self.width}"


@dataclass(frozen=True)
class Preset:
    """Everything the run's numbers depend on besides the seed, the machine and the Python version."""
    modules: tuple[str, ...]
    context: int  # bytes per training window
    batch_size: int  # windows per step
    teacher: Size
    teacher_steps: int
    teacher_lr: float
    student: Size
    student_steps: int
    student_lr: float
    transfer_windows: int  # the students' training set, a seeded sample of the teacher's windows
    k: int  # top-k cache: ids kept per token
    samples: int  # sampled cache: ids drawn per token


# Measured: about 2 minutes on 2 idle CPU cores (README), half of it the teacher. Learning rates higher than usual
# suit models this small (a 1x48 student alone: 2.38 nats/byte at 3e-3, 2.24 at 1e-2). The transfer set is a
# tenth of the text: the cache write and full-logit KD's teacher passes grow with it, and a student that sees
# little data is where a teacher's full distribution helps most.
FULL = Preset(modules=STDLIB_MODULES, context=64, batch_size=16,
              teacher=Size(layers=4, width=128, heads=4), teacher_steps=1500, teacher_lr=6e-3,
              student=Size(layers=1, width=64, heads=2), student_steps=600, student_lr=1e-2,
              transfer_windows=2000, k=16, samples=32)
# Seconds, for the tests: smaller models, text and step counts. Its distilled students still beat the student
# alone (by 0.03 to 0.09 nats/byte over seeds 0 to 7, one thread).
QUICK = Preset(modules=("textwrap", "heapq", "fractions", "calendar"), context=64, batch_size=16,
               teacher=Size(layers=2, width=64, heads=2), teacher_steps=250, teacher_lr=1e-2,
               student=Size(layers=1, width=32, heads=2), student_steps=100, student_lr=1e-2,
               transfer_windows=500, k=16, samples=32)


# ----------------------------------------------------------------------------------------------------------
# the text

@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8, the first (1 - VALIDATION_FRACTION) of each file, concatenated
    validation: torch.Tensor  # uint8, the rest of each file
    files: tuple[str, ...]
    digest: str  # of the whole text, to tell whether two runs saw the same bytes

    def describe(self) -> str:
        size = len(self.train) + len(self.validation)
        return (f"text: {len(self.files)} modules of the Python {sys.version.split()[0]} standard library "
                f"(PSF License), {size / 1e3:.0f} kB, sha256 {self.digest[:12]}: {len(self.train)} bytes for "
                f"training, {len(self.validation)} for validation")


def load_corpus(modules: tuple[str, ...] = STDLIB_MODULES, stdlib: str | Path | None = None) -> Corpus:
    """The source of `modules`, split per file so that validation covers every module's style."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    train, validation, hasher = [], [], hashlib.sha256()
    for name in modules:
        path = root / f"{name}.py"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RuntimeError(f"the LLM demo trains on the Python standard library's source and cannot read "
                               f"{path}: {e.strerror} (an install that ships only compiled modules?)") from None
        hasher.update(data)
        cut = round(len(data) * (1 - VALIDATION_FRACTION))
        train.append(data[:cut])
        validation.append(data[cut:])
    return Corpus(_bytes_tensor(train), _bytes_tensor(validation), tuple(modules), hasher.hexdigest())


def _bytes_tensor(parts: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def windows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """`(N, context + 1)` int64 windows that overlap by one byte, so each byte after the first is predicted once:
    inputs `w[:, :-1]`, next-byte labels `w[:, 1:]`. The tail shorter than a window is dropped."""
    count = (len(tokens) - 1) // context
    if count < 1:
        raise ValueError(f"{len(tokens)} bytes make no window of {context + 1}")
    starts = torch.arange(count) * context
    return tokens.long()[starts[:, None] + torch.arange(context + 1)]


# ----------------------------------------------------------------------------------------------------------
# the model

class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, s, w))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ByteLM(nn.Module):
    """A small causal transformer over bytes. `forward` returns the last hidden states (after the final norm);
    `head.weight` is the output layer, so the losses get both and make the logits themselves (fused)."""

    def __init__(self, size: Size, context: int):
        super().__init__()
        self.size = size
        self.embed = nn.Embedding(VOCAB, size.width)
        self.position = nn.Embedding(context, size.width)
        self.blocks = nn.ModuleList(Block(size.width, size.heads) for _ in range(size.layers))
        self.norm = nn.LayerNorm(size.width)
        self.head = nn.Linear(size.width, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def validation_loss(model: ByteLM, windows_: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-byte cross-entropy over every validation byte, in nats."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(windows_), batch_size):
            w = windows_[first:first + batch_size]
            logits = F.linear(model(w[:, :-1]), model.head.weight)
            total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            count += w[:, 1:].numel()
    return total / count


# ----------------------------------------------------------------------------------------------------------
# training

class Windows(torch.utils.data.Dataset):
    """Training windows, each with its sequence of a teacher cache when there is one (same numbering: the cache
    was written window by window, in order)."""

    def __init__(self, windows_: torch.Tensor, cache: TeacherCache | None = None):
        if cache is not None and len(cache) != len(windows_):
            raise ValueError(f"the cache holds {len(cache)} sequences for {len(windows_)} windows")
        self.windows, self.cache = windows_, cache

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        return self.windows[i], None if self.cache is None else self.cache[i]


def batch_of(items) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Inputs, labels and the teacher's `(indices, logprobs)` of a list of `Windows` items. A token the cache
    padded (it has no teacher distribution) gets the label `IGNORE_INDEX`."""
    w = torch.stack([window for window, _ in items])
    inputs, labels = w[:, :-1], w[:, 1:].clone()
    if items[0][1] is None:
        return inputs, labels, None
    teacher = collate([sequence for _, sequence in items], pad_to=labels.shape[1])
    labels[~teacher.mask] = IGNORE_INDEX
    return inputs, labels, (teacher.indices, teacher.logprobs.float())


def schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero: the usual recipe for transformers, which diverge more easily
    with the full learning rate from the first step."""
    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def bar(done: int, total: int, width: int = 20) -> str:
    """A text progress bar, `[#####.....]`."""
    filled = done * width // max(1, total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def train(name: str, model: ByteLM, loss_of_batch: Callable, dataset: Windows, validation: torch.Tensor, *,
          steps: int, batch_size: int, lr: float, seed: int, device: torch.device, log=print,
          progress: Callable[[str], None] | None = None) -> tuple[float, float]:
    """Train `model` with AdamW for `steps` batches of `loss_of_batch(model, inputs, labels, teacher)`; return its
    validation loss (nats per byte) and the training time in seconds. Logs one line when done; `progress` gets a
    status line after every step."""
    # Batches walk through one shuffle of the windows after another; the same seed gives every student the same
    # batches in the same order.
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=steps * batch_size,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=batch_of)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    lr_schedule = schedule(optimizer, steps)
    start, recent = time.perf_counter(), None
    model.train()
    for step, (inputs, labels, teacher) in enumerate(loader, 1):
        if teacher is not None:
            teacher = tuple(t.to(device) for t in teacher)
        loss = loss_of_batch(model, inputs.to(device), labels.to(device), teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if progress is not None:
            # An average that follows the loss without jumping with each batch.
            recent = loss.item() if recent is None else 0.95 * recent + 0.05 * loss.item()
            progress(f"{name:<32} {bar(step, steps)} step {step:>4}/{steps}  train loss {recent:.3f}  "
                     f"{time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    loss = validation_loss(model, validation.to(device))
    epochs = steps * batch_size / len(dataset)
    log(f"{name:<32} {steps} steps ({epochs:.1f} epochs)  validation {loss:.4f} nats/byte "
        f"({loss / math.log(2):.3f} bits/byte)  ({seconds:.0f} s)")
    return loss, seconds


def cross_entropy(model: ByteLM, inputs, labels, teacher) -> torch.Tensor:
    return F.cross_entropy(F.linear(model(inputs), model.head.weight).flatten(0, 1), labels.flatten(),
                           ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------
# the cache

def write_caches(teacher: ByteLM, transfer: torch.Tensor, directory: Path, preset: Preset, device: torch.device,
                 seed: int) -> tuple[TeacherCache, TeacherCache, float]:
    """One pass of the teacher over the transfer windows, written as a top-k and a sampled cache (one sequence
    per window, in order); returns both, opened for reading, and the seconds it took."""
    start = time.perf_counter()
    teacher.eval()
    with TeacherCacheWriter(directory / "topk", mode="topk", k=preset.k, temperature=TEMPERATURE) as topk, \
            TeacherCacheWriter(directory / "sampled", mode="sampled", samples=preset.samples,
                               temperature=TEMPERATURE, seed=seed) as sampled, torch.no_grad():
        for first in range(0, len(transfer), 256):
            hidden = teacher(transfer[first:first + 256, :-1].to(device))
            topk.write_hidden(hidden, teacher.head.weight)
            sampled.write_hidden(hidden, teacher.head.weight)
    return TeacherCache(directory / "topk"), TeacherCache(directory / "sampled"), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------
# the demo

def run(*, quick: bool = False, seed: int = 0, device: str | torch.device | None = None,
        backend: str | None = None, steps_teacher: int | None = None, steps_student: int | None = None,
        preset: Preset | None = None, log=print, progress: bool | None = None) -> dict[str, dict]:
    """Train the teacher, write its caches, train the five students; log one line per model and the table.

    Args:
        quick: the `QUICK` preset (seconds; the numbers mean little), else `FULL` (about 2 minutes on 2 cores).
        seed: seeds the initializations, the transfer set, the batches and the sampled cache's draws.
        device: where to train; default "cuda" when available, else "cpu".
        backend: fastkd backend of the distillation losses; None means fastkd's default.
        steps_teacher, steps_student: override the preset's training steps.
        preset: the sizes and steps (default: `QUICK` or `FULL`).
        log: called with each line of the output.
        progress: show each model's steps as a bar on one line rewritten in place on stdout; default: when
            `log` is `print` and stdout is a terminal.

    Returns:
        Keyed "teacher" and by `MODES`: "loss" (validation, nats per byte), "seconds" (training), "parameters";
        for the cache students also "bytes_per_token", "full_bytes_per_token" (bfloat16 logits) and "cache_bytes"
        (the cache's files on disk).
    """
    preset = preset or (QUICK if quick else FULL)
    if steps_teacher is not None:
        preset = replace(preset, teacher_steps=steps_teacher)
    if steps_student is not None:
        preset = replace(preset, student_steps=steps_student)
    if preset.teacher_steps < 1 or preset.student_steps < 1:
        raise ValueError(f"steps must be at least 1, got teacher {preset.teacher_steps}, "
                         f"student {preset.student_steps}")
    device, terminal, log = run_setup(device, progress, log)
    started = time.perf_counter()

    corpus = load_corpus(preset.modules)
    train_windows, validation = windows(corpus.train, preset.context), windows(corpus.validation, preset.context)
    transfer = train_windows[torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(seed))
                             [:preset.transfer_windows]]
    log(f"device {device}: {machine(device)}")
    log(corpus.describe())
    log(f"windows of {preset.context} bytes: {len(train_windows)} for the teacher, a transfer set of "
        f"{len(transfer)} of them for the students, {len(validation)} for validation (seed {seed})")

    def fit(name, model, loss_of_batch, dataset, steps, lr):
        return train(name, model, loss_of_batch, dataset, validation, steps=steps, batch_size=preset.batch_size,
                     lr=lr, seed=seed, device=device, log=log, progress=terminal)

    torch.manual_seed(seed)
    teacher = ByteLM(preset.teacher, preset.context).to(device)
    results = {"teacher": {"parameters": teacher.parameter_count()}}
    results["teacher"]["loss"], results["teacher"]["seconds"] = fit(
        f"teacher {preset.teacher}", teacher, cross_entropy, Windows(train_windows), preset.teacher_steps,
        preset.teacher_lr)
    teacher.eval()
    teacher.requires_grad_(False)

    def full_kd(model, inputs, labels, _):
        with torch.no_grad():
            teacher_hidden = teacher(inputs)
        return fused_linear_distill_loss(model(inputs), model.head.weight, teacher_hidden, teacher.head.weight,
                                         labels, loss="forward_kl", temperature=TEMPERATURE, ce_weight=CE_WEIGHT,
                                         kd_weight=KD_WEIGHT, ignore_index=IGNORE_INDEX, backend=backend)

    def from_cache(tail):
        def loss(model, inputs, labels, cached):
            return fused_linear_distill_loss(model(inputs), model.head.weight, labels=labels, teacher_topk=cached,
                                             tail=tail, loss="forward_kl", temperature=TEMPERATURE,
                                             ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT, ignore_index=IGNORE_INDEX,
                                             backend=backend)
        return loss

    with tempfile.TemporaryDirectory(prefix="fastkd-demo-llm-") as directory:
        topk_cache, sampled_cache, cache_seconds = write_caches(teacher, transfer, Path(directory), preset, device,
                                                                seed)
        log(f"teacher caches written in {cache_seconds:.1f} s, one teacher pass over the {topk_cache.num_tokens} "
            f"tokens of the transfer set: top-{preset.k} ({topk_cache.storage()}), sampled {preset.samples} per "
            f"token ({sampled_cache.storage()})")
        students = {
            "alone": (cross_entropy, None),
            "full_kd": (full_kd, None),
            "topk_renormalize": (from_cache("renormalize"), topk_cache),
            "topk_bucket": (from_cache("bucket"), topk_cache),
            # Sampled ids stand for the teacher's distribution by their frequencies, which sum to 1 over the
            # stored ids: renormalizing is exact there, and a bucket would hold nothing.
            "sampled": (from_cache("renormalize"), sampled_cache),
        }
        for mode, (loss_of_batch, cache) in students.items():
            torch.manual_seed(seed)  # every student starts from the same weights
            student = ByteLM(preset.student, preset.context).to(device)
            loss, seconds = fit(f"student {preset.student} {label(mode, preset)}", student, loss_of_batch,
                                Windows(transfer, cache), preset.student_steps, preset.student_lr)
            results[mode] = {"loss": loss, "seconds": seconds, "parameters": student.parameter_count()}
            if cache is not None:
                report = cache.storage()
                results[mode].update(bytes_per_token=report.bytes_per_token,
                                     full_bytes_per_token=report.full_logits_bytes_per_token,
                                     cache_bytes=round(report.on_disk_bytes_per_token * cache.num_tokens))
    log_table(results, preset, log)
    log(f"Full-logit KD runs the teacher at every step; the cache students read its outputs from disk, written once "
        f"in {cache_seconds:.1f} s (not in their train time).")
    log(f"{time.perf_counter() - started:.0f} s in all. With the same seed the numbers repeat on this machine; on a "
        f"CPU they differ with the CPU model and the thread count (the order of float sums in matrix products), "
        f"and with the Python version (its standard library is the text).")
    if quick:
        log("(quick mode: smaller models and text, to check that the demo runs; these are not the demo's results)")
    return results


def label(mode: str, preset: Preset) -> str:
    return {"alone": "alone (CE)", "full_kd": "full-logit KD", "topk_renormalize": f"top-{preset.k} renormalize",
            "topk_bucket": f"top-{preset.k} bucket", "sampled": f"sampled ({preset.samples} draws)"}[mode]


def log_table(results: dict[str, dict], preset: Preset, log=print) -> None:
    """A Markdown table: validation loss per byte, the teacher cache per token against full bfloat16 logits, and
    the training time (the cache students' excludes the one pass that wrote the caches)."""
    def size(key, model):
        return f"{model} ({results[key]['parameters'] / 1e6:.2f}M)"
    rows = [(f"teacher {size('teacher', preset.teacher)}", "-", results["teacher"])]
    rows += [(f"student {size(mode, preset.student)}", label(mode, preset), results[mode]) for mode in MODES]
    alone = results["alone"]["loss"]
    log("")
    log("| model | trained with | validation loss (nats/byte) | bits/byte | vs alone | teacher cache | train time |")
    log("|---|---|---|---|---|---|---|")
    for model, how, r in rows:
        cache = "-"
        if "cache_bytes" in r:
            cache = (f"{r['cache_bytes'] / 1e6:.2f} MB, {r['bytes_per_token']} B/token "
                     f"({r['full_bytes_per_token'] / r['bytes_per_token']:.0f}x less than logits)")
        versus = "-" if how in ("-", label("alone", preset)) else f"{r['loss'] - alone:+.4f}"
        log(f"| {model} | {how} | {r['loss']:.4f} | {r['loss'] / math.log(2):.3f} | {versus} | {cache} | "
            f"{r['seconds']:.0f} s |")
