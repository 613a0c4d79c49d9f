"""Reproduce Table 5 of the NS3L paper (Fashion-MNIST, 2,000 labels, small CNN): every row over several seeds with
train_fmnist_ablation.py, then print the table in the paper's layout with the paper's numbers beside ours
(mean +- sample std over seeds) and write it as Markdown.

    python benchmark/fmnist_table.py --seeds 1 2 3 4 5 6 7 8 9 10 --jobs 2   # README's Table 5 (2 cores)
    python benchmark/fmnist_table.py --seeds 1 2 3 4 5 6 7 8 9 10 --report-only  # rebuild it from finished runs

Each run evaluates the test error at the ends of its last --mean-of epochs (10); the table compares rows by the mean
of those (summary.json's mean_last_test_error), and shows the end-of-training error, the paper's number, beside it:
one run's error moves 0.2-0.6 points from epoch to epoch at the constant learning rate, more than some of the
paper's differences. Runs go to RUNS_DIR/<row>__seed<S>; a run whose summary.json exists is not run again, so an
interrupted table resumes where it stopped. Each job is one process with OMP_NUM_THREADS=--threads (1 by default:
two one-thread jobs beat one two-thread job for a network this small).
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (paper's row label, run-name stem, flags, paper's test error mean, paper's std) -- Table 5, in the paper's order.
ROWS = [
    ("Supervised", "supervised", ["--negatives", "supervised"], 17.25, 0.22),
    ("Uniform - 1", "uniform-1", ["--negatives", "uniform", "--num-negatives", "1"], 18.64, 0.38),
    ("Uniform - 3", "uniform-3", ["--negatives", "uniform", "--num-negatives", "3"], 19.35, 0.33),
    ("Exclude class of NN - 1", "nn-exclude-1", ["--negatives", "nn-exclude", "--num-negatives", "1"], 17.12, 0.15),
    (
        "Exclude 4 nearest classes with NN - 1",
        "nn-exclude-4-1",
        ["--negatives", "nn-exclude-4", "--num-negatives", "1"],
        17.13,
        0.21,
    ),
    (
        "Furthest class with NN - 1",
        "nn-furthest-1",
        ["--negatives", "nn-furthest", "--num-negatives", "1"],
        16.76,
        0.15,
    ),
    ("Threshold T = 0.03", "threshold-0.03", ["--negatives", "threshold", "--threshold", "0.03"], 16.47, 0.18),
    ("Threshold T = 0.05", "threshold-0.05", ["--negatives", "threshold", "--threshold", "0.05"], 16.59, 0.19),
    ("Oracle - 1", "oracle-1", ["--negatives", "oracle", "--num-negatives", "1"], 16.37, 0.12),
    ("Oracle - 3", "oracle-3", ["--negatives", "oracle", "--num-negatives", "3"], 15.20, 0.66),
]


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one labeled split per seed")
    parser.add_argument("--epochs", type=int, default=50, help="epochs (paper: 50)")
    parser.add_argument(
        "--epoch-unit",
        choices=("labeled", "unlabeled"),
        default="labeled",
        help="an epoch = a pass over the labeled set (default) or over the unlabeled images (29x the steps; a GPU job)",
    )
    parser.add_argument("--mean-of", type=int, default=10, help="the reported number: mean over this many last epochs")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument(
        "--runs-dir", default=None, help="where the runs go (default runs/fmnist_table_e<EPOCHS>_mean<N>)"
    )
    parser.add_argument(
        "--output", default=None, help="Markdown table (default docs/fmnist_table_e<EPOCHS>_mean<N>.md)"
    )
    parser.add_argument("--rows", nargs="+", default=None, help="run-name stems of the rows to run (default: all)")
    parser.add_argument("--report-only", action="store_true", help="do not run anything; tabulate finished runs")
    parser.add_argument("extra", nargs="*", help="further flags for train_fmnist_ablation.py (after --)")
    args = parser.parse_args()
    stems = [row[1] for row in ROWS]
    for stem in args.rows or []:
        if stem not in stems:
            parser.error(f"unknown row {stem!r}: choose from {', '.join(stems)}")
    if min(args.epochs, args.jobs, args.threads, args.mean_of) < 1:
        parser.error("--epochs, --mean-of, --jobs and --threads must be >= 1")
    # finished runs are reused only at equal epochs, unit and mean (runs from before the mean have their own folder)
    suffix = ("" if args.epoch_unit == "labeled" else "u") + f"_mean{args.mean_of}"
    args.runs_dir = args.runs_dir or f"runs/fmnist_table_e{args.epochs}{suffix}"
    args.output = args.output or f"docs/fmnist_table_e{args.epochs}{suffix}.md"
    return args


def run_one(args, stem, flags, seed):
    """Run one (row, seed) unless its summary exists; returns (stem, seed, seconds or None)."""
    name = f"{stem}__seed{seed}"
    run_dir = os.path.join(args.runs_dir, name)
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return stem, seed, None
    if os.path.isdir(run_dir):  # an interrupted run of this runner: start it again
        shutil.rmtree(run_dir)
    command = [
        sys.executable,
        os.path.join(ROOT, "train_fmnist_ablation.py"),
        *flags,
        "--seed",
        str(seed),
        "--epochs",
        str(args.epochs),
        "--epoch-unit",
        args.epoch_unit,
        "--mean-of",
        str(args.mean_of),
        "--eval-every",
        "1000000000",
        "--runs-dir",
        args.runs_dir,
        "--run-name",
        name,
        *args.extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with open(os.path.join(args.runs_dir, name + ".log"), "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode}, see {name}.log)"
    print(f"{name}: {status} in {seconds:.0f} s", flush=True)
    return stem, seed, seconds


def mean_std(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def reported(summary, path):
    """A run's number for the table: the mean test error of its last epochs (runs written before that number existed
    have only the final error, and a table must not mix the two)."""
    if "mean_last_test_error" not in summary:
        sys.exit(f"fmnist_table.py: error: {path} has no mean_last_test_error (an older run); use another --runs-dir")
    return summary["mean_last_test_error"]


def table(args):
    """Markdown table: paper vs ours (mean of the last epochs, and the final error), plus the share of wrong
    negatives and the preprocessing time."""
    lines = [
        "| F-MNIST, 2,000 labels | paper (Table 5) | ours: mean of last epochs | ours: final | seeds | "
        "negatives per image | wrong negatives (% of chosen) | NN preprocessing (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    meta = None
    for label, stem, _, paper_mean, paper_std in ROWS:
        errors, finals, wrong, per_image, nn_seconds = [], [], [], [], []
        for seed in args.seeds:
            path = os.path.join(args.runs_dir, f"{stem}__seed{seed}", "summary.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                summary = json.load(f)
            meta = meta or summary
            errors.append(reported(summary, path))
            finals.append(summary["final_test_error"])
            if summary.get("wrong_negative_share") is not None:
                wrong.append(summary["wrong_negative_share"])
                per_image.append(summary["negatives_per_sample"])
            if summary.get("nn_preprocess_seconds") is not None:
                nn_seconds.append(summary["nn_preprocess_seconds"])
        lines.append(
            f"| {label} | {paper_mean:.2f} ± {paper_std:.2f} | {mean_std(errors)} | {mean_std(finals)} | "
            f"{len(errors)} | "
            f"{f'{statistics.mean(per_image):.2f}' if per_image else '-'} | {mean_std(wrong) if wrong else '-'} | "
            f"{f'{statistics.mean(nn_seconds):.1f}' if nn_seconds else '-'} |"
        )
    text = "\n".join(lines)
    if meta:
        run_args = meta["args"]
        text += (
            f"\n\nTest error (%), mean ± sample std over seeds {args.seeds} (one labeled split per seed): 'mean of "
            f"last epochs' averages each run's test error at the ends of its last {meta['mean_of']} epochs, 'final' is "
            f"the error at the end of training (the paper's number). {meta['epochs']:g} epochs = {meta['steps']} "
            f"steps of {run_args['batch_size']} labeled + {run_args['unlabeled_batch_size']} unlabeled images, "
            f"Adam lr {run_args['lr']:g}, NS3L weight {run_args['ns3l_weight']:g}."
        )
    return text


def final_errors(args, stem):
    """{seed: reported test error (the mean of the last epochs)} of the finished runs of one row."""
    errors = {}
    for seed in args.seeds:
        path = os.path.join(args.runs_dir, f"{stem}__seed{seed}", "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                errors[seed] = reported(json.load(f), path)
    return errors


# The paper's reading of Table 5 (workshop paper, Section 4): (claim, row stems, reference stem, sign). A claim about
# a row holds when its paired difference to the reference (same seed = same labeled split) has that sign.
CLAIMS = [
    ("uniform negatives are worse than supervised", ["uniform-1", "uniform-3"], "supervised", +1),
    ("the NN rules are better than supervised", ["nn-exclude-1", "nn-exclude-4-1", "nn-furthest-1"], "supervised", -1),
    ("the thresholds are better than supervised", ["threshold-0.03", "threshold-0.05"], "supervised", -1),
    ("oracle - 3 is the best row", ["oracle-3"], None, -1),
]


def claims(args):
    """Each ordering claim of the paper against the runs: the paired difference (ours, per seed) mean ± standard
    error, and how many standard errors it lies from zero in the claimed direction."""
    errors = {stem: final_errors(args, stem) for _, stem, _, _, _ in ROWS}
    labels = {stem: label for label, stem, _, _, _ in ROWS}
    lines = [
        "| claim of the paper | row | difference (points), mean ± s.e. | s.e. in the claimed direction | agrees |",
        "|---|---|---|---|---|",
    ]
    for claim, stems, reference, sign in CLAIMS:
        for stem in stems:
            ref = reference
            if ref is None:  # "best": against the best other row by mean
                others = [o for o in errors if o != stem and errors[o]]
                if not others:
                    continue
                ref = min(others, key=lambda o: statistics.mean(errors[o].values()))
            seeds = sorted(set(errors[stem]) & set(errors[ref]))
            if len(seeds) < 2:
                continue
            diffs = [errors[stem][seed] - errors[ref][seed] for seed in seeds]
            mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
            z = sign * mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, sign * mean))
            verdict = "yes" if z >= 2 else ("yes, within noise" if z > 0 else ("no, within noise" if z > -2 else "no"))
            lines.append(
                f"| {claim} | {labels[stem]} − {labels[ref]} | {mean:+.2f} ± {se:.2f} | {z:+.1f} | {verdict} |"
            )
    return (
        "\n".join(lines)
        + "\n\nDifference = this row's test error (mean of the last epochs) minus the reference's on the same seed "
        "(same labeled split), over the seeds both have; s.e. = sample std / sqrt(seeds). 'yes': at least 2 s.e. in "
        "the claimed direction; 'within noise': less than 2 s.e. either way."
    )


def main():
    args = parse_args()
    os.makedirs(args.runs_dir, exist_ok=True)
    if not args.report_only:
        rows = [row for row in ROWS if args.rows is None or row[1] in args.rows]
        work = [(stem, flags, seed) for seed in args.seeds for _, stem, flags, _, _ in rows]  # seed-major order
        start = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda item: run_one(args, *item), work))
        print(f"all runs done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    text = table(args) + "\n\n" + claims(args)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    command = "python benchmark/fmnist_table.py " + " ".join(sys.argv[1:])
    with open(args.output, "w") as f:
        f.write(f"<!-- written by: {command.strip()} -->\n{text}\n")


if __name__ == "__main__":
    main()
