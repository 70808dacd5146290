"""Building the CUDA extension: the sources, the flags and the architectures, shared by the three builds.

1. Ahead of time: `FASTKD_BUILD_CUDA=1 pip install -e .` (setup.py) builds `fastkd._C` with ninja.
2. Just in time: the first use of `backend="cuda"` without a prebuilt `fastkd._C` calls `build()`, which
   compiles with `torch.utils.cpp_extension.load` into a cache folder and loads it.
3. CMake: `CMakeLists.txt` (find_package(Torch)) compiles the same `csrc/sources.txt`.

A just-in-time build stays in torch's extension cache (`library_path()`); `cached_library()` finds it there
from a later process, and `load_cached()` loads it without starting a compiler.

Architectures: `FASTKD_CUDA_ARCH` (for example "8.0;9.0"), else `TORCH_CUDA_ARCH_LIST`, else the visible
GPUs' own, else sm_80 and sm_90 (a machine without a GPU, such as CI).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DEFAULT_ARCHS = ("8.0", "9.0")
NAME = "fastkd_cuda"

NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr"]  # torch adds the -std it needs
CXX_FLAGS = ["-O3"]


def sources(csrc: Path = CSRC) -> list[Path]:
    if not (csrc / "sources.txt").is_file():
        raise FileNotFoundError(f"the CUDA sources are not at {csrc}: build from a source checkout of fastkd")
    lines = (csrc / "sources.txt").read_text().splitlines()
    return [csrc / line.strip() for line in lines if line.strip() and not line.startswith("#")]


def architectures() -> list[str]:
    chosen = os.environ.get("FASTKD_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if chosen:
        return [a.strip() for a in chosen.replace(",", ";").split(";") if a.strip()]
    import torch
    if torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return [f"{major}.{minor}" for major, minor in sorted(capabilities)]
    return list(DEFAULT_ARCHS)


def gencode_flags(archs: list[str]) -> list[str]:
    """The architectures as recorded in the library (`cuda_build_info`: a token such as sm80_sm90, which
    needs no quoting through the build tools), then nvcc's -gencode for each."""
    numbers = [arch.replace(".", "").replace("+PTX", "") for arch in archs]
    flags = ["-DFASTKD_ARCHS=" + "_".join(f"sm{n}" for n in numbers)]
    return flags + [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]


def cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit that `nvcc` on PATH belongs to (following wrappers to the real binary)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if (Path(candidate) / "bin" / "nvcc").is_file():
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parents[1]) if nvcc else None


def include_paths() -> list[str]:
    """The CUDA headers of the `nvidia` wheels that torch's CUDA build brings, when the toolkit lacks them."""
    try:
        import nvidia
    except ImportError:
        return []
    return [str(p / "include") for base in nvidia.__path__ for p in Path(base).iterdir() if (p / "include").is_dir()]


def build(verbose: bool = False, build_directory: str | None = None, only: list[str] | None = None,
          name: str = NAME) -> str:
    """Compile and load the extension just in time; returns the library's path. Raises with the compiler's output.

    `only` compiles a subset of the sources (file names; ops.cpp is always in), to check one kernel file.
    """
    home = cuda_home()
    if home is None:
        raise RuntimeError("cannot build the fastkd CUDA extension: no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    os.environ.setdefault("CUDA_HOME", home)  # read when torch.utils.cpp_extension is imported
    from torch.utils import cpp_extension

    archs = architectures()
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)  # else torch adds flags for every arch it knows
    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name=name, sources=[str(s) for s in sources() if only is None or s.name in set(only) | {"ops.cpp"}], extra_include_paths=include_paths(),
        extra_cflags=CXX_FLAGS + gencode_flags(archs)[:1], extra_cuda_cflags=NVCC_FLAGS + gencode_flags(archs),
        extra_ldflags=[f"-L{Path(home) / 'lib64'}"], build_directory=build_directory,
        is_python_module=False, verbose=verbose)
    directory = build_directory or cpp_extension._get_build_directory(name, verbose)
    return str(Path(directory) / f"{name}.so")


def build_directory(name: str = NAME) -> Path:
    """The folder `build()` compiles into by default: torch's extension cache, by the rule of
    `torch.utils.cpp_extension._get_build_directory` (the same in torch 2.11 to 2.14), computed without
    creating it or importing cpp_extension, whose import warns on a machine without a CUDA runtime."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        import torch
        import torch._appdirs
        if torch.version.hip is not None:
            accelerator = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accelerator = "cu" + torch.version.cuda.replace(".", "")
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        cache = os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))
        root = os.path.join(cache, f"{python}_{accelerator}")
    return Path(root) / name


def library_path(name: str = NAME) -> Path:
    """Where a just-in-time build leaves the library (it may not exist)."""
    return build_directory(name) / f"{name}.so"


def cached_library(name: str = NAME, csrc: Path = CSRC) -> Path | None:
    """The library a just-in-time build left, if it is newer than every file of csrc/ it was built from
    (the CPU stand-in aside); None otherwise, or without the sources."""
    library = library_path(name)
    if not library.is_file():
        return None
    try:
        inputs = [p for p in csrc.rglob("*") if p.is_file() and "standin" not in p.relative_to(csrc).parts]
    except OSError:
        return None
    if not inputs or any(p.stat().st_mtime > library.stat().st_mtime for p in inputs):
        return None
    return library


def load_cached(name: str = NAME) -> str | None:
    """Load the library of an earlier just-in-time build (no compiler); its path, or None when there is none."""
    library = cached_library(name)
    if library is None:
        return None
    import torch
    torch.ops.load_library(str(library))
    return str(library)
