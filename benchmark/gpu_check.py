"""One-shot check of the whole project on one CUDA GPU: every training script runs a few hundred steps with its
device defaults (bf16 autocast, channels_last, torch.compile), and this prints one table.

    python benchmark/gpu_check.py                                   # ~6-8 min on one recent GPU
    python benchmark/gpu_check.py --fmnist /usr/share/datasets/fashion-mnist   # also Fashion-MNIST (idx .gz files)
    python benchmark/gpu_check.py --fmnist fashion_mnist.npz        # ... or an .npz (x_train, y_train, x_test, y_test)
    python benchmark/gpu_check.py --device cpu --steps 6 --depth 10 --width 1   # the logic, on a CPU (the test suite)

Per WRN script (train_supervised --ns3l, train_vat --ns3l, train_pi --ns3l, train_mixmatch --ns3l, train_fixmatch
--ns3l, train_freematch --ns3l), on a synthetic 32x32x3 .npz written here (no download, no network):
  1. ``--steps`` steps at the paper's batch sizes with the defaults (compiled): steps/s, images/s, peak GPU memory,
     compile time (the first step, which compiles, is outside steps/s), and checks: exit 0, finite losses in
     summary.json, an evaluation, a checkpoint.
  2. the same with ``--no-compile`` for the compiled / eager ratio (skip with --no-eager);
  3. bit-exact resume under ``--torch-deterministic``: ``--resume-steps`` steps in one run against half of them, a
     checkpoint, and ``--resume`` for the rest; every weight of the two final checkpoints must be equal.
Then train_fmnist_ablation.py (small CNN), train_xc.py (planted data) and train_imagenet_mel.py (a tiny DenseNet on a
generated image folder) once each with the same checks, and with ``--fmnist`` every script again on Fashion-MNIST.

Every run is a child process (``--child``) that runs the script with runpy and reports its peak GPU memory. It needs
only the PyTorch already installed (2.4 or newer: torch.compile guarding module attributes, torch._foreach_lerp_) plus
torchvision and tensorboard, which the scripts import. Exit status 0 when every row passes.
"""

import argparse
import json
import math
import os
import runpy
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import make_npz  # noqa: E402  (the synthetic data set speed.py uses)

WRN_SCRIPTS = {  # script -> (flags, images drawn per step given its batch flags)
    "train_supervised.py": (["--ns3l"], lambda a: a["batch_size"] + a["unlabeled_batch_size"]),
    "train_vat.py": (["--ns3l"], lambda a: a["batch_size"] + a["unlabeled_batch_size"]),
    "train_pi.py": (["--ns3l"], lambda a: a["batch_size"] + a["unlabeled_batch_size"]),
    "train_mixmatch.py": (["--ns3l"], lambda a: a["batch_size"] * (1 + a["k_augment"])),
    "train_fixmatch.py": (["--ns3l"], lambda a: a["batch_size"] * (1 + 2 * a["uratio"])),
    "train_freematch.py": (["--ns3l"], lambda a: a["batch_size"] * (1 + 2 * a["uratio"])),
}
# Scripts whose LR schedule depends on --total-steps (FixMatch's cosine): the first leg of the resume check runs to the
# full length and leaves early with --stop-at, so both legs follow the uninterrupted run's schedule.
STOP_AT_SCRIPTS = {"train_fixmatch.py", "train_freematch.py"}
OTHER_SCRIPTS = ["train_fmnist_ablation.py", "train_xc.py", "train_imagenet_mel.py"]
CHECKPOINT_KEYS = ("model", "ema_model")


# ------------------------------------------------------------------------------------------------------ the child
def child(script, argv, report):
    """Run ``script`` as __main__ with ``argv``; write {"exit", "peak_bytes", "seconds"} to ``report``."""
    import torch

    sys.argv = [script] + argv
    sys.path.insert(0, ROOT)
    start, code = time.perf_counter(), 0
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    with open(report, "w") as f:
        json.dump({"exit": code, "peak_bytes": peak, "seconds": time.perf_counter() - start}, f)
    return code


def run_child(script, argv, workdir, name, device, threads, timeout):
    """(report dict, stdout + stderr tail) of one child run."""
    report = os.path.join(workdir, f"{name}.report.json")
    env = dict(os.environ, PYTHONHASHSEED="0")
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads))
    command = [sys.executable, os.path.abspath(__file__), "--child", script, report, "--"] + [str(a) for a in argv]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired:
        return {"exit": "timeout"}, f"timed out after {timeout} s"
    if not os.path.exists(report):
        return {"exit": result.returncode}, output
    with open(report) as f:
        return json.load(f), output


