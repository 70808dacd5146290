"""Input validation shared by the public functions: clear errors that name the argument.

Only metadata (types, shapes, dtypes, devices) is checked on every call. Value checks that would read
device memory (targets in range) run on CPU tensors outside torch.compile only, so a CUDA call never
waits on the host and a compiled graph never breaks.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

LOGIT_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {value.dtype}")
    return value


def check_index_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(value).__name__}")
    if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of class indices, got {value.dtype}")
    return value


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listed}")


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive Python number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def check_temperature(value: object, logits: torch.Tensor, name: str = "temperature") -> float | torch.Tensor:
    """A positive Python number, or a floating tensor (learnable or per row) on the logits' device whose shape
    broadcasts to the rows `logits.shape[:-1]`; a tensor comes back expanded to that shape (a view). Its values
    are not read here (that would wait on the device): a row whose temperature is not > 0 gets a NaN loss."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a positive Python number or a floating-point tensor (0-d, or one "
                            f"temperature per row), got {type(value).__name__}")
        return check_positive(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != logits.device:
        raise ValueError(f"{name} must be on the logits' device {logits.device}, got {value.device}")
    rows_shape = logits.shape[:-1]
    try:
        if torch.broadcast_shapes(value.shape, rows_shape) != rows_shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} must be a 0-d tensor or have a shape that broadcasts to the rows of the logits "
                         f"{tuple(rows_shape)} (one temperature per row), got {tuple(value.shape)}") from None
    return value.expand(rows_shape)


def check_temperature_setting(value: object, name: str = "temperature") -> float | torch.Tensor:
    """A module's temperature: a positive number, or a floating tensor (an `nn.Parameter` to learn it),
    checked against the logits at each call."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive Python number or a floating-point tensor, "
                        f"got {type(value).__name__}")
    return check_positive(name, value)


def check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_unit_interval(name: str, value: object) -> float:
    value = check_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


VOCAB_MISMATCH = ("error", "truncate")


def check_vocab_sizes(student_vocab: int, teacher_vocab: int, vocab_mismatch: object, what: str = "") -> None:
    """Equal vocabularies, or `vocab_mismatch="truncate"` (the shared first min(V_s, V_t) ids)."""
    check_choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)
    if student_vocab != teacher_vocab and vocab_mismatch == "error":
        raise ValueError(f"the student's vocabulary has {student_vocab} ids and the teacher's {teacher_vocab}{what}; "
                         f"pass vocab_mismatch='truncate' to distil over the first {min(student_vocab, teacher_vocab)} "
                         f"ids both share (the usual case: one of them padded for the GPU, e.g. 151936 vs 152064)")


def check_logits(student_logits: object, teacher_logits: object, vocab_mismatch: str = "error") -> None:
    """Student and teacher logits: floating tensors of the same shape `(..., classes)` on one device; the last
    dimension may differ with `vocab_mismatch="truncate"`."""
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a class dimension, got a 0-d tensor")
    if teacher_logits.dim() != student_logits.dim() or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student_logits and teacher_logits must have the same shape (rows, classes), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape != teacher_logits.shape:
        check_vocab_sizes(student_logits.shape[-1], teacher_logits.shape[-1], vocab_mismatch,
                          f" (student_logits {tuple(student_logits.shape)}, teacher_logits "
                          f"{tuple(teacher_logits.shape)})")
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have at least one class, got 0")
    if teacher_logits.shape[-1] == 0:
        raise ValueError("teacher_logits must have at least one class, got 0")
    if student_logits.numel() == 0:
        raise ValueError(f"the batch is empty: student_logits has shape {tuple(student_logits.shape)}")


def check_target(name: str, target: object, logits: torch.Tensor, classes: int | None = None) -> torch.Tensor:
    """Class indices, one per row of `logits`, each in [0, classes) (default: the logits' last dimension; a
    vocabulary-parallel call passes the whole vocabulary's size)."""
    check_index_tensor(name, target)
    check_same_device(**{name: target, "student_logits": logits})
    rows_shape = logits.shape[:-1]
    if target.shape != rows_shape:
        raise ValueError(f"{name} must have shape {tuple(rows_shape)} (one class index per row of the logits), "
                         f"got {tuple(target.shape)}")
    classes = logits.shape[-1] if classes is None else classes
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= classes:
            raise ValueError(f"{name} holds class indices outside [0, {classes}): min {low}, max {high}")
    return target


def check_labels(labels: object, logits: torch.Tensor) -> torch.Tensor:
    """Per-token labels, used only to mask tokens equal to `ignore_index`."""
    check_index_tensor("labels", labels)
    check_same_device(labels=labels, student_logits=logits)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (one per token), "
                         f"got {tuple(labels.shape)}")
    return labels


