"""Static GPU checks without a GPU: compile every Triton kernel the public launchers produce, for a given
architecture, and read its resource usage and widest global load from the cubin.

Triton compiles for a GPU it cannot see: a stand-in driver reports the target (`GPUTarget("cuda", 90, 32)`),
and `JITFunction.run` is forced to `warmup=True`, so calling the launchers (`kl.kl_rows` and so on) on CPU
tensors compiles each kernel with exactly the specialisation (constexprs, divisibility-by-16 and
equal-to-1 arguments) a launch would have, and launches nothing. `cuobjdump` (bundled with Triton) reads
registers, stack and local memory (spills) and the SASS loads.

The kernels must have been defined without `TRITON_INTERPRET=1` (the interpreter replaces them); run this in
a process without it, e.g. `python -m fastkd kernels` or a subprocess (as `tests/test_static_compile.py`).
"""
from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

ARCHS = ("8.0", "9.0")
LOGIT_KERNELS = ("kl_rows_kernel", "jsd_rows_kernel", "dkd_rows_kernel")
SPARSE_KERNELS = ("sparse_kd_rows_kernel",)
SCALE_KERNELS = ("scale_rows_kernel",)
VOCAB_KERNELS = ("vocab_stats_kernel", "vocab_terms_kernel", "vocab_grad_kernel")
AT_KERNELS = ("at_map_forward_kernel", "at_map_backward_kernel")
RKD_KERNELS = ("rkd_sq_dist_kernel", "rkd_weighted_diff_kernel", "rkd_angle_forward_kernel",
               "rkd_angle_rows_kernel", "rkd_angle_cols_kernel")


@dataclass
class KernelRow:
    kernel: str  # the @triton.jit function
    arch: str  # "9.0"
    case: str  # what the launcher was called with: dtype, layout, shape, flags
    constexprs: str  # the launcher's constexpr arguments
    registers: int
    shared: int  # static shared memory, bytes (Triton's own, from its metadata)
    stack: int  # bytes; non-zero means spills (or a local array)
    local: int  # bytes
    widest_load: str  # widest LDG in the SASS, e.g. "LDG.E.128"; "" if none
    loads: str  # every distinct LDG form


def tools_dir() -> pathlib.Path:
    import triton
    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def unavailable_reason() -> str | None:
    """Why the report cannot run here, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the kernels are interpreted, not compiled (run in a process without it)"
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.driver import CudaDriver  # noqa: F401
    except Exception as err:  # ImportError, or a Triton without the NVIDIA backend
        return f"triton with its NVIDIA backend is not importable: {err}"
    if not (tools_dir() / "cuobjdump").exists():
        return f"Triton's bundled cuobjdump is missing ({tools_dir()})"
    return None


def _load_width(op: str) -> int:
    m = re.search(r"\.(8|16|32|64|128)\b", op)
    return int(m.group(1)) if m else 32  # plain LDG.E is 32 bits


def _inspect(cubin: bytes, tmp: pathlib.Path, name: str) -> tuple[int, int, int, str, str]:
    path = tmp / f"{name}.cubin"
    path.write_bytes(cubin)
    tool = str(tools_dir() / "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout

    def field(key):
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else -1
    loads = sorted(set(re.findall(r"\bLDG(?:\.[A-Z0-9_]+)*", sass)), key=_load_width)
    return field("REG"), field("STACK"), field("LOCAL"), (loads[-1] if loads else ""), " ".join(loads)


@contextlib.contextmanager
def _stand_in(arch: str, record):
    """Install a driver that reports `arch`, with every kernel compiled, not launched, and `record` called
    with (jit_function, compiled_kernel, kwargs); restore the real driver and the kernels' caches after."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver as config
    from triton.runtime.jit import JITFunction

    major, minor = (int(v) for v in arch.split("."))
    capability = major * 10 + minor

    class StandInDriver(CudaDriver):
        def __init__(self):  # no CUDA library loaded: nothing here touches a device
            pass

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        @staticmethod
        def is_active():
            return True

    saved_caches = {}  # the kernels' per-device caches, which would otherwise keep stand-in compilations
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if id(self) not in saved_caches:
            saved_caches[id(self)] = (self, self.device_caches)
            self.device_caches = collections.defaultdict(self.create_binder)
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        record(self, kernel, kwargs)
        return kernel

    previous = config._active
    config.set_active(StandInDriver())
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original_run
        config._active = previous
        for fn, caches in saved_caches.values():
            fn.device_caches = caches