# ----------------------------------------------------------------------------------------------------- the checks
def read_summary(run_dir):
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def finite_numbers(summary, keys):
    return all(isinstance(summary.get(k), (int, float)) and math.isfinite(summary[k]) for k in keys)


def check_run(report, output, run_dir, error_keys, checkpoint=True):
    """The failures of one run: exit status, summary.json with finite evaluated errors (an evaluation ran), no nan
    loss in the log, a checkpoint (for the scripts that write one)."""
    problems = []
    if report.get("exit") != 0:
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return [f"exit {report.get('exit')}: {tail[0][:160]}"]
    summary = read_summary(run_dir)
    if summary is None:
        return ["no summary.json"]
    if not finite_numbers(summary, error_keys):
        problems.append(f"non-finite {error_keys}: {[summary.get(k) for k in error_keys]}")
    if any(word in output.lower() for word in ("loss nan", "loss inf", "non-finite loss")):
        problems.append("a logged loss is not finite")
    if checkpoint and not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        problems.append("no checkpoint.pt")
    return problems


def same_weights(dir_a, dir_b):
    """None when every tensor of the two checkpoints' weights is bitwise equal, else the first difference."""
    import torch

    a = torch.load(os.path.join(dir_a, "checkpoint.pt"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(dir_b, "checkpoint.pt"), map_location="cpu", weights_only=True)
    for key in CHECKPOINT_KEYS:
        if key not in a:
            continue
        for name, tensor in a[key].items():
            if not torch.equal(tensor, b[key][name]):
                diff = (tensor.double() - b[key][name].double()).abs().max()
                return f"{key}.{name} differs after --resume (max |diff| {diff:.3g})"
    return None


# ------------------------------------------------------------------------------------------------------- the rows
def wrn_rows(script, data_flags, label, args, workdir, device_flags):
    flags, images_per_step = WRN_SCRIPTS[script]
    base = [*flags, *data_flags, "--depth", args.depth, "--width", args.width, *device_flags]
    runs = os.path.join(workdir, "runs")
    rows = []
    compiled = ["--compile"] if args.compile else ["--no-compile"]
    variants = [("compiled" if args.compile else "eager", compiled)]
    variants += [("eager", ["--no-compile"])] if args.eager and args.compile else []
    for variant, extra in variants:
        name = f"{label}_{script[:-3]}_{variant}"
        steps = args.steps
        argv = [
            *base,
            *extra,
            "--total-steps",
            steps,
            "--eval-every",
            steps,
            "--log-every",
            max(1, steps // 4),
            "--runs-dir",
            runs,
            "--run-name",
            name,
        ]
        report, output = run_child(script, argv, workdir, name, args.device, args.threads, args.timeout)
        run_dir = os.path.join(runs, name)
        problems = check_run(report, output, run_dir, ["final_test_error"])
        summary = read_summary(run_dir) or {}
        sps = summary.get("steps_per_second")
        images = images_per_step(summary["args"]) if summary.get("args") else None
        rows.append(
            {
                "script": script,
                "data": label,
                "variant": variant,
                "steps_per_second": sps,
                "images_per_second": sps * images if sps and images else None,
                "peak_gib": report.get("peak_bytes") / 2**30 if report.get("peak_bytes") else None,
                "compile_seconds": summary.get("compile_seconds"),
                "problems": problems,
            }
        )
    if args.resume_steps:  # bit-exact resume, compiled, deterministic kernels
        half, steps = max(1, args.resume_steps // 2), args.resume_steps
        det = [*base, *compiled, "--torch-deterministic", "--eval-every", half, "--log-every", half, "--runs-dir", runs]
        whole, legs = f"{label}_{script[:-3]}_whole", f"{label}_{script[:-3]}_legs"
        outcomes = [
            run_child(
                script,
                [*det, "--total-steps", steps, "--run-name", whole],
                workdir,
                whole,
                args.device,
                args.threads,
                args.timeout,
            ),
            run_child(
                script,
                [*det, "--total-steps", *([steps, "--stop-at"] if script in STOP_AT_SCRIPTS else []), half]
                + ["--run-name", legs],
                workdir,
                legs + "1",
                args.device,
                args.threads,
                args.timeout,
            ),
            run_child(
                script,
                ["--resume", os.path.join(runs, legs), "--total-steps", steps],
                workdir,
                legs + "2",
                args.device,
                args.threads,
                args.timeout,
            ),
        ]
        problems = [
            f"exit {r.get('exit')}: {(o.strip().splitlines() or ['no output'])[-1][:160]}"
            for r, o in outcomes
            if r.get("exit") != 0
        ]
        if not problems:
            difference = same_weights(os.path.join(runs, whole), os.path.join(runs, legs))
            problems = [difference] if difference else []
        rows.append({"script": script, "data": label, "variant": f"resume {half}+{steps - half}", "problems": problems})
    return rows


def other_rows(fmnist_flags, npz, args, workdir, device_flags, selected):
    """train_fmnist_ablation.py, train_xc.py, train_imagenet_mel.py (those in ``selected``): one run each."""
    runs = os.path.join(workdir, "runs")
    steps = args.steps
    common = [
        "--total-steps",
        steps,
        "--eval-every",
        steps,
        "--log-every",
        max(1, steps // 4),
        "--runs-dir",
        runs,
        *device_flags,
    ]
    folder = make_image_folder(os.path.join(workdir, "images")) if "train_imagenet_mel.py" in selected else None
    # DenseNet-121 at 64 px on a GPU; a tiny DenseNet on the CPU, where this only checks the logic
    densenet = (
        ["--arch", "densenet121", "--num-workers", "2"]
        if args.device == "cuda"
        else [
            "--arch",
            "densenet121",
            "--block-config",
            "2,2",
            "--growth-rate",
            "8",
            "--num-init-features",
            "16",
            "--num-workers",
            "0",
        ]
    )
    compile_flag = ["--compile"] if args.compile else ["--no-compile"]
    jobs = [  # script, data label, flags, summary keys that must be finite, images per step, writes a checkpoint
        (
            "train_fmnist_ablation.py",
            "synthetic",
            ["--dataset", npz, "--num-labeled", "200", "--num-valid", "0"],
            ["final_test_error"],
            lambda a: a["batch_size"] + a["unlabeled_batch_size"],
            False,
        ),
        (
            "train_xc.py",
            "planted",
            ["--dataset", "planted", "--num-classes", "4096", "--method", "adversarial"],
            ["final_test_error"],
            lambda a: a["batch_size"],
            True,
        ),
        (
            "train_imagenet_mel.py",
            "image folder",
            [
                "--data-dir",
                folder,
                "--num-labeled",
                "32",
                "--num-unlabeled",
                "-1",
                "--batch-size",
                "32",
                "--crop-size",
                "64",
                "--resize-size",
                "72",
                *densenet,
                *compile_flag,
            ],
            ["final_test_error"],
            lambda a: a["batch_size"],
            True,
        ),
    ]
    if fmnist_flags:
        jobs.append(
            (
                "train_fmnist_ablation.py",
                "fashion-mnist",
                [*fmnist_flags, "--num-valid", "0"],
                ["final_test_error"],
                lambda a: a["batch_size"] + a["unlabeled_batch_size"],
                False,
            )
        )
    rows = []
    for script, label, flags, keys, images_per_step, writes_checkpoint in jobs:
        if script not in selected:
            continue
        name = f"{label.replace(' ', '_')}_{script[:-3]}"
        argv = [*flags, *common, "--run-name", name]
        report, output = run_child(script, argv, workdir, name, args.device, args.threads, args.timeout)
        run_dir = os.path.join(runs, name)
        problems = check_run(report, output, run_dir, keys, writes_checkpoint)
        summary = read_summary(run_dir) or {}
        sps = summary.get("steps_per_second")
        images = images_per_step(summary["args"]) if summary.get("args") else None
        rows.append(
            {
                "script": script,
                "data": label,
                "variant": "default",
                "steps_per_second": sps,
                "images_per_second": sps * images if sps and images else None,
                "peak_gib": report.get("peak_bytes") / 2**30 if report.get("peak_bytes") else None,
                "compile_seconds": summary.get("compile_seconds"),
                "problems": problems,
            }
        )
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def idx_to_npz(folder, workdir):
    """A folder of the four idx files (Debian's dataset-fashion-mnist layout, .gz or not) as an .npz every script
    reads, so the check uses exactly the files given."""
    import numpy as np

    sys.path.insert(0, ROOT)
    import common

    x_train, y_train, x_test, y_test = common._load_idx_folder(folder)
    path = os.path.join(workdir, "fashion_mnist.npz")
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def make_image_folder(root, classes=4, per_class=24, size=80):
    """A tiny ImageNet-style train/ and val/ folder of PNGs (class = colour), for train_imagenet_mel.py."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(30, 225, (classes, 3))
    for split, n in (("train", per_class), ("val", per_class // 4)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


# ---------------------------------------------------------------------------------------------------------- table
def fmt(value, pattern):
    return pattern.format(value) if isinstance(value, (int, float)) and value == value else "-"


def format_table(rows):
    lines = [
        "| script | data | variant | steps/s | images/s | compiled / eager | peak GPU memory | compile time | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {(r["script"], r["data"]): r.get("images_per_second") for r in rows if r["variant"] == "eager"}
    for r in rows:
        ratio = None
        if r["variant"] == "compiled" and eager.get((r["script"], r["data"])) and r.get("images_per_second"):
            ratio = r["images_per_second"] / eager[(r["script"], r["data"])]
        check = "pass" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(
            f"| {r['script']} | {r['data']} | {r['variant']} | {fmt(r.get('steps_per_second'), '{:.2f}')} | "
            f"{fmt(r.get('images_per_second'), '{:.0f}')} | {fmt(ratio, '{:.2f}x')} | "
            f"{fmt(r.get('peak_gib'), '{:.2f} GiB')} | {fmt(r.get('compile_seconds'), '{:.1f} s')} | {check} |"
        )
    return "\n".join(lines)


def environment(device):
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "CPU"
    return f"torch {torch.__version__}, {name}, CUDA {torch.version.cuda or '-'}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        script, report = argv[1], argv[2]
        return child(script, argv[4:], report)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each speed run")
    parser.add_argument("--resume-steps", type=int, default=20, help="steps of the bit-exact resume check (0: skip)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the runs use --compile (the CUDA default); --no-compile checks the eager path only",
    )
    parser.add_argument(
        "--eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run each WRN script with --no-compile (the compiled / eager column)",
    )
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument(
        "--fmnist",
        default=None,
        metavar="DIR_OR_NPZ",
        help="Fashion-MNIST: a folder of the idx .gz files (Debian dataset-fashion-mnist) or an .npz",
    )
    parser.add_argument(
        "--scripts", nargs="+", default=None, choices=list(WRN_SCRIPTS) + OTHER_SCRIPTS, help="only these scripts"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run with --device cpu")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per child run")
    parser.add_argument("--workdir", default=None, help="runs and data go here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.resume_steps < 0 or args.resume_steps == 1:
        parser.error("--steps must be >= 2 and --resume-steps 0 or >= 2")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: error: no CUDA device is visible; use --device cpu to check the logic on a CPU",
                file=sys.stderr,
            )
            return 2
    fmnist_flags = None
    if args.fmnist:
        if not os.path.exists(args.fmnist):
            print(f"gpu_check: error: --fmnist {args.fmnist} does not exist", file=sys.stderr)
            return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="ns3l_gpu_check_")
    os.makedirs(workdir, exist_ok=True)
    if args.fmnist:
        try:
            fmnist_flags = [
                "--dataset",
                args.fmnist if args.fmnist.endswith(".npz") else idx_to_npz(args.fmnist, workdir),
            ]
        except Exception as error:  # a folder without the four idx files, or unreadable ones
            print(f"gpu_check: error: --fmnist {args.fmnist}: {error}", file=sys.stderr)
            return 2
    npz = make_npz(os.path.join(workdir, "synthetic32.npz"), num_train=2000, num_test=500)
    device_flags = ["--cuda"] if args.device == "cuda" else ["--no-cuda"]
    started = time.perf_counter()
    print(f"gpu_check: {environment(args.device)}; work dir {workdir}", flush=True)
    selected = set(args.scripts or list(WRN_SCRIPTS) + OTHER_SCRIPTS)
    rows = []
    data_sets = [("synthetic", ["--dataset", npz, "--num-labeled", "250", "--num-valid", "200"])]
    if fmnist_flags:
        data_sets.append(("fashion-mnist", [*fmnist_flags, "--num-labeled", "1000", "--num-valid", "1000"]))
    for label, data_flags in data_sets:
        for script in WRN_SCRIPTS:
            if script in selected:
                new = wrn_rows(script, data_flags, label, args, workdir, device_flags)
                print("\n".join(format_table(new).splitlines()[2:]), flush=True)
                rows += new
    rows += other_rows(fmnist_flags, npz, args, workdir, device_flags, selected)
    print(
        f"\n{environment(args.device)}; {time.perf_counter() - started:.0f} s in all; WRN-{args.depth}-{args.width}, "
        f"{args.steps} steps per speed run\n"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    failed = [r for r in rows if r["problems"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
