"""fastkd: knowledge-distillation losses as fused GPU kernels, each checked against a PyTorch reference.

`pip install -e .` installs the pure-Python package and never compiles anything: every loss works on any
device through its PyTorch reference. Kernel backends are optional and found at run time.
"""
from setuptools import find_packages, setup

setup(
    name="fastkd",
    version="0.1.0",
    description="Knowledge-distillation losses as fused GPU kernels, verified against plain PyTorch references",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastkd", "fastkd.*"]),
    package_data={"fastkd.data": ["*.gz", "*.md"]},
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest>=7", "numpy"]},
    entry_points={"console_scripts": ["fastkd = fastkd.__main__:main"]},
)
