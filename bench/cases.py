"""What is measured: the losses, the shapes users run them at, their inputs, and each pass's minimal bytes.

A case is one loss at one shape and dtype: image classifiers' logits and features, LLM vocabularies up to
256K, RKD batches, ResNet maps, and the LLM output layer fused with the loss (`fused_*`: hidden states and
weights in, no logits out). The floor of a pass is the bytes it cannot avoid moving, whatever the
kernel design (ours re-read the logits in the backward pass; the floor does not).

The fused linear + distillation cases (family "fused_linear", shape `BT x H x V`): student and teacher hidden
states `(BT, H)` and output weights `(V, H)` (the teacher's H equal to the student's), int64 labels `(BT,)` (no
token ignored), one loss `fastkd.functional.fused_linear_distill_loss` computes from them. The student's hidden
states and weight need a gradient (the output layer is trained), the teacher's do not. Two more things per pass:

- the floor (`min_bytes`): reading h_s, W_s, h_t, W_t and the labels once (forward, with or without a gradient:
  an implementation may leave the gradients to the backward), writing dh_s and dW_s once, in the inputs' dtype
  (backward); forward + backward both. Nothing N x V: the logits need not exist. At LLM shapes these losses are
  compute-bound (4 products of 2 x BT x H x V FLOPs against ~4 x V x H x e bytes), so `% floor` is small by
  nature and the FLOP rate below is the figure to read.
- the matmul FLOPs (`flops`): F = 2 products of 2 x BT x H x V (student and teacher logits), G = 2 more
  (dh_s = dz W_s and dW_s = dz^T h_s), counted in the pass where each peer's design runs them
  (`FLOPS_SPLIT`): the unfused composition (eager, compile) runs F in the forward and G in autograd's backward;
  fastkd (triton, cuda) runs G in the forward when the student needs a gradient (`fwd`), not under
  `torch.no_grad()`, and nothing but a scaling in the backward; Liger's chunked loss runs G in its forward
  always (`torch.func.grad_and_value` per chunk, even under no_grad). `fwd+bwd` is F + G for every peer: the
  pass to compare FLOP rates on. Softmax, exp and the loss's other elementwise work are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "fwd-nograd": the forward under torch.no_grad() (inference: fastkd's kernels write no N x V gradient);
# "fwd": the forward as in training, the student requiring a gradient (fastkd writes the student's gradient
# here, so its forward costs what a forward + backward pair cost before); "bwd": the backward of that graph
# alone; "fwd+bwd": the training step, forward then `loss.backward()`.
PASSES = ("fwd-nograd", "fwd", "bwd", "fwd+bwd")


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
    # The output layer fused with the loss (module docstring): hidden states and weights in, the logits never
    # materialised by fastkd. "loss" is fused_linear_distill_loss's own option.
    Loss("fused_jsd", "fused_linear_distill_loss", "fused_linear", {"loss": "jsd", "beta": 0.5}),
    Loss("fused_kl", "fused_linear_distill_loss", "fused_linear", {"loss": "forward_kl"}),
)}
FUSED_HIDDEN = 4096
FUSED_VOCABS = (32000, 128256, 262144)   # Llama 2, Llama 3, Gemma 3

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
    # BT x H x V. The default run takes BT 4096 and 8192; the rest of the sweep (BT 1024, 16384) is opt-in.
    "fused_linear": {
        "llm_fused": ([(bt, FUSED_HIDDEN, v) for bt in (4096, 8192) for v in FUSED_VOCABS], ("bfloat16",)),
        "llm_fused_sweep": ([(bt, FUSED_HIDDEN, v) for bt in (1024, 16384) for v in FUSED_VOCABS], ("bfloat16",)),
    },
}
# Groups that run only when named in --shapes (the full suite without --shapes leaves them out).
OPT_IN_GROUPS = {"llm_fused_sweep"}

# --quick: tiny shapes, one per regime, that run in seconds on a CPU (and in Triton's interpreter).
QUICK_SHAPES = {
    "logits": {"image": ([(64, 100)], ("float32",)), "llm": ([(32, 512)], ("bfloat16",))},
    "rkd": {"rkd": ([(16, 32)], ("float32",))},
    "at": {"resnet": ([(4, 8, 8, 8)], ("float32",))},
    "fused_linear": {"llm_fused": ([(64, 32, 100)], ("bfloat16",)),
                     "llm_fused_sweep": ([(16, 32, 300)], ("bfloat16",))},
}

# Where each peer runs the gradient products G of the fused cases (module docstring): "backward" (autograd, the
# unfused composition), "forward" (in the forward when the student needs a gradient: fastkd), "always" (in the
# forward, with or without autograd: Liger's chunked loss). Peers not listed count as "backward".
FLOPS_SPLIT = {"eager": "backward", "compile": "backward", "triton": "forward", "cuda": "forward",
               "liger": "always"}


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

    @property
    def fused(self) -> bool:
        return self.loss.family == "fused_linear"

    def input_bytes(self) -> int:
        """Bytes of one input set (student and teacher, plus DKD's and the fused cases' labels)."""
        if self.fused:
            bt, h, v = self.shape
            return 2 * (bt * h + v * h) * self.elem_size + 8 * bt
        n = 2 * math.prod(self.shape) * self.elem_size
        if self.loss.op == "dkd_loss":
            n += self.shape[0] * 8
        return n

    def min_bytes(self, pass_: str) -> int:
        """The floor of docs/performance.md: bytes that any implementation of this pass must move.

        Logit losses (and RKD): forward reads s and t (2x, with or without a gradient: an implementation may
        leave ds to the backward), the backward writes ds (1x; the fused design computes the gradient while it
        reads s and t), forward + backward 3 x elem size x elements.
        Attention transfer: the forward reads s and t, the backward re-reads s and writes ds: 4x in all.
        DKD adds its N int64 labels, read once per pass that needs them.
        Fused linear + loss (module docstring): forward reads h_s, W_s, h_t, W_t and the int64 labels once;
        backward writes dh_s and dW_s; forward + backward both.
        """
        if self.fused:
            bt, h, v = self.shape
            read = 2 * (bt * h + v * h) * self.elem_size + 8 * bt
            write = (bt * h + v * h) * self.elem_size
            return {"fwd-nograd": read, "fwd": read, "bwd": write, "fwd+bwd": read + write}[pass_]
        size = math.prod(self.shape) * self.elem_size
        per_pass = {"at": {"fwd-nograd": 2, "fwd": 2, "bwd": 2, "fwd+bwd": 4}}.get(
            self.loss.family, {"fwd-nograd": 2, "fwd": 2, "bwd": 1, "fwd+bwd": 3})
        n = per_pass[pass_] * size
        if self.loss.op == "dkd_loss" and pass_ != "bwd":
            n += self.shape[0] * 8
        return n

    def path_bytes(self, backend: str, pass_: str) -> int | None:
        """Bytes fastkd's `backend` kernels move in this pass, from their own traffic model (bench/traffic.py);
        None for peers and losses without one."""
        from .traffic import path_bytes
        return path_bytes(self.loss, self.shape, self.dtype, backend, pass_)

    def flops(self, pass_: str, peer: str | None = None) -> int | None:
        """Matrix-product FLOPs `peer` runs in `pass_` on a fused case (module docstring, `FLOPS_SPLIT`; None peer:
        the unfused split); None for the other losses."""
        if not self.fused:
            return None
        if pass_ not in PASSES:
            raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
        bt, h, v = self.shape
        product = 2 * bt * h * v
        f, g = 2 * product, 2 * product
        split = FLOPS_SPLIT.get(peer, "backward")
        return {"fwd-nograd": f + (g if split == "always" else 0),
                "fwd": f + (g if split != "backward" else 0),
                "bwd": g if split == "backward" else 0,
                "fwd+bwd": f + g}[pass_]

    def make_inputs(self, device, seed: int = 0) -> tuple:
        """One input set: the student needs a gradient, the teacher does not (the usual distillation)."""
        if self.fused:
            return self._fused_inputs(device, seed)
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

    def _fused_inputs(self, device, seed: int) -> tuple:
        """(h_s, W_s, h_t, W_t, labels): hidden states N(0, 1), weights N(0, 1 / H) (logits of standard deviation
        about 1), labels uniform over the vocabulary (none ignored). h_s and W_s need a gradient."""
        bt, h, v = self.shape
        dtype = DTYPES[self.dtype]
        on_device = v * h > 1 << 26 and torch.device(device).type == "cuda"
        gen = torch.Generator(device=device if on_device else "cpu").manual_seed(seed)
        where = device if on_device else "cpu"

        def draw(*shape, scale=1.0):
            x = torch.randn(shape, generator=gen, device=where, dtype=dtype)
            return (x.mul_(scale) if scale != 1.0 else x).to(device)
        h_s, w_s = draw(bt, h), draw(v, h, scale=h ** -0.5)
        h_t, w_t = draw(bt, h), draw(v, h, scale=h ** -0.5)
        labels = torch.randint(0, v, (bt,), generator=gen, device=where).to(device)
        return h_s.requires_grad_(True), w_s.requires_grad_(True), h_t, w_t, labels

    def check_slice(self, inputs: tuple) -> tuple:
        """Smaller inputs for the correctness check when the reference does not fit at full size:
        the first rows (samples) of each tensor. The loss on them is still a loss both sides must agree on.
        Fused cases: the first 256 tokens of h_s, h_t and the labels, the weights whole (the same W_s leaf: its
        gradient is checked over the whole vocabulary)."""
        if self.fused:
            h_s, w_s, h_t, w_t, labels = inputs
            h_s = h_s.detach()[:256].clone().requires_grad_(True)
            return h_s, w_s, h_t[:256], w_t, labels[:256]
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
    and dtypes; None means all. An explicit shape applies to the losses whose family has that rank.
    Groups in `OPT_IN_GROUPS` run only when named. Fused cases take shapes `BT x H x V` (rank 3).
    """
    table = QUICK_SHAPES if quick else FULL_SHAPES
    names = list(LOSSES) if not losses else losses
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(f"unknown loss {unknown}; choose from {list(LOSSES)}")
    groups = {g for fam in table.values() for g in fam}
    try:
        explicit = [parse_shape(s) for s in (shapes or []) if s not in groups]
    except ValueError:
        raise ValueError(f"unknown shape in {list(shapes)}: give shape groups from {sorted(groups)} or shapes "
                         f"like 256x1000 (fused cases: BTxHxV, e.g. 4096x4096x128256)") from None
    wanted_groups = [s for s in (shapes or []) if s in groups]
    cases = []
    for name in names:
        loss = LOSSES[name]
        for group, (group_shapes, group_dtypes) in table[loss.family].items():
            if (group not in wanted_groups) if shapes else (group in OPT_IN_GROUPS):
                continue
            for shape in group_shapes:
                for dtype in group_dtypes:
                    if dtypes and dtype not in dtypes:
                        continue
                    cases.append(Case(loss, shape, dtype, group))
        rank = len(next(iter(table[loss.family].values()))[0][0])
        for shape in explicit:
            if len(shape) == rank:
                # Fused cases: bfloat16 unless asked (a float32 LLM output layer is not what anyone trains).
                for dtype in dtypes or (("bfloat16",) if loss.family == "fused_linear" else ("float32", "bfloat16")):
                    cases.append(Case(loss, shape, dtype, "custom"))
    seen, unique = set(), []
    for case in cases:  # a shape named both in a group and explicitly runs once
        key = (case.loss.name, case.shape, case.dtype)
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique
