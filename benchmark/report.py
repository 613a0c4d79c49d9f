"""Gather summary.json files into a Markdown table of mean +- std per configuration (the paper's figure beside it
where one exists), and draw learning curves from the TensorBoard logs to a PNG.

    python benchmark/report.py runs/fmnist_cpu500 --suite fmnist_cpu fmnist_cpu_lr3e-3 \
        --output docs/fmnist_cpu_table.md --curves docs/fmnist_cpu_curves.png
    python benchmark/report.py runs/sweep --paper ns3l=16.42,0.08 --metric final_test_error

A run directory named ``<config>__seed<S>`` (what benchmark/run.py makes) belongs to configuration ``<config>``;
any other run directory is its own configuration. Only runs with a summary.json count (unfinished runs are listed
as such). The std is the sample standard deviation over seeds (n - 1), as papers report it; one seed shows "-".

``--metric reported`` takes each run's own reported number (summary.json's ``reported_metric``: Protocol A the test
error at the best validation error, MixMatch the median of the last 20 evaluations, FixMatch the median of the last
``--median-of``), so one table can hold every script. With ``--baseline CONFIG`` (default: ``supervised`` when such a
row exists) each row also gets its paired difference to that row: the same seed is the same labeled split, so the
difference is taken seed by seed and reported as mean ± standard error (std / sqrt(n)) over the seeds both rows
have. A second table gives each method's NS3L effect the same way: ``X+ns3l`` minus ``X``, and ``ns3l`` minus the
baseline.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METRICS = (
    "reported",
    "test_error_at_best_valid",
    "median_last20_test_error",
    "median_test_error",
    "median_valid_error",
    "final_test_error",
    "best_valid_error",
    "final_valid_error",
)
SEED_SUFFIX = re.compile(r"^(?P<config>.+)__seed(?P<seed>-?\d+)$")


def config_of(run_dir_name):
    match = SEED_SUFFIX.match(run_dir_name)
    return match.group("config") if match else run_dir_name


def collect(runs_dir):
    """{config: {"runs": [summary dicts with a 'run' key], "unfinished": [names]}} in first-seen order."""
    groups = {}
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"{runs_dir} is not a directory")
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name)
        if not os.path.isdir(path) or name.startswith("."):  # .submitit: a cluster sweep's logs, not a run
            continue
        group = groups.setdefault(config_of(name), {"runs": [], "unfinished": []})
        summary_path = os.path.join(path, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            summary["run"] = name
            group["runs"].append(summary)
        else:
            group["unfinished"].append(name)
    return groups


def provenance_of(runs_dir, run):
    """{"code": ..., "libraries": ..., "dirty": ...} of every leg of one run, from its run_info.json (None for a run
    without a readable one): the commits, the library versions and the commits run with uncommitted changes."""
    path = os.path.join(runs_dir, run["run"], "run_info.json")
    try:
        with open(path) as f:
            legs = [leg for leg in json.load(f)["legs"] if isinstance(leg, dict)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    commits = [(leg.get("commit") or "no git")[:10] for leg in legs]
    libraries = {", ".join(f"{k} {leg.get(k)}" for k in LIBRARIES) for leg in legs}
    dirty = {commit for commit, leg in zip(commits, legs) if leg.get("dirty")}
    return {"code": set(commits), "libraries": libraries, "dirty": dirty}


LIBRARIES = ("python", "torch", "torchvision", "numpy", "cuda", "cudnn")  # the versions run_info.json records


def provenance_warnings(runs_dir, groups, order=None):
    """Lines warning that the runs of one row, or of the whole table, come from different commits or library
    versions, that some had uncommitted changes, or that some have no run_info.json to say."""
    warnings, table = [], {"code": set(), "libraries": set()}
    unknown, dirty = [], set()
    for name in ordered(groups, order):
        row = {"code": set(), "libraries": set()}
        for run in groups[name]["runs"]:
            info = provenance_of(runs_dir, run)
            if info is None:
                unknown.append(run["run"])
                continue
            for key in row:
                row[key] |= info[key]
            dirty |= info["dirty"]
        for key, what in (("code", "commits"), ("libraries", "library versions")):
            if len(row[key]) > 1:
                warnings.append(
                    f"warning: the runs of {name} come from {len(row[key])} {what}: {'; '.join(sorted(row[key]))}"
                )
            table[key] |= row[key]
    for key, what in (("code", "commits"), ("libraries", "library versions")):
        if len(table[key]) > 1:
            warnings.append(
                f"warning: this table's runs come from {len(table[key])} {what}: {'; '.join(sorted(table[key]))}"
            )
    if dirty:
        warnings.append(f"warning: some runs ran with uncommitted changes to commit {', '.join(sorted(dirty))}")
    if unknown:
        warnings.append(f"note: {len(unknown)} runs have no readable run_info.json (older runs), e.g. {unknown[0]}")
    return warnings


def seed_of(run):
    """The seed of a summary dict: from its run directory's name (<config>__seed<S>), else from its args."""
    match = SEED_SUFFIX.match(run["run"])
    return int(match.group("seed")) if match else (run.get("args") or {}).get("seed")


