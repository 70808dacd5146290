"""What is measured: the losses, the shapes users run them at, their inputs, and each pass's minimal bytes.

A case is one loss at one shape and dtype: image classifiers' logits and features, LLM vocabularies up to
256K, RKD batches, ResNet maps. The floor of a pass is the bytes it cannot avoid moving, whatever the
kernel design (ours re-read the logits in the backward pass; the floor does not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Loss:
    name: str      # the name on the command line and in the CSV
    op: str        # the fastkd function (and reference) that computes it
    family: str    # "logits", "rkd" or "at": decides the inputs and the byte counts
    kwargs: dict = field(default_factory=dict)


LOSSES = {loss.name: loss for loss in (
    Loss("kd", "kd_loss", "logits", {"temperature": 4.0}),
    Loss("kl_forward", "kl_div_loss", "logits", {"direction": "forward"}),
    Loss("kl_reverse", "kl_div_loss", "logits", {"direction": "reverse"}),
    Loss("jsd", "jsd_loss", "logits", {"beta": 0.5}),
    Loss("dkd", "dkd_loss", "logits", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}),
    Loss("rkd", "rkd_loss", "rkd"),
    Loss("at", "at_loss", "at"),
)}

# Shape groups per family, each a list of (shape, dtypes). "image" and "llm" are the two logit regimes:
# launch-bound small batches and memory-bound large vocabularies.
FULL_SHAPES = {
    "logits": {
        "image": ([(256, 100), (256, 1000), (1024, 1000)], ("float32", "bfloat16")),
        "llm": ([(n, v) for n in (2048, 8192, 16384) for v in (32000, 128256, 151936)], ("bfloat16",)),
    },
    "rkd": {"rkd": ([(b, d) for b in (64, 256, 1024, 4096) for d in (128, 512, 2048)], ("float32",))},
    "at": {"resnet": ([(256, 64, 56, 56), (256, 128, 28, 28), (256, 256, 14, 14), (256, 512, 7, 7)],
                      ("bfloat16", "float32"))},
}

# --quick: tiny shapes, one per regime, that run in seconds on a CPU (and in Triton's interpreter).
QUICK_SHAPES = {
    "logits": {"image": ([(64, 100)], ("float32",)), "llm": ([(32, 512)], ("bfloat16",))},
    "rkd": {"rkd": ([(16, 32)], ("float32",))},
    "at": {"resnet": ([(4, 8, 8, 8)], ("float32",))},
}


@dataclass(frozen=True)
class Case:
    loss: Loss
    shape: tuple
    dtype: str
    group: str

    @property
    def label(self) -> str:
        return f"{self.loss.name} {shape_label(self.shape)} {self.dtype}"

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def input_bytes(self) -> int:
        """Bytes of one input set (student and teacher, plus DKD's labels)."""
        n = 2 * math.prod(self.shape) * self.elem_size
        if self.loss.op == "dkd_loss":
            n += self.shape[0] * 8
        return n

    def min_bytes(self, pass_: str) -> int:
        """The floor of docs/performance.md: bytes that any implementation of this pass must move.

        Logit losses (and RKD): forward reads s and t (2x), the backward writes ds (1x; the fused design
        computes the gradient while it reads s and t), forward + backward 3 x elem size x elements.
        Attention transfer: the forward reads s and t, the backward re-reads s and writes ds: 4x in all.
        DKD adds its N int64 labels, read once per pass that needs them.
        """
        size = math.prod(self.shape) * self.elem_size
        per_pass = {"at": {"fwd": 2, "bwd": 2, "fwd+bwd": 4}}.get(self.loss.family,
                                                                  {"fwd": 2, "bwd": 1, "fwd+bwd": 3})
        n = per_pass[pass_] * size
        if self.loss.op == "dkd_loss" and pass_ != "bwd":
            n += self.shape[0] * 8
        return n

    def make_inputs(self, device, seed: int = 0) -> tuple:
        """One input set: the student needs a gradient, the teacher does not (the usual distillation)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dtype = DTYPES[self.dtype]
        # Drawn on the CPU for the same numbers on every device, then moved; fine for the sizes here
        # except the largest LLM shapes, which are drawn on the device directly.
        if math.prod(self.shape) > 1 << 26 and torch.device(device).type == "cuda":
            dev_gen = torch.Generator(device=device).manual_seed(seed)
            s = torch.randn(self.shape, generator=dev_gen, device=device, dtype=dtype)
            t = torch.randn(self.shape, generator=dev_gen, device=device, dtype=dtype)
        else:
            s = torch.randn(self.shape, generator=gen, dtype=dtype).to(device)
            t = torch.randn(self.shape, generator=gen, dtype=dtype).to(device)
        s.requires_grad_(True)
        if self.loss.op == "dkd_loss":
            target = torch.randint(0, self.shape[-1], (self.shape[0],), generator=gen).to(device)
            return s, t, target
        return s, t

    def check_slice(self, inputs: tuple) -> tuple:
        """Smaller inputs for the correctness check when the reference does not fit at full size:
        the first rows (samples) of each tensor. The loss on them is still a loss both sides must agree on."""
        rows = 256 if self.loss.family == "logits" else max(2, min(self.shape[0], 64))
        out = [x.detach()[:rows].clone() for x in inputs]
        out[0].requires_grad_(True)
        return tuple(out)


def shape_label(shape) -> str:
    return "x".join(str(d) for d in shape)


def parse_shape(text: str) -> tuple:
    return tuple(int(d) for d in text.lower().split("x"))


def build_cases(losses=None, shapes=None, dtypes=None, quick=False) -> list[Case]:
    """The cases for these losses (names), shape groups or explicit shapes ("image", "llm", "256x1000"),
    and dtypes; None means all. An explicit shape applies to the losses whose family has that rank."""
    table = QUICK_SHAPES if quick else FULL_SHAPES
    names = list(LOSSES) if not losses else losses
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(f"unknown loss {unknown}; choose from {list(LOSSES)}")
    groups = {g for fam in table.values() for g in fam}
    explicit = [parse_shape(s) for s in (shapes or []) if s not in groups]
    wanted_groups = [s for s in (shapes or []) if s in groups]
    cases = []
    for name in names:
        loss = LOSSES[name]
        for group, (group_shapes, group_dtypes) in table[loss.family].items():
            if shapes and group not in wanted_groups:
                continue
            for shape in group_shapes:
                for dtype in group_dtypes:
                    if dtypes and dtype not in dtypes:
                        continue
                    cases.append(Case(loss, shape, dtype, group))
        rank = len(next(iter(table[loss.family].values()))[0][0])
        for shape in explicit:
            if len(shape) == rank:
                for dtype in dtypes or ("float32", "bfloat16"):
                    cases.append(Case(loss, shape, dtype, "custom"))
    return cases
