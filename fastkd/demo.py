"""Hinton et al.'s MNIST distillation table, at small scale, on the MNIST subset shipped with fastkd.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015), section 3: a large,
regularized net is trained on MNIST; a small net trained alone on the labels makes more test errors
than the same small net trained to match the large net's softened outputs. Here the data is the
5000-image subset in `fastkd.data` (4000 train, 1000 test), so both nets are smaller and the error
counts are out of 1000, but the effect is the same.
"""
from __future__ import annotations

import platform
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_mnist_5k
from .losses import KDLoss

TRAIN_SIZE = 4000
IMAGE_PIXELS = 28 * 28
CLASSES = 10

TEACHER_HIDDEN = 1200
TEACHER_INPUT_DROPOUT = 0.2
TEACHER_HIDDEN_DROPOUT = 0.5
TEACHER_JITTER_PIXELS = 2
STUDENT_HIDDEN = 100

TEMPERATURE = 4.0
CE_WEIGHT = 0.1
KD_WEIGHT = 0.9

BATCH_SIZE = 128
LEARNING_RATE = 1e-3
EPOCHS_TEACHER = 60
EPOCHS_STUDENT = 100
QUICK_EPOCHS_TEACHER = 2
QUICK_EPOCHS_STUDENT = 4


def mlp(hidden: int, input_dropout: float = 0.0, hidden_dropout: float = 0.0) -> nn.Sequential:
    """784-hidden-hidden-10 ReLU network on flattened images."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Dropout(input_dropout),
        nn.Linear(IMAGE_PIXELS, hidden), nn.ReLU(), nn.Dropout(hidden_dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(hidden_dropout),
        nn.Linear(hidden, CLASSES),
    )


def jitter(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in each direction, filling with background."""
    count, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    shift_rows = torch.randint(0, 2 * max_shift + 1, (count, 1), generator=generator).to(images.device)
    shift_cols = torch.randint(0, 2 * max_shift + 1, (count, 1), generator=generator).to(images.device)
    rows = shift_rows + torch.arange(height, device=images.device)
    cols = shift_cols + torch.arange(width, device=images.device)
    samples = torch.arange(count, device=images.device)
    return padded[samples[:, None, None], rows[:, :, None], cols[:, None, :]]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` that `model` classifies as `labels`."""
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(dim=1) == labels).float().mean().item()


def train(name: str, model: nn.Module, loss_of_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          train_images: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor, *,
          epochs: int, seed: int, jitter_pixels: int = 0, log=print,
          progress: Callable[[str], None] | None = None) -> float:
    """Train `model` with Adam on `loss_of_batch(logits, batch_indices)`; return its final test accuracy.

    Logs one line when done; `progress`, if given, is called after every epoch with a status line.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    # The same seed gives the student alone and the student with KD the same batches.
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_images), generator=generator).to(train_images.device)
        loss_sum = torch.zeros((), device=train_images.device)
        for first in range(0, len(order), BATCH_SIZE):
            batch = order[first:first + BATCH_SIZE]
            images = train_images[batch]
            if jitter_pixels:
                images = jitter(images, jitter_pixels, generator)
            loss = loss_of_batch(model(images), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
        schedule.step()
        # Evaluation draws no random numbers, so skipping it between epochs changes no result.
        if progress is not None or epoch == epochs:
            test_accuracy = accuracy(model, test_images, test_labels)
            status = (f"{name:<10} epoch {epoch:>3}/{epochs}  train loss {loss_sum.item() / len(order):.4f}  "
                      f"test accuracy {test_accuracy:.4f}")
            if progress is not None:
                progress(status)
    log(f"{status}  ({time.perf_counter() - start:.0f} s)")
    return test_accuracy


def machine(device: torch.device) -> str:
    """What produced the numbers: they depend on the CPU (or GPU) model and the thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'' if threads == 1 else 's'}, torch {torch.__version__}"


class TerminalProgress:
    """One status line rewritten in place (carriage return), erased before the next logged line."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.width = 0

    def __call__(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def run_setup(device, progress: bool | None, log: Callable[[str], None]):
    """A demo's `(device, terminal, log)`: the device (default CUDA if present, else the CPU); the status line
    (`TerminalProgress`, or None: by default only when `log` is `print` on a terminal); and `log` wrapped to erase
    the status line before each logged line."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if progress is None:
        progress = log is print and sys.stdout.isatty()
    terminal = TerminalProgress() if progress else None
    if terminal is not None:
        def log(line, _log=log):
            terminal.clear()
            _log(line)
    return torch.device(device), terminal, log


def run(*, epochs_teacher: int | None = None, epochs_student: int | None = None, quick: bool = False,
        seed: int = 0, device: str | torch.device | None = None, backend: str | None = None,
        log=print, progress: bool | None = None) -> dict[str, float]:
    """Train a teacher, a student alone and the same student with `fastkd.losses.KDLoss`; print the table.

    Teacher: 784-1200-1200-10 ReLU MLP with dropout (0.2 on inputs, 0.5 on hidden units) and random
    shifts of up to 2 pixels, trained with cross-entropy. Student: 784-100-100-10 ReLU MLP without
    regularization, trained once with cross-entropy alone and once with
    `KDLoss(temperature=4, ce_weight=0.1, kd_weight=0.9)` against the trained teacher's logits.
    Adam (lr 1e-3, cosine decay), batches of 128, pixels scaled to [0, 1].

    Args:
        epochs_teacher: teacher epochs (default 60, or 2 with `quick`).
        epochs_student: epochs of each student (default 100, or 4 with `quick`).
        quick: a few epochs only, to check that everything runs; the accuracies mean little.
        seed: seeds the train/test split, the initializations, dropout and the batch order.
        device: where to train; default "cuda" when available, else "cpu".
        backend: fastkd backend for the KD loss; None means fastkd's default.
        log: called with one line per trained model and each line of the final table.
        progress: show each model's epochs on one line rewritten in place on stdout; default: when `log` is
            `print` and stdout is a terminal.

    Returns:
        Test accuracies (fractions of the 1000 test images) keyed "teacher", "student", "student_kd".
    """
    if epochs_teacher is None:
        epochs_teacher = QUICK_EPOCHS_TEACHER if quick else EPOCHS_TEACHER
    if epochs_student is None:
        epochs_student = QUICK_EPOCHS_STUDENT if quick else EPOCHS_STUDENT
    if epochs_teacher < 1 or epochs_student < 1:
        raise ValueError(f"epochs must be at least 1, got teacher {epochs_teacher}, student {epochs_student}")
    device, terminal, log = run_setup(device, progress, log)
    kd_loss = KDLoss(temperature=TEMPERATURE, ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT, backend=backend)
    started = time.perf_counter()

    images, labels = load_mnist_5k()
    # The file is sorted by label, so the split needs a shuffle; a seeded one keeps it reproducible.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images = (images[order].float() / 255).to(device)
    labels = labels[order].to(device)
    train_images, train_labels = images[:TRAIN_SIZE], labels[:TRAIN_SIZE]
    test_images, test_labels = images[TRAIN_SIZE:], labels[TRAIN_SIZE:]
    log(f"MNIST subset: {len(train_labels)} training and {len(test_labels)} test images (split seed {seed}), "
        f"device {device}: {machine(device)}")

    def cross_entropy(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, train_labels[batch])

    torch.manual_seed(seed)
    teacher = mlp(TEACHER_HIDDEN, TEACHER_INPUT_DROPOUT, TEACHER_HIDDEN_DROPOUT).to(device)
    teacher_accuracy = train("teacher", teacher, cross_entropy, train_images, test_images, test_labels,
                             epochs=epochs_teacher, seed=seed, jitter_pixels=TEACHER_JITTER_PIXELS, log=log,
                             progress=terminal)

    torch.manual_seed(seed)
    student = mlp(STUDENT_HIDDEN).to(device)
    student_accuracy = train("student", student, cross_entropy, train_images, test_images, test_labels,
                             epochs=epochs_student, seed=seed, log=log, progress=terminal)

    # The student sees unshifted images and the teacher is fixed in eval mode, so its logits for each
    # training image never change: compute them once instead of once per batch per epoch.
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(train_images)

    def distillation(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits, teacher_logits[batch], train_labels[batch])

    torch.manual_seed(seed)
    student_kd = mlp(STUDENT_HIDDEN).to(device)
    student_kd_accuracy = train("student+KD", student_kd, distillation, train_images, test_images,
                                test_labels, epochs=epochs_student, seed=seed, log=log, progress=terminal)

    results = {"teacher": teacher_accuracy, "student": student_accuracy, "student_kd": student_kd_accuracy}
    log_table(results, len(test_labels), log)
    log(f"{time.perf_counter() - started:.0f} s in all. With the same seed the numbers repeat on this machine; on a "
        f"CPU they differ with the CPU model and the thread count (the order of float sums in matrix products).")
    if quick:
        log("(quick mode: a few epochs only, to check that the demo runs; these are not the demo's results)")
    return results


def log_table(results: dict[str, float], test_count: int, log=print) -> None:
    """The results as Hinton et al. present them: test accuracy and test errors per model."""
    descriptions = {
        "teacher": f"teacher 784-{TEACHER_HIDDEN}-{TEACHER_HIDDEN}-10, dropout + jitter",
        "student": f"student 784-{STUDENT_HIDDEN}-{STUDENT_HIDDEN}-10, labels only",
        "student_kd": f"student 784-{STUDENT_HIDDEN}-{STUDENT_HIDDEN}-10, KD (T={TEMPERATURE:g})",
    }
    width = max(len(text) for text in descriptions.values())
    log("")
    log(f"{'model':<{width}}  test accuracy  test errors")
    for key, text in descriptions.items():
        errors = round((1 - results[key]) * test_count)
        log(f"{text:<{width}}  {results[key]:>13.2%}  {errors:>4} / {test_count}")