def value_of(run, metric):
    """``run``'s number for ``metric``; "reported": the script's own (a summary written before summary.json named it
    counts as Protocol A's test error at the best validation error)."""
    if metric == "reported":
        metric = run.get("reported_metric") or "test_error_at_best_valid"
    value = run.get(metric)
    return float(value) if value is not None and math.isfinite(float(value)) else None


def paired(groups, name, base, metric):
    """(mean, standard error or None, n) of ``name`` minus ``base`` seed by seed, over the seeds where both have a
    finite value; (None, None, 0) when none."""
    base_values = {seed_of(r): value_of(r, metric) for r in groups[base]["runs"]}
    differences = []
    for run in groups[name]["runs"]:
        value, other = value_of(run, metric), base_values.get(seed_of(run))
        if value is not None and other is not None:
            differences.append(value - other)
    if not differences:
        return None, None, 0
    se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
    return statistics.fmean(differences), se, len(differences)


def fmt_paired(mean, se, n, digits=2):
    if mean is None:
        return "-"
    return f"{mean:+.{digits}f} ± {se:.{digits}f} (n={n})" if se is not None else f"{mean:+.{digits}f} (n={n})"


def ns3l_pairs(groups, baseline=None, order=None):
    """[(method label, with NS3L, without)]: every ``X+ns3l`` row whose ``X`` row exists (in ``order``, then the
    rest), and ``ns3l`` (NS3L alone) against the baseline."""
    names = ordered(groups, order)
    pairs = [(name[: -len("+ns3l")], name, name[: -len("+ns3l")]) for name in names if name.endswith("+ns3l")]
    pairs = [p for p in pairs if p[2] in groups]
    if "ns3l" in groups and baseline in groups:
        pairs.insert(0, (baseline, "ns3l", baseline))
    return pairs


def ns3l_table(groups, metric, baseline=None, labels=None, order=None):
    """Markdown table of each method's paired NS3L effect (negative: NS3L lowers the error)."""
    labels = labels or {}
    lines = ["| method | NS3L minus without, paired (%) |", "|---|---|"]
    for method, with_ns3l, without in ns3l_pairs(groups, baseline, order):
        lines.append(f"| {labels.get(method, method)} | {fmt_paired(*paired(groups, with_ns3l, without, metric))} |")
    return "\n".join(lines) + "\n"


def ordered(groups, order=None):
    """The configuration names of ``groups``: those in ``order`` first, in that order, then the rest as found."""
    return [n for n in (order or []) if n in groups] + [n for n in groups if n not in (order or [])]


