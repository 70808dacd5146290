"""The CPU stand-in of the CUDA extension, for testing the kernels of csrc/ without a GPU.

`build()` compiles the same sources (csrc/sources.txt) with the host C++ compiler and -DFASTKD_STANDIN: the
kernels run on CPU threads, one per CUDA thread of a block (csrc/standin/cuda_standin.h says how, and what
it cannot see), on CPU tensors. The operators are `torch.ops.<library>.cuda_*` with the real extension's
schemas, under a library other than `fastkd` (default `fastkd_standin`), so that the stand-in never
collides with the real extension. It is thousands of times slower than a GPU: small shapes only.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import build as cuda_build

LIBRARY = "fastkd_standin"
# -O1 keeps the compile short; -fno-strict-aliasing because the vector loads read tensors through uint4, as
# CUDA code does. The sanitizer stops the process, as a GPU faults, on a misaligned vector load or store
# (which x86 would forgive) and on an index outside a fixed-size array (__shared__ and per-thread arrays).
# C++20 for the stand-in's std::barrier whatever the torch (2.11's extension builder defaults to C++17).
SANITIZE = ["-fsanitize=alignment,bounds", "-fno-sanitize-recover=all"]
FLAGS = ["-std=c++20", "-O1", "-DFASTKD_STANDIN", "-DFASTKD_ARCHS=cpu_standin", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
         *SANITIZE]


def unavailable_reason() -> str | None:
    """None if the stand-in can be compiled here, else why not."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ or g++) on PATH"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the wheel puts the binary on PATH only inside its environment)
        except ImportError:
            return "torch.utils.cpp_extension needs ninja"
    from torch.utils import cpp_extension
    if not any((Path(p) / "torch" / "library.h").is_file() for p in cpp_extension.include_paths()):
        return "this PyTorch has no C++ headers (torch/library.h)"
    return None


def _write_if_changed(path: Path, text: str) -> None:
    # An unchanged file keeps its timestamp, so ninja does not recompile it.
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def build(library: str = LIBRARY, csrc: Path | None = None, only: list[str] | None = None,
          verbose: bool = False):
    """Compile (or reuse from the extension cache) and load the stand-in; returns `torch.ops.<library>`.

    `csrc`: the source folder (default the checkout's csrc/; a test passes a patched copy); `only`: the
    kernel files to compile (ops.cpp is always in). Each library name is one cached build.
    """
    import torch
    from torch.utils import cpp_extension

    if library == "fastkd":
        raise ValueError("the stand-in must not register under `fastkd`, the real extension's library")
    directory = Path(cpp_extension._get_build_directory(library, verbose))
    wrappers = []
    for source in cuda_build.sources(Path(csrc) if csrc is not None else cuda_build.CSRC):
        if only is not None and source.name not in set(only) | {"ops.cpp"}:
            continue
        # g++ compiles a .cpp that includes the .cu (torch would hand a .cu to nvcc); its own includes are
        # found beside it.
        wrapper = directory / f"{source.name}.cpp"
        _write_if_changed(wrapper, f'#include "{source.resolve()}"\n')
        wrappers.append(str(wrapper))
    cpp_extension.load(name=library, sources=wrappers, extra_cflags=FLAGS + [f"-DFASTKD_LIBRARY={library}"],
                       extra_ldflags=SANITIZE[:1], build_directory=str(directory), is_python_module=False,
                       verbose=verbose)
    return getattr(torch.ops, library)


_kernel_sets: dict[tuple[str, tuple[str, ...]], object] = {}


def kernel_set(ops):
    """The operators of the stand-in build `ops` (`torch.ops.<library>`, all or some of csrc/'s) as the "cuda"
    backend's `KernelSet`, with the declared fakes and autograd (`fastkd.kernel_ops`), registered once."""
    from .. import kernel_ops
    library = ops.name
    names = tuple(name for name in kernel_ops.OPS if hasattr(ops, f"cuda_{name}"))
    if (library, names) not in _kernel_sets:
        _kernel_sets[library, names] = kernel_ops.register("cuda", library=library, names=names)
    return _kernel_sets[library, names]


def losses(ops) -> dict:
    """The kernel losses (`fastkd.kernel_losses`) on the stand-in's operators, by name, called as the public
    functions are (their defaults, no validation): the CUDA kernels' device code behind the public formulas."""
    import inspect

    from .. import functional
    from ..kernel_losses import LOSSES
    kernels = kernel_set(ops)

    def with_public_defaults(name, loss):
        signature = inspect.signature(getattr(functional, name))
        # The public options that the kernel loss does not take (`backend`; options the public function handles
        # itself before it dispatches, such as `vocab_mismatch`): dropped where left at their defaults.
        taken = set(inspect.signature(loss).parameters)
        public_only = [p for p in signature.parameters.values() if p.name not in taken]

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for parameter in public_only:
                value = bound.arguments.pop(parameter.name)
                if parameter.name != "backend" and value != parameter.default:
                    raise TypeError(f"the stand-in's {name} calls the kernel loss directly: it cannot take "
                                    f"{parameter.name}={value!r}")
            return loss(kernels, *bound.args, **bound.kwargs)
        return call

    # (A kernel loss without a public function of its name, a helper of another, is left out.)
    return {name: with_public_defaults(name, loss) for name, loss in LOSSES.items() if hasattr(functional, name)}
