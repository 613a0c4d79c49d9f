"""Runner for train_xc.py (Bamler & Mandt 2020).

Compare mode (default): trains every method on `planted` at C = 2^14 for the same time budget (tree fit included, as on
the paper's x-axis; evaluation excluded) and writes a Markdown table and a PNG of test log-likelihood and accuracy
against time:
    python benchmark/xc_compare.py --budget 60 --out-dir docs
    python benchmark/xc_compare.py --budget 45 --parallel 5 --out-dir docs   # all methods at once (CPU clock only)

Timing mode: tree fit time and sampling time per negative at several C:
    python benchmark/xc_compare.py --timing --timing-classes 1024 16384 131072 --out-dir docs

Both default to one torch thread and the process CPU clock, so a shared machine's load does not distort the figures.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import train_xc as xc  # noqa: E402
import xc_tree  # noqa: E402

COLOURS = {
    "adversarial": "tab:green",
    "adversarial-zero": "tab:olive",
    "uniform": "tab:blue",
    "frequency": "tab:purple",
    "nce": "tab:orange",
    "nce-zero": "tab:brown",
    "softmax": "tab:red",
}
# train_xc.py flags of each compared configuration: the methods with the authors' starts (Glorot; the adversarial
# biases at -mean log p_n), plus the adversarial biases started at zero and NCE started at zero weights and
# biases at -log C (this project's earlier defaults)
FLAGS = {
    **{method: ["--method", method] for method in xc.METHODS},
    "adversarial-zero": ["--method", "adversarial", "--bias-init", "zero"],
    "nce-zero": ["--method", "nce", "--init", "zero"],
}


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--timing", action="store_true", help="measure tree fit / sampling times instead of comparing methods"
    )
    parser.add_argument("--num-classes", type=int, default=2**14, help="C of the comparison (issue: 2^14)")
    parser.add_argument("--methods", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per method, tree fit included")
    parser.add_argument("--eval-every-seconds", type=float, default=4.0, help="evaluation cadence in training seconds")
    parser.add_argument("--eval-size", type=int, default=2000, help="held-out points per split")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clock", default="process", choices=("wall", "process"), help="passed to train_xc.py --clock")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (train_xc.py --threads)")
    parser.add_argument(
        "--report-only", default=None, help="only (re)write the report from the runs under this directory"
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="methods trained at once (> 1 only with --clock process)"
    )
    parser.add_argument(
        "--runs-dir", default="runs/xc_compare", help="where the runs go (a fresh sub-directory per call)"
    )
    parser.add_argument("--out-dir", default="docs", help="where xc_compare.md / .png or xc_timing.md are written")
    parser.add_argument("--timing-classes", type=int, nargs="+", default=[2**10, 2**14, 2**17])
    parser.add_argument(
        "--timing-train-per-class", type=int, default=16, help="planted fitting points per label (train_xc default)"
    )
    args = parser.parse_args()
    if args.parallel > 1 and args.clock != "process":
        parser.error("--parallel > 1 distorts wall-clock times; use it only with --clock process")
    if args.budget <= 0 or args.num_classes < 2 or args.threads < 1 or min(args.timing_classes) < 2:
        parser.error("--budget must be > 0, --num-classes and --timing-classes >= 2, --threads >= 1")
    return args


def read_history(run_dir):
    return [json.loads(line) for line in (run_dir / "eval_history.jsonl").read_text().splitlines()]


def compare(args):
    base = Path(args.runs_dir) / f"C{args.num_classes}__{int(time.time())}"
    command_base = [
        sys.executable,
        str(ROOT / "train_xc.py"),
        "--dataset",
        "planted",
        "--num-classes",
        str(args.num_classes),
        "--seed",
        str(args.seed),
        "--eval-size",
        str(args.eval_size),
        "--total-steps",
        str(10**9),
        "--time-budget",
        str(args.budget),
        "--eval-every",
        str(10**9),
        "--eval-every-seconds",
        str(args.eval_every_seconds),
        "--log-every",
        "1000",
        "--clock",
        args.clock,
        "--threads",
        str(args.threads),
        "--runs-dir",
        str(base),
    ]
    if (
        args.parallel > 1
    ):  # concurrent runs, each fitting its own (identical, deterministic) tree; needs --clock process
        commands = {method: command_base + FLAGS[method] + ["--run-name", method] for method in args.methods}
        for command in commands.values():
            print(" ".join(command[1:]), flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            for method, result in zip(
                commands, pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), commands.values())
            ):
                (base / f"{method}.log").write_text(result.stdout + result.stderr)
                if result.returncode != 0:
                    sys.exit(f"{method} failed:\n{result.stderr[-2000:]}")
    else:  # sequential: the tree is fitted once and reused; its fit time still counts for every method using it
        tree_path = None
        uses_tree = ("adversarial", "adversarial-zero", "nce", "nce-zero")
        for method in sorted(args.methods, key=lambda method: method not in uses_tree):
            command = command_base + FLAGS[method] + ["--run-name", method]
            if method in uses_tree and tree_path is not None:
                command += ["--aux-model", str(tree_path)]
            print(" ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)
            if (base / method / "aux_tree.pt").exists():
                tree_path = base / method / "aux_tree.pt"
    results = {
        method: (json.loads((base / method / "summary.json").read_text()), read_history(base / method))
        for method in args.methods
    }
    write_report(args, base, results)


def report_only(args):
    """Report from existing run directories, finished or not (a run without summary.json is cut at its last
    evaluation)."""
    base = Path(args.report_only)
    results = {}
    for method in args.methods:
        run_dir = base / method
        if not (run_dir / "eval_history.jsonl").exists():
            continue
        history = read_history(run_dir)
        if (run_dir / "summary.json").exists():
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            run_args = json.loads((run_dir / "args.json").read_text())
            last, offset = history[-1], history[0]["seconds"]
            summary = {
                "args": run_args,
                "aux_fit_seconds": offset,
                "steps": last["step"],
                "steps_per_second": last["step"] / max(last["seconds"] - offset, 1e-9),
                "unfinished": True,
                **{f"final_{key}": value for key, value in last.items() if key not in ("step", "seconds")},
            }
            _, _, _, heldout, _, planted = xc.load_dataset(argparse.Namespace(**run_args))
            x, y = heldout["test"]
            bayes = xc.prediction_metrics(planted.bayes_scores(x), y)
            summary.update(
                bayes_test_log_likelihood=bayes["log_likelihood"] / len(y),
                bayes_test_accuracy=100 * bayes["hits1"] / len(y),
            )
        results[method] = (summary, history)
    args.num_classes = next(iter(results.values()))[0]["args"]["num_classes"]
    write_report(args, base, results)


def first_time_reaching(history, threshold):
    return next((row["seconds"] for row in history if row["test_log_likelihood"] >= threshold), math.inf)


def write_report(args, base, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baselines = [method for method in results if not method.startswith("adversarial")]
    target = max(results[method][0]["final_test_log_likelihood"] for method in baselines) if baselines else -math.inf
    any_summary = next(iter(results.values()))[0]
    lines = [
        f"Planted hierarchy, C = {args.num_classes}, K = 32, batch 1000, 10 negatives, budget {args.budget:g} s "
        f"({args.clock} clock, {args.threads} thread) per method, tree fit included; held-out test sample of "
        f"{args.eval_size} points. Bayes posterior (ceiling): log-likelihood "
        f"{any_summary.get('bayes_test_log_likelihood', float('nan')):.3f}, accuracy "
        f"{any_summary.get('bayes_test_accuracy', float('nan')):.1f} %.",
        "",
        f"| method | lr / lambda | tree fit (s) | steps | steps/s | test log-lik. | accuracy (%) | P@5 (%) | raw "
        f"accuracy (%) | s to reach {target:.2f} nats |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, (summary, history) in results.items():
        raw = f"{summary['final_test_raw_accuracy']:.1f}" if "final_test_raw_accuracy" in summary else "-"
        reach = first_time_reaching(history, target)
        name = f"{method} (cut at {history[-1]['seconds']:.0f} s)" if summary.get("unfinished") else method
        lines.append(
            f"| {name} | {summary['args']['lr']:g} / {summary['args']['reg']:g} | {summary['aux_fit_seconds']:.1f} | "
            f"{summary['steps']} | {summary['steps_per_second']:.1f} | {summary['final_test_log_likelihood']:.3f} | "
            f"{summary['final_test_accuracy']:.1f} | {summary['final_test_precision_at_5']:.2f} | {raw} | "
            f"{'not reached' if math.isinf(reach) else f'{reach:.1f}'} |"
        )
    (out_dir / "xc_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, (summary, history) in results.items():
        seconds = [row["seconds"] for row in history]
        axes[0].plot(
            seconds, [row["test_log_likelihood"] for row in history], marker=".", color=COLOURS[method], label=method
        )
        axes[1].plot(
            seconds, [row["test_accuracy"] for row in history], marker=".", color=COLOURS[method], label=method
        )
        if method == "adversarial":
            axes[1].plot(
                seconds,
                [row["test_raw_accuracy"] for row in history],
                ":",
                color=COLOURS[method],
                label="adversarial, raw scores",
            )
    if "bayes_test_log_likelihood" in any_summary:
        axes[0].axhline(any_summary["bayes_test_log_likelihood"], color="gray", ls="--", label="Bayes posterior")
        axes[1].axhline(any_summary["bayes_test_accuracy"], color="gray", ls="--", label="Bayes posterior")
    axes[0].set_ylabel("predictive log-likelihood (nats / test point)")
    axes[1].set_ylabel("accuracy = P@1 (%)")
    axes[0].set_ylim(bottom=max(min(ax for ax in axes[0].get_ylim()), -12))
    for axis in axes:
        axis.set_xlabel(f"training time incl. tree fit ({args.clock} clock, s)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(f"train_xc.py on planted, C = {args.num_classes}")
    figure.tight_layout()
    figure.savefig(out_dir / "xc_compare.png", dpi=110)
    print(f"wrote {out_dir / 'xc_compare.md'}, {out_dir / 'xc_compare.png'}; runs in {base}")


def timing(args):
    """Tree fit seconds, sampling / log p_n seconds per negative and sparse Adagrad step seconds against C."""
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = [
        f"planted data, K = 32, k = 16, {args.timing_train_per_class} fitting points per label, {args.threads} thread, "
        f"{args.clock} clock; sampling: batch 1000 x 10 negatives, mean of 20 repetitions.",
        "",
        "| C | depth | fitting points | tree fit (s) | sampling (us / negative) | log p_n (us / label) | sparse step, "
        "batch 1000 x 11 rows (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for num_classes in args.timing_classes:
        generator = torch.Generator().manual_seed(0)
        planted = common.PlantedHierarchy(num_classes, 32, generator)
        x, y = planted.sample(args.timing_train_per_class * num_classes, generator)
        tree = xc_tree.fit_tree(x, y, num_classes, clock=clock)
        xb, yb = planted.sample(1000, generator)
        z = tree.whiten(xb)

        def measure(function, repeats=20):
            function()
            start = clock()
            for _ in range(repeats):
                function()
            return (clock() - start) / repeats

        sample_seconds = measure(lambda: tree.sample(z, 10))
        log_prob_seconds = measure(lambda: tree.log_prob(z, yb[:, None].expand(1000, 10)))
        model = xc.LinearScores(num_classes, 32)
        optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
        negatives, neg_log_pn = tree.sample(z, 10)

        def step():
            scores = model(xb, torch.cat([yb[:, None], negatives], 1))
            loss = xc.negative_sampling_loss(scores[:, 0], scores[:, 1:], tree.log_prob(z, yb), neg_log_pn, 1e-3)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step_seconds = measure(step)
        rows.append(
            f"| 2^{round(math.log2(num_classes))} = {num_classes} | {tree.depth} | {len(y)} | {tree.fit_seconds:.1f} | "
            f"{sample_seconds / 1e4 * 1e6:.2f} | {log_prob_seconds / 1e4 * 1e6:.2f} | {step_seconds * 1e3:.1f} |"
        )
        print(rows[-1], flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "xc_timing.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    arguments = parse_args()
    torch.sparse.check_sparse_tensor_invariants.disable()
    torch.set_num_threads(arguments.threads)
    if arguments.timing:
        timing(arguments)
    elif arguments.report_only:
        report_only(arguments)
    else:
        compare(arguments)