def mean_std(values):
    """(mean, sample std or None for one value); non-finite values are dropped."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean, std, digits=2):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def table(groups, metric="test_error_at_best_valid", paper=None, order=None, labels=None, baseline=None):
    """Markdown table: configuration | seeds | metric mean ± std | [metric] | [minus baseline] | paper | steps/s |
    steps. ``paper``: {config: (mean, std or None)}; ``order``: configuration names first in this order;
    ``baseline``: a configuration each row is compared with seed by seed (paired)."""
    paper, labels = paper or {}, labels or {}
    names = ordered(groups, order)
    show_paper = any(n in paper for n in names)
    baseline = baseline if baseline in groups else None
    header = ["configuration", "seeds", f"{metric} (%)"] + (["metric"] if metric == "reported" else [])
    header += [f"minus {labels.get(baseline, baseline)}, paired (%)"] if baseline else []
    header += (["paper (%)"] if show_paper else []) + ["steps/s", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        runs = groups[name]["runs"]
        mean, std = mean_std([value_of(r, metric) for r in runs])
        sps, _ = mean_std([r.get("steps_per_second") for r in runs])
        steps = sorted({r.get("steps") for r in runs if r.get("steps") is not None})
        seeds = str(len(runs)) + (
            f" (+{len(groups[name]['unfinished'])} unfinished)" if groups[name]["unfinished"] else ""
        )
        row = [labels.get(name, name), seeds, fmt(mean, std)]
        if metric == "reported":
            keys = sorted({r.get("reported_metric") or "test_error_at_best_valid" for r in runs})
            row.append(", ".join(f"`{k}`" for k in keys) or "-")
        if baseline:
            row.append("" if name == baseline else fmt_paired(*paired(groups, name, baseline, metric)))
        if show_paper:
            row.append(fmt(*paper[name]) if name in paper else "")
        row += ["-" if sps is None else f"{sps:.2f}", "/".join(map(str, steps)) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def read_curve(run_dir, tag):
    """[(step, value)] of one scalar tag from the event files of a run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0})
            acc.Reload()
            if tag in acc.Tags().get("scalars", []):
                for event in acc.Scalars(tag):
                    points[event.step] = event.value  # a resumed run's later file wins
    return sorted(points.items())


def curve_means(runs_dir, groups, tag):
    """{config: ([steps], [mean over seeds], n)} of ``tag`` at the steps every seed of the config logged."""
    means = {}
    for name, group in groups.items():
        curves = [dict(read_curve(os.path.join(runs_dir, r["run"]), tag)) for r in group["runs"]]
        curves = [c for c in curves if c]
        if curves:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            means[name] = (steps, [statistics.fmean(c[s] for c in curves) for s in steps], len(curves))
    return means


