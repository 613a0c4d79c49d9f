"""Shared command line of the benchmark/paper/*.py scripts: print (default), run or tabulate one paper table.

    python benchmark/paper/<table>.py                       # the exact GPU commands + the paper's numbers
    python benchmark/paper/<table>.py --run --workers 1     # run them (5 seeds unless --seeds)
    python benchmark/paper/<table>.py --report              # Markdown table of finished runs beside the paper
    python benchmark/paper/<table>.py --run -- --data-dir /data   # extra flags go to every training command
    python benchmark/paper/<table>.py --run --fp32          # exact fp32 arithmetic, as the original code bases
    python benchmark/paper/<table>.py --run --backend slurm --partition gpu --time 1440   # one Slurm job array

The WRN scripts train under bf16 autocast on CUDA by default (evaluation and VAT's r search are always exact fp32);
the original code bases are fp32 throughout. In a 5-seed CPU comparison bf16 changed neither FixMatch's mask rate,
its pseudo-label accuracy nor its error (docs/fixmatch.md, "bf16 and the pseudo-labels"), so the recipes keep the
scripts' default; --fp32 passes --no-bf16 (fp32, TF32 off) to train_supervised / vat / pi / mixmatch / fixmatch.

Each script defines SETTINGS = {setting: [run.Config(name, argv, paper=(mean, std))]} and SEEDS; runs go to
runs/paper/<script>/<setting>/<config>__seed<S>, so report.py groups them like any other sweep.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import report  # noqa: E402
import run  # noqa: E402

Config = run.Config
EXACT_FP32 = (
    "train_supervised.py",
    "train_vat.py",
    "train_pi.py",
    "train_mixmatch.py",
    "train_fixmatch.py",
    "train_freematch.py",
)


def with_precision(config, extra=(), fp32=False):
    """``config`` with --no-bf16 after its own flags when ``fp32`` (scripts that have the flag), then ``extra``."""
    fp32 = ["--no-bf16"] if fp32 and os.path.basename(config.argv[0]) in EXACT_FP32 else []
    return Config(config.name, config.argv + fp32 + list(extra), config.paper, config.note)


def paper_table(settings):
    """Markdown: setting | configuration | paper test error (%)."""
    lines = ["| setting | configuration | paper (%) |", "|---|---|---|"]
    for setting, configs in settings.items():
        for c in configs:
            lines.append(
                f"| {setting} | {c.name} | {report.fmt(*c.paper) if c.paper else 'n/a'}"
                f"{' (' + c.note + ')' if c.note else ''} |"
            )
    return "\n".join(lines) + "\n"


def main(name, title, settings, seeds, argv=None, metric="test_error_at_best_valid"):
    parser = run.OneLineParser(description=title, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--setting", nargs="+", choices=list(settings), default=list(settings))
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--only", nargs="+", default=None, help="configuration names to keep")
    parser.add_argument("--runs-dir", default=os.path.join("runs", "paper", name))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: 1, on Slurm --cpus-per-task)"
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="exact fp32 training passes (--no-bf16 to every WRN script), the original code's arithmetic; default: "
        "the scripts' bf16 autocast on CUDA",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--run", action="store_true", help="run the commands (default: only print them)")
    action.add_argument("--report", action="store_true", help="tabulate finished runs beside the paper")
    parser.add_argument("extra", nargs="*", help="flags appended to every training command (after --)")
    run.add_cluster_args(parser)
    args = parser.parse_args(argv)
    if args.run:  # the backend's flags are checked only where they are used (printing needs no submitit)
        run.check_cluster_args(parser, args)
    print(f"# {title}")
    failed = 0
    for setting in args.setting:
        configs = [
            with_precision(c, args.extra, args.fp32) for c in settings[setting] if not args.only or c.name in args.only
        ]
        runs_dir = os.path.join(args.runs_dir, setting)
        print(f"\n## {setting}  (runs: {runs_dir}, seeds {' '.join(map(str, args.seeds))})")
        if args.report:
            groups = report.collect(runs_dir) if os.path.isdir(runs_dir) else {}
            paper = {c.name: c.paper for c in configs if c.paper}
            for c in configs:
                groups.setdefault(c.name, {"runs": [], "unfinished": []})
            print(report.table(groups, metric, paper=paper, order=[c.name for c in configs]), end="")
            continue
        failed += run.run_all(
            configs, args.seeds, runs_dir, args.workers, args.threads, dry_run=not args.run, cluster=args
        )
    if not args.run and not args.report:
        print("\n## the paper's numbers (test error %, mean ± std over 5 splits)\n")
        print(paper_table({s: settings[s] for s in args.setting}), end="")
    return 1 if failed else 0
