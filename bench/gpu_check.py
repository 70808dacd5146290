"""The Python half of `bash bench/gpu_check.sh`: the preflight check before the steps, and the one-screen
summary after them. Only what a lent GPU machine has is used (torch, triton, pytest; no installs).

    python3 -m bench.gpu_check preflight [--dry-run]   # imports, versions, GPU, nvcc, ninja; prints "slug: <gpu>"
    python3 -m bench.gpu_check summary --csv X.csv --pytest-log X-pytest.log --steps X-steps.txt
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Everything the real run imports: the build command, the kernels, the benchmark suite and its report.
IMPORTS = ("torch", "triton", "pytest", "torch.utils.cpp_extension", "fastkd", "fastkd.triton", "fastkd.cuda.build",
           "fastkd.__main__", "bench.cases", "bench.peers", "bench.timing", "bench.suite", "bench.results",
           "bench.report", "bench.__main__")
HEADLINE_PASS = "fwd+bwd"
FASTKD_PEERS = ("triton", "cuda")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def preflight(dry_run: bool) -> int:
    missing = []
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as err:  # an import that fails for any reason fails the real run
            missing.append(f"{name} ({type(err).__name__}: {err})")
    if missing:
        print("error: cannot import " + "; ".join(missing), file=sys.stderr)
        return 1
    import platform

    import torch
    import triton
    from torch.utils import cpp_extension

    from fastkd.cuda import build
    print(f"imports ok: {', '.join(IMPORTS)}")
    print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) | "
          f"triton {triton.__version__}")
    nvcc = shutil.which("nvcc") or (Path(build.cuda_home() or "/nonexistent") / "bin" / "nvcc").as_posix()
    if Path(nvcc).is_file():
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"nvcc: {nvcc} ({version[-1] if version else '?'})")
    else:
        nvcc = None
        print("nvcc: not found (step 1 needs it: put nvcc on PATH or set CUDA_HOME)")
    ninja = cpp_extension.is_ninja_available()
    print(f"ninja: {'yes' if ninja else 'not found (step 1 needs it: torch.utils.cpp_extension.load builds with ninja)'}")
    print(f"liger-kernel: {'importable' if importlib.util.find_spec('liger_kernel') else 'not installed (its rows say so)'}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        print(f"gpu: {name} (sm_{major}{minor}), {torch.cuda.device_count()} visible; "
              f"build for {';'.join(build.architectures())}")
    else:
        name = "cpu"
        print("gpu: none visible" + (" (fine for --dry-run)" if dry_run else ""))
    print(f"slug: {slug(name)}")
    if dry_run:
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch; the real run needs one (use --dry-run to check the plan)",
              file=sys.stderr)
        return 2
    if nvcc is None or not ninja:
        print("warning: the CUDA build (step 1) will fail; the Triton tests and benchmarks still run", file=sys.stderr)
    return 0


# --- summary ---------------------------------------------------------------------------------------------------

def test_counts(log: Path) -> tuple[dict, list[str], bool]:
    """({outcome: count}, failed test ids, finished) from a `pytest -q` log; a run cut short by its time
    limit has no summary line, so its progress characters are counted instead."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = text.splitlines()
    failed = [line.split(" ", 2)[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|skipped|error|errors|deselected|no tests ran)\b.* in [\d.]+s", line):
            counts = {}
            for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line):
                counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
            return counts, failed, True
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for line in lines:
        if re.fullmatch(r"[.FsExX]+\s*(\[\s*\d+%\])?", line.strip()):
            for ch, what in ((".", "passed"), ("F", "failed"), ("s", "skipped"), ("E", "error")):
                counts[what] += line.count(ch)
    return counts, failed, False


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def headline(csv_path: Path) -> list[str]:
    """One line per headline case and fastkd backend: time, speed-ups over eager / compile / liger, share of
    copy bandwidth, peak memory (and eager's, for scale)."""
    from .report import latest
    from .results import read_rows
    if not csv_path.exists():
        return [f"no benchmark rows: {csv_path} was not written"]
    rows = [r for r in latest(read_rows(csv_path)) if r["pass"] == HEADLINE_PASS]
    cases = {}
    for row in rows:
        cases.setdefault((row["loss"], row["shape"], row["dtype"]), {})[row["peer"]] = row
    if not cases:
        return [f"no {HEADLINE_PASS} rows in {csv_path}"]
    out = [f"{'case (' + HEADLINE_PASS + ')':34s} {'peer':7s} {'ms':>9s} {'x eager':>8s} {'x compile':>9s} "
           f"{'x liger':>8s} {'% copy bw':>9s} {'peak MB':>9s} {'eager MB':>9s}"]
    for (loss, shape, dtype), peers in cases.items():
        base = {p: _num(peers.get(p, {}).get("median_ms")) for p in ("eager", "compile", "liger")}

        def ratio(ms, ref):
            return f"{ref / ms:.3g}x" if ms and ref else "-"
        eager_mb = _num(peers.get("eager", {}).get("peak_mb"))
        for peer in FASTKD_PEERS:
            row = peers.get(peer)
            if row is None:
                continue
            label = f"{loss} {shape} {dtype}"
            ms = _num(row["median_ms"])
            if ms is None:
                out.append(f"{label:34s} {peer:7s} {row['status'][:80]}")
                continue
            pct, mb = _num(row["pct_copy_bw"]), _num(row["peak_mb"])
            out.append(f"{label:34s} {peer:7s} {ms:9.3f} {ratio(ms, base['eager']):>8s} "
                       f"{ratio(ms, base['compile']):>9s} {ratio(ms, base['liger']):>8s} "
                       f"{'-' if pct is None else f'{pct:.1f}':>9s} {'-' if mb is None else f'{mb:.0f}':>9s} "
                       f"{'-' if eager_mb is None else f'{eager_mb:.0f}':>9s}")
        for peer in ("eager", "compile", "liger"):  # why a ratio is missing, unless liger simply lacks the loss
            status = peers.get(peer, {}).get("status", "")
            if status and not status.startswith(("ok", "unavailable: liger-kernel")):
                out.append(f"{'':34s} ({peer}: {status[:90]})")
    return out


def summary(csv_path: Path, pytest_log: Path, steps: Path) -> int:
    print("=" * 100)
    print("fastkd GPU check")
    if steps.exists():
        for line in steps.read_text().splitlines():
            print(f"  {line}")
    counts, failed, finished = test_counts(pytest_log)
    shown = ", ".join(f"{n} {what}" for what, n in counts.items())
    print(f"tests: {shown or 'no result'}" + ("" if finished else " (cut short by its time limit: counts so far)"))
    for name in failed[:10]:
        print(f"  FAILED {name}")
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more (see {pytest_log})")
    print(f"headline benchmarks ({csv_path.name}):")
    for line in headline(csv_path):
        print(f"  {line}")
    print("=" * 100)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preflight")
    pre.add_argument("--dry-run", action="store_true")
    summ = sub.add_parser("summary")
    summ.add_argument("--csv", type=Path, required=True)
    summ.add_argument("--pytest-log", type=Path, required=True)
    summ.add_argument("--steps", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "preflight":
        return preflight(args.dry_run)
    return summary(args.csv, args.pytest_log, args.steps)


if __name__ == "__main__":
    sys.exit(main())