def check_sparse_teacher(student_logits: object, teacher_indices: object, teacher_logprobs: object,
                         vocab: int | None = None) -> None:
    """Student logits `(..., V)` and a sparse teacher: ids `(..., k)` and their log-probabilities `(..., k)`, on one
    device. On CPU tensors (outside torch.compile) the ids of used slots (log-probability not -inf) must lie in
    [0, V) (`vocab`: the whole vocabulary's size when the logits are a slice of it); elsewhere such a row's loss is
    NaN (reading the ids would wait on the device)."""
    check_float_tensor("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a class dimension, got a 0-d tensor")
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have at least one class, got 0")
    if student_logits.numel() == 0:
        raise ValueError(f"the batch is empty: student_logits has shape {tuple(student_logits.shape)}")
    check_sparse_slots(teacher_indices, teacher_logprobs, student_logits.shape[:-1],
                       student_logits.shape[-1] if vocab is None else vocab,
                       f"student_logits {tuple(student_logits.shape)}", student_logits=student_logits)


def check_sparse_slots(teacher_indices: object, teacher_logprobs: object, rows_shape: torch.Size, vocab: int,
                       rows_of: str, **beside: torch.Tensor) -> None:
    """A sparse teacher's ids `(..., k)` and log-probabilities `(..., k)` for `rows_shape` rows over `vocab` >= 1
    ids (`rows_of` names what has those rows, for the message), on the device of the tensors in `beside`: the
    checks of `check_sparse_teacher` for a caller without the student's logits (the fused linear loss)."""
    check_index_tensor("teacher_indices", teacher_indices)
    check_float_tensor("teacher_logprobs", teacher_logprobs)
    check_same_device(**beside, teacher_indices=teacher_indices, teacher_logprobs=teacher_logprobs)
    if teacher_indices.shape != teacher_logprobs.shape:
        raise ValueError(f"teacher_indices and teacher_logprobs must have the same shape (..., k), one id and its "
                         f"log-probability per slot, got {tuple(teacher_indices.shape)} and "
                         f"{tuple(teacher_logprobs.shape)}")
    if teacher_indices.dim() != len(rows_shape) + 1 or teacher_indices.shape[:-1] != rows_shape:
        raise ValueError(f"teacher_indices and teacher_logprobs must have shape {tuple(rows_shape)} + (k,) (k "
                         f"teacher slots per row of {rows_of}), got {tuple(teacher_indices.shape)}")
    if teacher_indices.shape[-1] == 0:
        raise ValueError("teacher_indices and teacher_logprobs must have at least one slot per row (k >= 1), got 0")
    if teacher_indices.device.type == "cpu" and not torch.compiler.is_compiling():
        ids = teacher_indices[teacher_logprobs != float("-inf")]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"teacher_indices holds ids outside [0, {vocab}) in used slots (teacher_logprobs not "
                             f"-inf): min {int(ids.min())}, max {int(ids.max())}; mark an unused slot with a "
                             f"teacher_logprobs of -inf (its id is then ignored)")


def check_sparse_temperature(temperature: object, tail: str) -> float:
    """A positive number; 1 unless `tail` is "renormalize" (the teacher's tail is known at T = 1 only)."""
    if isinstance(temperature, torch.Tensor):
        raise TypeError("sparse_kd_loss takes temperature as a positive Python number; a tensor (learnable or "
                        "per-row) temperature is not supported by sparse_kd_loss yet")
    temperature = check_positive("temperature", temperature)
    if tail != "renormalize" and temperature != 1.0:
        raise ValueError(f"tail={tail!r} needs temperature=1, got {temperature}: the stored log-probabilities are "
                         f"the teacher's distribution at T=1, and its mass outside the k ids at another temperature "
                         f"depends on the logits that were not stored; tail='renormalize' tempers the k ids among "
                         f"themselves")
    return temperature


def check_num_items_in_batch(value: object) -> None:
    """The token count of a whole accumulated batch: a positive number, or a tensor of one element (not read)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a tensor of one element, got shape "
                             f"{tuple(value.shape)}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"num_items_in_batch must be a positive number (the tokens counted over the whole "
                         f"accumulated batch) or a tensor, got {value!r}")


def check_features(student_name: str, student: object, teacher_name: str, teacher: object,
                   *, min_dim: int = 2, min_batch: int = 1, same_shape: bool = False) -> None:
    """Student and teacher features with a leading batch dimension of equal size."""
    check_float_tensor(student_name, student)
    check_float_tensor(teacher_name, teacher)
    check_same_device(**{student_name: student, teacher_name: teacher})
    for name, t in ((student_name, student), (teacher_name, teacher)):
        if t.dim() < min_dim:
            raise ValueError(f"{name} must have at least {min_dim} dimensions (batch first), "
                             f"got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{student_name} and {teacher_name} must have the same batch size, "
                         f"got {student.shape[0]} and {teacher.shape[0]}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{student_name} and {teacher_name} must hold a batch of at least {min_batch} samples, got "
                         f"{student.shape[0]} ({student_name} has shape {tuple(student.shape)}): this loss relates "
                         f"the samples of a batch to each other")
    if same_shape and student.shape != teacher.shape:
        raise ValueError(f"{student_name} and {teacher_name} must have the same shape, "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")


def check_feature_lists(student_name: str, students: object, teacher_name: str, teachers: object) -> None:
    for name, value in ((student_name, students), (teacher_name, teachers)):
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    if len(students) != len(teachers):
        raise ValueError(f"{student_name} and {teacher_name} must have the same length, "
                         f"got {len(students)} and {len(teachers)}")
    if len(students) == 0:
        raise ValueError(f"{student_name} is empty: at least one feature map is needed")