def _cases():
    """(label, kernels, thunk): the public launchers on small CPU tensors, covering the specialisations,
    and the kernels each case launches."""
    from . import attention, dkd, jsd, kl, rkd, sparse, vocab_parallel
    from . import rows as row_kernels

    cases = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def logits(V, dtype, strided):
        if strided:  # logits[:, :-1] of (2, 5, V): rows addressed by two strides, V-aligned row starts
            s = torch.zeros(2, 5, V, dtype=dtype)[:, :-1]
            t = torch.zeros(2, 5, V, dtype=dtype)[:, :-1]
        else:
            s, t = torch.zeros(8, V, dtype=dtype), torch.zeros(8, V, dtype=dtype)
        rows = s.numel() // V
        y = torch.zeros(s.shape[:-1], dtype=torch.long)
        g = torch.ones(rows)
        return s, t, y, g, rows

    # The row kernels write the gradient(s) in the forward pass: each case compiles one specialisation of the
    # gradient flags, "grads" (student and teacher: mutual learning, the most registers), "student grad" (the
    # usual distillation) and "no grad" (inference: no gradient written).
    flags = {"grads": (True, True), "student grad": (True, False), "no grad": (False, False)}

    def logit_case(V, dtype, strided, labels, ce, grads, t_grad=False):
        def thunk():
            s, t, y, g, rows = logits(V, dtype, strided)
            lab = y if labels else None
            tgt = y if ce else None
            one = torch.ones(1).expand(rows)  # a weight the same for every row: read through stride 0
            t_rows = g if t_grad else None  # a per-row temperature, with its gradient
            kl.kl_rows(s, t, 2.0, t_rows, False, tgt, lab, -100, one, g if ce else None, *flags[grads], t_grad)
            jsd.jsd_rows(s, t, 0.5, 2.0, t_rows, lab, -100, g, *flags[grads], t_grad)
            if ce:  # DKD always has its target
                dkd.dkd_rows(s, t, y, 4.0, t_rows, one, g, *flags[grads], t_grad)
        return thunk

    for name, dtype in dtypes.items():
        # one block (1024: 4 warps; 4096 = rows.MAX_BLOCK_V: 16 warps), and a long row (V > MAX_BLOCK_V: the
        # streaming loop, blocks of rows.STREAM_BLOCK_V)
        for V in (1024, 4096, 8192):
            for strided in ((False, True) if name != "fp16" else (False,)):  # fp16 strided: as bf16's
                layout = "strided" if strided else "contiguous"
                for grads in (("grads", "student grad", "no grad") if not strided else ("grads",)):
                    cases.append((f"{name} {layout} V={V} labels+ce {grads}", LOGIT_KERNELS,
                                  logit_case(V, dtype, strided, True, True, grads)))
            # a per-row temperature and its gradient, beside both input gradients (the most registers)
            cases.append((f"{name} contiguous V={V} labels+ce grads+dT", LOGIT_KERNELS,
                          logit_case(V, dtype, False, True, True, "grads", t_grad=True)))
        cases.append((f"{name} contiguous V=8192 plain student grad", LOGIT_KERNELS[:2],
                      logit_case(8192, dtype, False, False, False, "student grad")))

    def sparse_case(V, dtype, strided, tail, grad, labels):
        def thunk():
            s, _, y, g, rows = logits(V, dtype, strided)
            ids = torch.zeros(*s.shape[:-1], 64, dtype=torch.long)  # a top-64 cache
            lp = torch.zeros(*s.shape[:-1], 64, dtype=dtype)
            sparse.sparse_kd_rows(s, ids, lp, tail, 1.0, y if labels else None, -100, g, grad)
        return thunk

    # Sparse-teacher KD: one block (1024, 4096) and a long row (8192); the bucket tail (the bitmap: the most
    # registers) and renormalize, with the student's gradient (and labels), and without (inference).
    for name, dtype in dtypes.items():
        for V in (1024, 4096, 8192):
            for tail in ("bucket", "renormalize"):
                cases.append((f"{name} contiguous V={V} sparse {tail} labels student grad", SPARSE_KERNELS,
                              sparse_case(V, dtype, False, tail, True, True)))
                cases.append((f"{name} contiguous V={V} sparse {tail} no grad", SPARSE_KERNELS,
                              sparse_case(V, dtype, False, tail, False, False)))
            if name != "fp16":
                cases.append((f"{name} strided V={V} sparse bucket student grad", SPARSE_KERNELS,
                              sparse_case(V, dtype, True, "bucket", True, False)))

    # The vocabulary-parallel slice kernels (one specialisation per case): the statistics; the partial sums with the
    # forward KL's gradient, and the JSD's (the mixture: the most registers); the JSD's gradient pass.
    def vocab_case(V, dtype, strided, what):
        def thunk():
            s, t, _, g, rows = logits(V, dtype, strided)
            pair, kl_rows = torch.zeros(rows, 2), torch.zeros(rows)
            if what == "stats":
                vocab_parallel.vocab_row_stats(s, t, 0.5)
            elif what == "terms forward grad":
                vocab_parallel.vocab_row_terms(s, t, 0.5, pair, pair, "forward", 0.5, g, True)
            elif what == "terms jsd":
                vocab_parallel.vocab_row_terms(s, t, 0.5, pair, pair, "jsd", 0.3, None, False)
            else:
                vocab_parallel.vocab_row_grad(s, t, 0.5, pair, pair, "jsd", 0.3, kl_rows, g)
        return thunk

    vocab_kernel = {"stats": VOCAB_KERNELS[:1], "terms forward grad": VOCAB_KERNELS[1:2],
                    "terms jsd": VOCAB_KERNELS[1:2], "grad jsd": VOCAB_KERNELS[2:]}
    for name, dtype in dtypes.items():
        for V in (1024, 8192):
            for what, kernels in vocab_kernel.items():
                cases.append((f"{name} contiguous V={V} vocab {what}", kernels, vocab_case(V, dtype, False, what)))
    for what, kernels in vocab_kernel.items():
        cases.append((f"bf16 strided V=8192 vocab {what}", kernels, vocab_case(8192, torch.bfloat16, True, what)))

    def scale_case(V, dtype):
        def thunk():
            row_kernels.scale_rows_(torch.zeros(8, V, dtype=dtype), torch.ones(1).expand(8))
        return thunk

    for name, dtype in dtypes.items():
        for V in (1024, 32000):  # one program a row, and several
            cases.append((f"{name} contiguous V={V} scale", SCALE_KERNELS, scale_case(V, dtype)))

    def at_case(dtype, p, channels_last):
        def thunk():
            f = torch.zeros(2, 64, 8, 8, dtype=dtype)
            if channels_last:
                f = f.contiguous(memory_format=torch.channels_last)
            attention.at_channel_mean_pow(f, p)
            attention.at_channel_mean_pow_backward(torch.ones(2, 64), f, p)
        return thunk

    for name, dtype in dtypes.items():
        for p in (2.0, 3.0, 5.0, 2.5):
            for cl in (False, True):
                cases.append((f"{name} {'channels-last' if cl else 'channels-first'} p={p:g}", AT_KERNELS,
                              at_case(dtype, p, cl)))

    def rkd_case(unit):
        def thunk():
            B, D = 40, 64
            x = torch.zeros(B, D)
            q = torch.zeros(B, B)
            rkd.rkd_sq_distances(x)
            rkd.rkd_weighted_diff(q, x)
            rkd.rkd_angle_sum(q, q, q, q, unit, unit)
            rkd.rkd_angle_weights(q, q, q, q, unit)
        return thunk

    for unit in (False, True):
        cases.append((f"fp32 B=40 unit={unit}", RKD_KERNELS, rkd_case(unit)))
    return cases


