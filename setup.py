"""fastkd: knowledge-distillation losses as fused GPU kernels, each checked against a PyTorch reference.

`pip install -e .` installs the pure-Python package and never compiles anything: every loss works on any
device through its PyTorch reference, and the Triton kernels need no build step.

`FASTKD_BUILD_CUDA=1 pip install --no-build-isolation -e .` also builds the CUDA C++ extension `fastkd._C`
ahead of time with ninja (it needs the installed torch, hence no build isolation, and nvcc). Architectures:
`FASTKD_CUDA_ARCH="8.0;9.0"`, else the local GPUs' (see fastkd/cuda/build.py). The extension uses only
Python's stable ABI, so one build serves every Python version.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def cuda_extension():
    """The CUDA extension's build, from the same source list and flags as the just-in-time build."""
    spec = importlib.util.spec_from_file_location("fastkd_build", HERE / "fastkd" / "cuda" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    home = build.cuda_home()
    if home is not None:
        os.environ.setdefault("CUDA_HOME", home)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = build.architectures()
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    gencode = build.gencode_flags(archs)
    limited_api = ["-DPy_LIMITED_API=0x030A0000"]
    extension = CUDAExtension(
        "fastkd._C", [str(path.relative_to(HERE)) for path in build.sources()],
        include_dirs=build.include_paths(), library_dirs=[str(Path(home) / "lib64")] if home else [],
        extra_compile_args={"cxx": build.CXX_FLAGS + gencode[:1] + limited_api,
                            "nvcc": build.NVCC_FLAGS + gencode + limited_api},
        py_limited_api=True)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension() if os.environ.get("FASTKD_BUILD_CUDA") == "1" else ([], {})

setup(
    name="fastkd",
    version="0.1.0",
    description="Knowledge-distillation losses as fused GPU kernels, verified against plain PyTorch references",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastkd", "fastkd.*"]),
    package_data={"fastkd.data": ["*.gz", "*.md"]},
    # numpy: torch imports it when present and warns "Failed to initialize NumPy" when it is not.
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"test": ["pytest>=7", "ninja"], "bench": ["matplotlib", "pytest-benchmark"]},
    entry_points={"console_scripts": ["fastkd = fastkd.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
