"""Command line: `python -m bench [options]` runs the suite; `python -m bench report [options]` writes the tables.

Examples:
    python -m bench --quick                               # tiny shapes, CPU is fine, under a minute
    python -m bench                                       # the full suite (needs a CUDA GPU)
    python -m bench --losses kd,jsd --shapes llm --peers eager,compile,liger,triton --passes fwd+bwd
    python -m bench --list --losses kd --shapes llm        # the cases, their floor and fastkd's path bytes
    python -m bench --losses fused_jsd --peers eager,liger,triton  # the fused linear + JSD loss, BT x H x V
    python -m bench --communication                       # bytes each distributed loss sends per rank (a model)
    python -m bench --resume --budget-min 8               # go on where the last run at this commit stopped
    python -m bench report                                # README.md and plots beside the newest of
                                                          # bench/results/results.csv and quick.csv
"""
from __future__ import annotations

import argparse
import sys

from .cases import DTYPES, LOSSES, PASSES


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv):
    from .peers import PEERS
    from .results import DEFAULT_OUT, QUICK_OUT
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", type=_list, help=f"comma-separated, from {','.join(LOSSES)} (default: all)")
    p.add_argument("--shapes", type=_list,
                   help="comma-separated shape groups (image, llm, rkd, resnet, llm_fused, llm_fused_sweep) or shapes "
                        "like 256x1000 (fused cases: BTxHxV, e.g. 8192x4096x128256) (default: all groups but "
                        "llm_fused_sweep)")
    p.add_argument("--dtypes", type=_list, help=f"comma-separated, from {','.join(DTYPES)} (default: each case's own)")
    p.add_argument("--peers", type=_list, default=list(PEERS), help=f"comma-separated, from {','.join(PEERS)}")
    p.add_argument("--passes", type=_list, default=list(PASSES), help=f"comma-separated, from {','.join(PASSES)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes; runs on a CPU (perf_counter timing, no memory)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu (--quick only)")
    p.add_argument("--out", default=None, help=f"CSV to append to (default {DEFAULT_OUT}; with --quick {QUICK_OUT})")
    p.add_argument("--resume", action="store_true", help="skip cases already in --out for this device and commit")
    p.add_argument("--budget-min", type=float, default=None, help="start no new case after this many minutes")
    p.add_argument("--list", action="store_true",
                   help="print the cases, with the floor and fastkd's path bytes per pass (logit losses), and exit")
    p.add_argument("--communication", action="store_true",
                   help="print the bytes each distributed loss sends per rank and call at typical shapes, against "
                        "gathering the logits (bench/communication.py), and exit")
    args = p.parse_args(argv)
    for name, values, allowed in (("peers", args.peers, PEERS), ("passes", args.passes, PASSES),
                                  ("dtypes", args.dtypes or [], DTYPES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        from . import report
        return report.main(argv[1:])
    args = parse_args(argv)
    if args.communication:
        from .communication import table_lines
        print("\n".join(table_lines()))
        return 0

    import torch
    from .cases import build_cases
    try:
        cases = build_cases(args.losses, args.shapes, args.dtypes, quick=args.quick)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        # Each case; for a logit case one line per pass with its floor and fastkd's path bytes (bench/traffic.py).
        from .traffic import list_lines
        print("\n".join(list_lines(cases, args.passes, args.peers)))
        return 0
    if not cases:
        print("error: no case matches these --losses/--shapes/--dtypes", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if torch.device(device).type != "cuda" and not args.quick:
        print("error: the full suite measures GPU kernels and needs a CUDA GPU, and torch sees none here.\n"
              "       Run `python -m bench --quick` for a CPU smoke run of the same code paths.", file=sys.stderr)
        return 2
    if torch.device(device).type == "cpu":
        # On a small CPU a second intra-op thread mostly adds contention to these tiny tensors.
        torch.set_num_threads(1)
    from .suite import run
    rows = run(cases, args.peers, args.passes, device, args.quick, args.out, resume=args.resume,
               budget_min=args.budget_min)
    ok = sum(r["status"].startswith("ok") for r in rows)
    print(f"{len(rows)} rows ({ok} timed) appended to {args.out}; `python -m bench report` (the newest results) "
          f"or `python -m bench report --csv {args.out}` makes the tables")
    from .report import cpu_quick_note
    note = cpu_quick_note(rows)
    if note:
        print(note)
    # A fastkd backend that disagrees with its own reference is a bug, not a data point.
    bad = sorted({f"{r['peer']} {r['loss']} {r['shape']} {r['dtype']}" for r in rows
                  if r["peer"] in ("triton", "cuda") and r["status"].startswith(("mismatch", "error"))})
    if bad:
        print("fastkd backends that failed their check:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Triton's interpreter (TRITON_INTERPRET=1, set before fastkd is imported) is left to the caller: under it
    # --quick on a CPU runs fastkd's kernels too (slowly); without it those rows say why they did not run.
    sys.exit(main())