def plan(archs=ARCHS) -> list[tuple[str, str, str]]:
    """The (kernel, arch, case) rows `compile_report` produces, without compiling anything."""
    return [(k, arch, case) for arch in archs for case, kernels, _ in _cases() for k in kernels]


def compile_report(archs=ARCHS) -> list[KernelRow]:
    """Compile every kernel of every case for each architecture; one row per (kernel, arch, case)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    rows: list[KernelRow] = []
    seen = set()
    with tempfile.TemporaryDirectory(prefix="fastkd-static-") as tmp:
        tmp = pathlib.Path(tmp)
        for arch in archs:
            label = [""]
            inspected = {}

            def record(fn, kernel, kwargs):
                name = fn.fn.__name__
                constexprs = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                                      if k.isupper() or k == "num_warps")
                key = (name, arch, label[0], constexprs)
                if key in seen:
                    return
                seen.add(key)
                if id(kernel) not in inspected:
                    inspected[id(kernel)] = (kernel, _inspect(kernel.asm["cubin"], tmp, name))
                reg, stack, local, widest, loads = inspected[id(kernel)][1]
                shared = int(getattr(kernel.metadata, "shared", -1))
                rows.append(KernelRow(name, arch, label[0], constexprs, reg, shared, stack, local, widest, loads))

            with _stand_in(arch, record):
                for case, kernels, thunk in _cases():
                    label[0] = case
                    before = len(rows)
                    thunk()
                    launched = tuple(r.kernel for r in rows[before:])
                    if sorted(launched) != sorted(kernels):
                        raise RuntimeError(f"{case}: launched {launched}, expected {kernels}")
    return rows


def format_table(rows: list[KernelRow]) -> str:
    head = ("kernel", "arch", "case", "regs", "smem", "stack", "local", "widest load")
    body = [(r.kernel, r.arch, r.case, str(r.registers), str(r.shared), str(r.stack), str(r.local), r.widest_load)
            for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body)


def main() -> None:
    import argparse
    import json
    from dataclasses import asdict
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default=",".join(ARCHS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = compile_report(tuple(a.strip() for a in args.arch.split(",") if a.strip()))
    print(json.dumps([asdict(r) for r in rows]) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
