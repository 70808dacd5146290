"""Command line: `python -m fastkd info` (versions, devices, backends) and `python -m fastkd demo`."""
from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions, devices and backends")
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
    else:
        from . import demo as demo_module
        demo_module.run(quick=args.quick, seed=args.seed, device=args.device, backend=args.backend,
                        epochs_teacher=args.epochs_teacher, epochs_student=args.epochs_student)
    return 0


if __name__ == "__main__":
    sys.exit(main())