def diagnostics_table(runs_dir, groups, tags, labels=None, order=None):
    """Markdown table of TensorBoard scalars: per configuration and tag, the mean over its seeds (± std) of each
    run's mean of the scalar over the whole run (every logged point counts once), e.g. a mask rate."""
    labels = labels or {}
    names = ordered(groups, order)
    header = ["configuration", "seeds"] + [f"`{tag}`, run mean" for tag in tags]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        runs = groups[name]["runs"]
        row = [labels.get(name, name), str(len(runs))]
        for tag in tags:
            means = [
                statistics.fmean(v for _, v in c)
                for c in (read_curve(os.path.join(runs_dir, r["run"]), tag) for r in runs)
                if c
            ]
            row.append(fmt(*mean_std(means), digits=3) if means else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs_dir, groups, path, tag="eval/test_error", labels=None, order=None):
    """One line per configuration: the mean over its seeds of ``tag``, in ``order`` (then the rest). matplotlib when
    installed (benchmark/requirements.txt), else a plain Pillow drawing, so a missing plotting library never loses the
    figure."""
    order = ordered(groups, order)
    labels, means = labels or {}, curve_means(runs_dir, {n: groups[n] for n in order}, tag)
    try:
        import matplotlib
    except ImportError:
        return _plot_pillow(means, path, tag, labels)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: a 15-row table needs more than the default 10
    for i, (name, (steps, values, n)) in enumerate(means.items()):
        ax.plot(
            steps,
            values,
            marker="o",
            markersize=3,
            color=colours[i % len(colours)],
            linestyle="--" if "@" in name else "-",
            label=f"{labels.get(name, name)} (n={n})",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(tag + " (%)" if "error" in tag else tag)
    ax.grid(alpha=0.3)
    if means:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(means)


def _plot_pillow(means, path, tag, labels, size=(840, 540), margin=60):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [(s, v) for steps, values, _ in means.values() for s, v in zip(steps, values)]
    x0, x1 = (min(p[0] for p in points), max(p[0] for p in points)) if points else (0, 1)
    y0, y1 = (min(p[1] for p in points), max(p[1] for p in points)) if points else (0, 1)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    width, height = size[0] - 2 * margin, size[1] - 2 * margin

    def xy(step, value):
        return margin + width * (step - x0) / (x1 - x0), size[1] - margin - height * (value - y0) / (y1 - y0)

    draw.rectangle([margin, margin, size[0] - margin, size[1] - margin], outline="black")
    draw.text((margin, size[1] - margin + 8), f"step {x0:g}", fill="black")
    draw.text((size[0] - margin - 80, size[1] - margin + 8), f"step {x1:g}", fill="black")
    draw.text((4, margin), f"{y1:.2f}", fill="black")
    draw.text((4, size[1] - margin - 10), f"{y0:.2f}", fill="black")
    draw.text((margin, 20), tag + " (mean over seeds)", fill="black")
    colours = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    for i, (name, (steps, values, n)) in enumerate(means.items()):
        colour = colours[i % len(colours)]
        line = [xy(s, v) for s, v in zip(steps, values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for px, py in line:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((size[0] - margin - 200, margin + 8 + 14 * i), f"{labels.get(name, name)} (n={n})", fill=colour)
    image.save(path)
    return len(means)


def parse_paper(items):
    """['ns3l=16.42,0.08', 'vat=13.86'] -> {'ns3l': (16.42, 0.08), 'vat': (13.86, None)}."""
    paper = {}
    for item in items or []:
        name, _, numbers = item.partition("=")
        values = [float(v) for v in numbers.split(",") if v]
        if not name or not 1 <= len(values) <= 2:
            raise ValueError(f"--paper {item!r}: expected NAME=MEAN[,STD]")
        paper[name] = (values[0], values[1] if len(values) == 2 else None)
    return paper


def main(argv=None, paper=None, order=None, labels=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("runs_dir", help="directory holding the run directories")
    parser.add_argument("--metric", default="test_error_at_best_valid", choices=METRICS)
    parser.add_argument(
        "--paper", nargs="+", default=None, metavar="NAME=MEAN[,STD]", help="the paper's figure for a configuration"
    )
    parser.add_argument("--suite", nargs="+", default=None, help="order the rows like these benchmark/run.py suites")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only the runs of these seeds")
    parser.add_argument("--output", default=None, help="also write the Markdown table here")
    parser.add_argument("--curves", default=None, help="PNG of learning curves (mean over seeds)")
    parser.add_argument("--tag", default="eval/test_error", help="TensorBoard scalar for --curves")
    parser.add_argument(
        "--diagnostics",
        nargs="+",
        default=None,
        metavar="TAG",
        help="also a table of these TensorBoard scalars, each run's mean over the run (e.g. charts/mask_rate)",
    )
    parser.add_argument(
        "--baseline",
        default="supervised",
        help="configuration every row is compared with seed by seed (skipped when no such row); also the partner of "
        "the 'ns3l' row in the NS3L-effect table",
    )
    args = parser.parse_args(argv)
    try:
        groups = collect(args.runs_dir)
        if args.seeds is not None:
            for group in groups.values():
                group["runs"] = [r for r in group["runs"] if seed_of(r) in args.seeds]
        paper = {**(paper or {}), **parse_paper(args.paper)}
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.suite:
        import run

        unknown = [name for name in args.suite if name not in run.SUITES]
        if unknown:
            parser.error(f"unknown suite {unknown[0]!r}: choose from {', '.join(run.SUITES)}")
        order = [c.name for name in args.suite for c in run.SUITES[name]()]
    text = table(groups, args.metric, paper, order, labels, args.baseline)
    if ns3l_pairs(groups, args.baseline):
        text += "\n" + ns3l_table(groups, args.metric, args.baseline, labels, order)
    if args.diagnostics:
        text += "\n" + diagnostics_table(args.runs_dir, groups, args.diagnostics, labels, order)
    for line in provenance_warnings(args.runs_dir, groups, order):
        print(f"report.py: {line}", file=sys.stderr)
    print(text, end="")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
    if args.curves:
        plot_curves(args.runs_dir, groups, args.curves, args.tag, labels, order)
        print(f"curves -> {args.curves}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
