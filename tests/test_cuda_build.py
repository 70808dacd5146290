"""The CUDA extension compiles and links, registers every operator, fake and autograd, and none of its kernels
spills to local memory on sm_80 or sm_90 (no GPU needed).

It takes a couple of minutes on 2 cores, so it runs where `FASTKD_TEST_CUDA_BUILD=1` is set: in CI (.ci/run),
and for anyone changing csrc/.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OPS = ["cuda_at_channel_mean_pow", "cuda_at_channel_mean_pow_backward", "cuda_dkd_rows", "cuda_jsd_rows",
       "cuda_kl_rows", "cuda_rkd_angle_sum", "cuda_rkd_angle_weights", "cuda_rkd_sq_distances",
       "cuda_rkd_weighted_diff", "cuda_scale_rows_"]


@pytest.mark.skipif(os.environ.get("FASTKD_TEST_CUDA_BUILD") != "1", reason="set FASTKD_TEST_CUDA_BUILD=1 to compile")
def test_extension_builds_for_sm80_and_sm90(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "fastkd", "build-cuda", "--arch", "8.0;9.0"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "architectures sm80_sm90" in run.stdout
    assert f"{len(OPS)} ops: {', '.join(OPS)}" in run.stdout
    from fastkd import kernel_losses
    assert f"registered as backend 'cuda' for: {', '.join(sorted(kernel_losses.LOSSES))}" in run.stdout
    spills = resource_usage_with_spills(next(tmp_path.rglob("*.so")))
    assert spills == [], "kernels with a stack frame or local memory (spills):\n" + "\n".join(spills)


def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, else the one Triton ships."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (Path(home) / "bin" / "cuobjdump", shutil.which("cuobjdump")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def resource_usage_with_spills(library: Path) -> list[str]:
    """Every kernel of the built library whose resource usage shows a stack frame or local memory."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the kernels' resource usage")
    out = subprocess.run([tool, "--dump-resource-usage", str(library)], capture_output=True, text=True, check=True)
    usage = [line.strip() for line in out.stdout.splitlines() if "REG:" in line]
    assert usage, "no kernels found in " + str(library)
    return [line for line in usage if not (re.search(r"\bSTACK:0\b", line) and re.search(r"\bLOCAL:0\b", line))]
