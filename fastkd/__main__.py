"""Command line: `python -m fastkd info` (versions, devices, backends), `demo` (`demo llm`), `build-cuda`, and
`kernels`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys

import torch

import fastkd


def info() -> None:
    print(f"fastkd {fastkd.__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"device cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("device cpu only (no CUDA device visible)")
    print(f"default backend: {default_backend_line()}")
    for name, status in fastkd.available_backends().items():
        print(f"backend {name}: {'yes' if status.available else 'no'} - {status.reason}")
    print(f"CUDA extension: {cuda_extension_status()}")


def backend_env_error() -> str | None:
    """Why FASTKD_BACKEND is unusable, or None when it is unset or valid."""
    try:
        fastkd.default_backend()
    except ValueError:
        allowed = ", ".join(("auto",) + fastkd.BACKENDS)
        return (f"FASTKD_BACKEND={os.environ.get('FASTKD_BACKEND')!r} is invalid: allowed values are {allowed} "
                f"(unset means auto); every loss called without backend= raises until it is fixed")
    return None


def default_backend_line() -> str:
    error = backend_env_error()
    if error is not None:
        return f"none - {error}"
    return f"{fastkd.default_backend()} (set FASTKD_BACKEND to change)"


def cuda_extension_ops() -> list[str]:
    """The fastkd operators that have a CUDA kernel registered in this process."""
    registered = torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
    return sorted(name.split("::")[1] for name in registered if name.startswith("fastkd::cuda_"))


def cuda_extension_status() -> str:
    """Where the CUDA extension is: built ahead of time (`fastkd._C`), or by `build-cuda` or a first
    backend='cuda' call into torch's extension cache, or not at all."""
    if importlib.util.find_spec("fastkd._C") is not None:
        importlib.import_module("fastkd._C")
        return f"built ahead of time, {torch.ops.fastkd.cuda_build_info()}, ops: {', '.join(cuda_extension_ops())}"
    from .cuda import build
    how_to = ("backend='cuda' compiles it on first use (needs nvcc), or build it with `python -m fastkd build-cuda` "
              "or FASTKD_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    library = build.library_path()
    if not library.is_file():
        return f"not built; {how_to}"
    if build.cached_library() is None:
        return f"built just in time at {library}, but older than the sources in csrc/: rebuilt on first use; {how_to}"
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as err:
        return f"built just in time at {library}, but it does not load here: {err}"
    return (f"built just in time at {library} (torch's extension cache), {torch.ops.fastkd.cuda_build_info()}, "
            f"ops: {', '.join(cuda_extension_ops())}")


def build_cuda(arch: str | None, verbose: bool) -> int:
    """Compile and load the CUDA extension just in time (what the first backend='cuda' call does)."""
    import os
    from .cuda import build
    if arch:
        os.environ["FASTKD_CUDA_ARCH"] = arch
    print(f"compiling the fastkd CUDA extension for {';'.join(build.architectures())}...", flush=True)
    try:
        path = build.build(verbose=verbose)
    except Exception as err:
        print(f"build failed: {err}", file=sys.stderr)
        return 1
    ops = cuda_extension_ops()
    print(f"built and loaded {path}: {torch.ops.fastkd.cuda_build_info()}, {len(ops)} ops: {', '.join(ops)}")
    from . import cuda, kernel_losses
    cuda.register()  # the fakes and the autograd, as the first use does
    print(f"registered as backend 'cuda' for: {', '.join(kernel_losses.backend_losses(cuda.KERNELS))}")
    print("cached there for later processes (fastkd.cuda.build.cached_library); `python -m fastkd info` reports it")
    return 0


def kernels(arch: str) -> int:
    """Compile the Triton kernels for `arch` without a GPU and print registers, spills and load widths
    (fastkd.triton.static), in a child process when this one has TRITON_INTERPRET set."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastkd.triton.static", "--arch", arch], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions, devices and backends")
    build = commands.add_parser("build-cuda", help="compile the CUDA C++ extension now (just in time, cached)")
    build.add_argument("--arch", default=None, help='architectures, e.g. "8.0;9.0" (default: the local GPUs\', '
                                                    'else 8.0 and 9.0)')
    build.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    kern = commands.add_parser("kernels", help="compile the Triton kernels for a GPU architecture (no GPU needed) "
                                                "and print registers, spills and widest global loads")
    kern.add_argument("--arch", default="8.0,9.0", help='comma-separated, e.g. "8.0,9.0"')
    demo = commands.add_parser("demo", help="distil a small MNIST teacher into a student (Hinton et al.'s table), "
                                             "or (demo llm) a small language model from a cached teacher")
    demo.add_argument("which", nargs="?", choices=("mnist", "llm"), default="mnist",
                      help="mnist (default): Hinton et al.'s MNIST table; llm: a byte-level transformer student "
                           "trained alone, with full-logit KD and from top-k and sampled teacher caches, on the "
                           "Python standard library's source")
    demo.add_argument("--quick", action="store_true", help="a few seconds on a subset, for smoke tests")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--backend", default=None, choices=("auto",) + fastkd.BACKENDS)
    demo.add_argument("--epochs-teacher", type=int, default=None, help="mnist only")
    demo.add_argument("--epochs-student", type=int, default=None, help="mnist only")
    demo.add_argument("--steps-teacher", type=int, default=None, help="llm only")
    demo.add_argument("--steps-student", type=int, default=None, help="llm only (each of the five students)")
    demo.add_argument("--threads", type=int, default=None,
                      help="CPU threads for torch (default: torch's, the core count); on a CPU the numbers depend on it")
    args = parser.parse_args(argv)
    if args.command == "demo" and args.backend is None and backend_env_error() is not None:
        print(f"error: {backend_env_error()}", file=sys.stderr)
        return 2
    if args.command == "info":
        info()
    elif args.command == "build-cuda":
        return build_cuda(args.arch, args.verbose)
    elif args.command == "kernels":
        return kernels(args.arch)
    else:
        # Options of the other demo are refused rather than ignored, so no one reads a table they did not shape.
        other = {"mnist": ("steps_teacher", "steps_student"), "llm": ("epochs_teacher", "epochs_student")}
        for name in other[args.which]:
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} is not an option of `demo {args.which}`")
        if args.threads is not None:
            if args.threads < 1:
                parser.error(f"--threads must be at least 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.which == "llm":
            from . import demo_llm
            demo_llm.run(quick=args.quick, seed=args.seed, device=args.device, backend=args.backend,
                         steps_teacher=args.steps_teacher, steps_student=args.steps_student)
        else:
            from . import demo as demo_module
            demo_module.run(quick=args.quick, seed=args.seed, device=args.device, backend=args.backend,
                            epochs_teacher=args.epochs_teacher, epochs_student=args.epochs_student)
    return 0


if __name__ == "__main__":
    sys.exit(main())
