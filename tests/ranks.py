"""Run a function on W ranks of a CPU (gloo) process group, for the distributed tests.

`run_ranks(world_size, fn, *args)` forks W processes from a forkserver that imported torch and fastkd once (so a
group starts in well under a second after the first), each joins a gloo group through a FileStore with a short
collective timeout, runs `fn(rank, world_size, *args)` and sends back what it returns (through torch.save).
The parent waits at most `timeout` seconds: a rank that hangs is killed and the test fails, naming it; a rank
that raises fails the test with that rank's traceback. `fn` must be a module-level function (it is pickled by
name) and should return tensors detached, on the CPU.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from datetime import timedelta

import torch

COLLECTIVE_TIMEOUT_S = 30

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(["torch", "torch.distributed", "fastkd", "fastkd.functional"])
    return _context


def _rank_main(rank: int, world_size: int, folder: str, fn, args) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(os.path.join(folder, "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 90.0) -> list:
    """`[fn(0, W, *args), ..., fn(W - 1, W, *args)]`, each run on its own rank (module docstring)."""
    ctx = _forkserver()
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, folder, fn, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        hung = []
        for r, p in enumerate(procs):
            p.join(timeout)
            if p.is_alive():
                hung.append(r)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = {}
        for r in range(world_size):
            path = os.path.join(folder, f"error{r}.txt")
            if os.path.exists(path):
                with open(path) as f:
                    errors[r] = f.read()
        if errors:
            shown = "\n".join(f"--- rank {r} ---\n{text}" for r, text in sorted(errors.items()))
            raise RankError(errors, f"{len(errors)} of {world_size} ranks raised:\n{shown}")
        if hung:
            raise AssertionError(f"ranks {hung} of {world_size} did not finish within {timeout} s")
        missing = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if missing:
            raise AssertionError(f"ranks {missing} exited with codes {[procs[r].exitcode for r in missing]}")
        return [torch.load(os.path.join(folder, f"result{r}.pt"), weights_only=False) for r in range(world_size)]


class RankError(AssertionError):
    """Some ranks raised; `errors` maps each such rank to its traceback text."""

    def __init__(self, errors: dict, message: str):
        super().__init__(message)
        self.errors = errors
