"""The results as data: one CSV row per loss x shape x dtype x peer x pass, appended run after run.

Each row carries its date, commit, device and versions: an absolute time holds only beside them, and
rows from different devices sit side by side in one file (the report keeps them apart).
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

COLUMNS = [
    "date", "run_id", "mode", "commit", "device", "torch", "triton", "cuda", "fastkd", "liger",
    "loss", "shape", "dtype", "peer", "pass",
    "median_ms", "peak_mb", "min_bytes", "gbps", "pct_copy_bw", "copy_gbps", "max_err", "status",
]
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "results.csv"
QUICK_OUT = REPO / "bench" / "results" / "quick.csv"


def git_commit() -> str:
    """Short commit hash, with "-dirty" when the working tree differs from it (the numbers may too)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty else "")


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device, mode: str) -> dict:
    """The columns shared by every row of one run."""
    import fastkd
    from .peers import liger_version
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": now.strftime("%Y%m%d%H%M%S") + f"-{os.getpid()}",
        "mode": mode,
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "fastkd": fastkd.__version__,
        "liger": liger_version(),
    }


def append_rows(path, rows: list[dict]) -> None:
    """Append rows, writing the header when the file is new. A file with other columns is not mixed into."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise SystemExit(f"{path} has other columns than this version writes; pass another --out")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
