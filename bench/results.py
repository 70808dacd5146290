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
    # Added with bench/traffic.py; files written before lack them (read as empty, upgraded on the next append).
    "path_bytes", "pct_path",
    # Added with the fused linear + loss cases (bench/cases.py), empty for the other losses and in older files:
    # the matmul FLOPs the peer runs in the pass, TFLOP/s, its % of mm_tflops (the device's measured matmul rate).
    "flops", "tflops", "pct_mm", "mm_tflops",
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
    """Append rows, writing the header when the file is new. A file written by an earlier version (its columns
    a subset of these) is first rewritten with this header, its rows' new columns empty; a file with columns
    this version does not know is not mixed into."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            if not set(header) <= set(COLUMNS):
                raise SystemExit(f"{path} has other columns than this version writes; pass another --out")
            upgrade(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})


def read_rows(path) -> list[dict]:
    """The rows as dicts, each with every column of COLUMNS (those an older file lacks are empty strings)."""
    with open(path, newline="") as f:
        return [{**dict.fromkeys(COLUMNS, ""), **{k: v for k, v in row.items() if k is not None}}
                for row in csv.DictReader(f)]


def upgrade(path) -> None:
    """Rewrite an older results file with this version's header (new columns empty), atomically."""
    path = Path(path)
    rows = read_rows(path)
    tmp = path.with_name(path.name + ".upgrade")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
