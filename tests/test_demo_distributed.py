"""The distributed demo as CI runs it: two gloo ranks under torchrun, each mode checked by its own rank 0 against
a single-process replay of the same steps (`fastkd.demo_distributed`)."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from fastkd import demo_distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")

TIMEOUT_S = 120


def run_demo(*args, timeout=TIMEOUT_S):
    # --standalone: a rendezvous on a free local port, so parallel runs do not collide on MASTER_PORT.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fastkd.demo_distributed", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU, as documented
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s; output so far:\n"
                    f"{err.stdout}\n{err.stderr}")


@pytest.mark.parametrize("mode", demo_distributed.MODES)
def test_mode_matches_a_single_process(mode):
    result = run_demo(mode)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = [line for line in result.stdout.splitlines() if line.startswith(demo_distributed.MATCH_LINE)]
    assert len(lines) == 1, output  # rank 0 alone prints it
    assert f"step {demo_distributed.LOG_EVERY:3d}  loss" in result.stdout


def test_without_torchrun_says_how_to_start_it():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "fastkd.demo_distributed", "ddp"], capture_output=True,
                            text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode != 0
    assert "torchrun --nproc-per-node 2 -m fastkd.demo_distributed" in result.stderr
