"""Command line: `python -m fastkd info` (versions, devices, backends), `demo`, `build-cuda`, and `kernels`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    print(f"default backend: {fastkd.default_backend()} (set FASTKD_BACKEND to change)")
    for name, status in fastkd.available_backends().items():
        print(f"backend {name}: {'yes' if status.available else 'no'} - {status.reason}")
    print(f"CUDA extension: {cuda_extension_status()}")


def cuda_extension_ops() -> list[str]:
    """The fastkd operators that have a CUDA kernel registered in this process."""
    registered = torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
    return sorted(name.split("::")[1] for name in registered if name.startswith("fastkd::cuda_"))


def cuda_extension_status() -> str:
    if importlib.util.find_spec("fastkd._C") is None:
        return ("not built ahead of time; backend='cuda' compiles it on first use (needs nvcc), or build it with "
                "`python -m fastkd build-cuda` or FASTKD_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    importlib.import_module("fastkd._C")
    return f"built ahead of time, {torch.ops.fastkd.cuda_build_info()}, ops: {', '.join(cuda_extension_ops())}"


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
    from .cuda import losses  # registers the fakes, the autograd and the losses, as the first use does
    print(f"registered as backend 'cuda' for: {', '.join(sorted(losses.LOSSES))}")
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
    demo = commands.add_parser("demo", help="distil a small MNIST teacher into a student (Hinton et al.'s table)")
    demo.add_argument("--quick", action="store_true", help="a few seconds on a subset, for smoke tests")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--backend", default=None, choices=("auto",) + fastkd.BACKENDS)
    demo.add_argument("--epochs-teacher", type=int, default=None)
    demo.add_argument("--epochs-student", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    elif args.command == "build-cuda":
        return build_cuda(args.arch, args.verbose)
    elif args.command == "kernels":
        return kernels(args.arch)
    else:
        from . import demo as demo_module
        demo_module.run(quick=args.quick, seed=args.seed, device=args.device, backend=args.backend,
                        epochs_teacher=args.epochs_teacher, epochs_student=args.epochs_student)
    return 0


if __name__ == "__main__":
    sys.exit(main())
