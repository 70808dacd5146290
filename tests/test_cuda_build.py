"""The CUDA extension compiles and links, and registers every operator, fake and autograd (no GPU needed).

It takes a couple of minutes on 2 cores, so it runs where `FASTKD_TEST_CUDA_BUILD=1` is set: in CI (.ci/run),
and for anyone changing csrc/.
"""
import os
import subprocess
import sys

import pytest

OPS = ["cuda_at_channel_mean_pow", "cuda_at_channel_mean_pow_backward", "cuda_dkd_rows", "cuda_dkd_rows_backward",
       "cuda_jsd_rows", "cuda_jsd_rows_backward", "cuda_kl_rows", "cuda_kl_rows_backward", "cuda_rkd_angle_sum",
       "cuda_rkd_angle_weights", "cuda_rkd_sq_distances", "cuda_rkd_weighted_diff"]


@pytest.mark.skipif(os.environ.get("FASTKD_TEST_CUDA_BUILD") != "1", reason="set FASTKD_TEST_CUDA_BUILD=1 to compile")
def test_extension_builds_for_sm80_and_sm90(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "fastkd", "build-cuda", "--arch", "8.0;9.0"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "architectures sm80_sm90" in run.stdout
    assert f"{len(OPS)} ops: {', '.join(OPS)}" in run.stdout
    assert "registered as backend 'cuda' for: at_loss, attention_map, dkd_loss, jsd_loss, kd_loss" in run.stdout
