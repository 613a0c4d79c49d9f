"""Fast checks of the benchmark tooling (no training): report.py's mean ± std table and curves, run.py's commands,
skipping and resuming, speed.py's ratio arithmetic and verdicts, and the paper scripts' commands and numbers."""

import importlib
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
sys.path.insert(0, os.path.join(ROOT, "benchmark", "paper"))

import report  # noqa: E402
import run  # noqa: E402
import speed  # noqa: E402


def write_summary(runs_dir, name, **values):
    os.makedirs(os.path.join(runs_dir, name), exist_ok=True)
    summary = {"steps": 100, "steps_per_second": 2.0, "final_test_error": 50.0, **values}
    with open(os.path.join(runs_dir, name, "summary.json"), "w") as f:
        json.dump(summary, f)


# ------------------------------------------------------------------------------------------------------- report.py
def test_report_mean_and_sample_std_per_config(tmp_path):
    runs = str(tmp_path)
    for seed, error in zip((1, 2, 3), (10.0, 12.0, 14.0)):
        write_summary(runs, f"ns3l__seed{seed}", test_error_at_best_valid=error, steps_per_second=4.0)
    write_summary(runs, "vat__seed1", test_error_at_best_valid=20.0, steps_per_second=1.0)
    os.makedirs(os.path.join(runs, "vat__seed2"))  # unfinished: no summary.json
    groups = report.collect(runs)
    assert set(groups) == {"ns3l", "vat"}
    text = report.table(groups, paper={"ns3l": (16.03, 0.05)}, order=["vat", "ns3l"])
    lines = text.strip().splitlines()
    assert lines[0].startswith("| configuration | seeds | test_error_at_best_valid (%) | paper (%)")
    assert lines[2].startswith("| vat | 1 (+1 unfinished) | 20.00 |")  # order respected, one seed: no std
    assert "| ns3l | 3 | 12.00 ± 2.00 | 16.03 ± 0.05 | 4.00 | 100 |" in text  # sample std of 10, 12, 14 is 2
    write_summary(runs, "fixmatch__seed1", median_valid_error=3.5, median_test_error=4.0)  # FixMatch's selection number
    assert "| fixmatch | 1 | 3.50 |" in report.table(report.collect(runs), metric="median_valid_error")


def test_report_reported_metric_paired_differences_and_ns3l_effects(tmp_path, capsys):
    """--metric reported takes each script's own number; the paired difference is taken seed by seed over the seeds
    both rows have (hand-computed below), and the NS3L table pairs X+ns3l with X and ns3l with the baseline."""
    runs = str(tmp_path)
    for seed, sup, ns3l, mm, mm_ns3l in (
        (1, 10.0, 8.0, 5.0, 4.0),
        (2, 12.0, 11.0, 7.0, 7.5),
        (3, 20.0, 15.0, 6.0, 4.0),
    ):
        write_summary(runs, f"supervised__seed{seed}", test_error_at_best_valid=sup, reported_metric=None)
        write_summary(
            runs, f"ns3l__seed{seed}", test_error_at_best_valid=ns3l, reported_metric="test_error_at_best_valid"
        )
        for name, value in (("mixmatch", mm), ("mixmatch+ns3l", mm_ns3l)):
            write_summary(
                runs,
                f"{name}__seed{seed}",
                median_last20_test_error=value,
                test_error_at_best_valid=99.0,  # not the reported number: must not be read
                reported_metric="median_last20_test_error",
            )
    write_summary(runs, "pi__seed1", test_error_at_best_valid=30.0, reported_metric="test_error_at_best_valid")
    groups = report.collect(runs)
    # ns3l - supervised per seed: -2, -1, -5 -> mean -8/3, sample std sqrt(13/3), s.e. sqrt(13/3)/sqrt(3) = 1.2019
    mean, se, n = report.paired(groups, "ns3l", "supervised", "reported")
    assert (mean, n) == (pytest.approx(-8 / 3), 3) and se == pytest.approx(math.sqrt(13 / 3) / math.sqrt(3))
    # mixmatch - supervised: -5, -5, -14; only seed 1 for pi: no standard error
    assert report.paired(groups, "mixmatch", "supervised", "reported")[:1] == (pytest.approx(-8.0),)
    assert report.paired(groups, "pi", "supervised", "reported") == (pytest.approx(20.0), None, 1)
    assert report.paired(groups, "mixmatch", "supervised", "test_error_at_best_valid")[0] == pytest.approx(99 - 14)
    assert report.main([runs, "--metric", "reported"]) == 0
    out = capsys.readouterr().out
    assert "| ns3l | 3 | 11.33 ± 3.51 | `test_error_at_best_valid` | -2.67 ± 1.20 (n=3) |" in out
    assert "| mixmatch | 3 | 6.00 ± 1.00 | `median_last20_test_error` | -8.00 ± 3.00 (n=3) |" in out
    assert "| pi | 1 | 30.00 | `test_error_at_best_valid` | +20.00 (n=1) |" in out
    # NS3L effects: mixmatch+ns3l - mixmatch per seed: -1, +0.5, -2 -> mean -5/6, s.e. stdev/sqrt(3)
    effect = report.paired(groups, "mixmatch+ns3l", "mixmatch", "reported")
    assert effect[0] == pytest.approx(-5 / 6) and effect[1] == pytest.approx(
        statistics.stdev([-1, 0.5, -2]) / math.sqrt(3)
    )
    assert "| supervised | -2.67 ± 1.20 (n=3) |" in out and "| mixmatch | -0.83 ± 0.73 (n=3) |" in out
    assert report.ns3l_pairs(groups, "supervised") == [
        ("supervised", "ns3l", "supervised"),
        ("mixmatch", "mixmatch+ns3l", "mixmatch"),
    ]


def test_report_ignores_non_finite_and_parses_paper_and_names():
    assert report.mean_std([1.0, float("nan"), 3.0]) == (2.0, math.sqrt(2.0))
    assert report.mean_std([]) == (None, None)
    assert report.parse_paper(["a=1.5,0.2", "b=3"]) == {"a": (1.5, 0.2), "b": (3.0, None)}
    with pytest.raises(ValueError):
        report.parse_paper(["a=1,2,3"])
    assert report.config_of("vat+ns3l__seed12") == "vat+ns3l"
    assert report.config_of("cifar10__train_vat__1__1700000000") == "cifar10__train_vat__1__1700000000"


def test_report_cli_writes_markdown_and_curves(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    runs = str(tmp_path / "runs")
    for seed, offset in ((1, 0.0), (2, 2.0)):
        name = f"pi__seed{seed}"
        write_summary(runs, name, test_error_at_best_valid=30.0 + offset)
        writer = SummaryWriter(os.path.join(runs, name))
        for step, error in ((10, 60.0), (20, 40.0)):
            writer.add_scalar("eval/test_error", error + offset, step)
        writer.close()
    assert report.read_curve(os.path.join(runs, "pi__seed1"), "eval/test_error") == [(10, 60.0), (20, 40.0)]
    out, png = str(tmp_path / "t.md"), str(tmp_path / "c.png")
    assert report.main([runs, "--output", out, "--curves", png, "--paper", "pi=17.12,0.19"]) == 0
    assert "| pi | 2 | 31.00 ± 1.41 | 17.12 ± 0.19 |" in open(out).read()
    assert os.path.getsize(png) > 1000
    # --diagnostics: each run's mean of a scalar over the run, then mean ± std over seeds: (50, 52) -> 51 ± 1.414
    assert report.main([runs, "--output", out, "--diagnostics", "eval/test_error", "charts/absent"]) == 0
    assert "| pi | 2 | 51.000 ± 1.414 | - |" in open(out).read()
    assert report.main([runs, "--output", out, "--seeds", "2"]) == 0  # one seed: its number, no std
    assert "| pi | 1 | 32.00 |" in open(out).read()


def test_report_orders_rows_by_several_suites(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, error in (("ns3l@lr0.003__seed1", 19.0), ("other__seed1", 30.0), ("supervised__seed1", 20.0)):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"test_error_at_best_valid": error, "steps": 5}))
    assert report.main([str(runs), "--suite", "fmnist_cpu", "fmnist_cpu_lr3e-3"]) == 0
    rows = [line.split(" | ")[0].lstrip("| ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["supervised", "ns3l@lr0.003", "other"]  # suite order first, then unknown names
    with pytest.raises(SystemExit):
        report.main([str(runs), "--suite", "fmnist_cpu", "nope"])


# ---------------------------------------------------------------------------------------------------------- run.py
def test_run_dry_run_lists_every_config_and_seed(tmp_path, capsys):
    runs = str(tmp_path / "sweep")
    assert run.main(["--suite", "fmnist_cpu", "--seeds", "1", "2", "3", "--runs-dir", runs, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 30 and not os.path.exists(runs)  # nothing run, nothing created
    names = [c.name for c in run.fmnist_cpu_suite()]
    assert names == [
        "supervised",
        "pseudo-label",
        "ns3l",
        "vat",
        "vat+entmin",
        "vat+ns3l",
        "pi",
        "pi+ns3l",
        "mixmatch",
        "mixmatch+ns3l",
    ]
    assert lines[0].startswith("python train_supervised.py --dataset fashion_mnist --num-labeled 1000")
    assert lines[0].endswith(f"--seed 1 --runs-dir {runs} --run-name supervised__seed1")
    assert lines[10].endswith("--run-name supervised__seed2")  # seed-major: every config on seed 1 first
    assert "train_vat.py --ns3l" in lines[5] and "train_mixmatch.py --ns3l" in lines[9]
    assert all("--depth 10 --width 1" in line and "--bn-momentum" in line for line in lines)
    assert "--lr-decay-step" not in lines[8]  # MixMatch has a constant LR


def test_lr_control_suite_changes_only_the_learning_rate(capsys):
    main = {c.name: c.argv for c in run.fmnist_cpu_suite()}
    control = run.fmnist_cpu_lr_control_suite()
    assert [c.name for c in control] == [
        "pseudo-label@lr0.003",
        "ns3l@lr0.003",
        "vat+ns3l@lr0.003",
        "pi@lr0.003",
        "pi+ns3l@lr0.003",
    ]
    for c in control:
        assert c.argv == main[c.name.split("@")[0]] + ["--lr", "0.003"]
    assert run.main(["--suite", "fmnist_cpu_lr3e-3", "--seeds", "1", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("--lr 0.003 --seed 1") == 5


def test_fixmatch_cpu_suite_differs_only_by_ns3l_and_parses():
    import train_fixmatch

    plain, ns3l = run.fixmatch_fmnist_cpu_suite()
    assert (plain.name, ns3l.name) == ("fixmatch", "fixmatch+ns3l") and ns3l.argv == plain.argv + [
        "--ns3l",
        "--ns3l-weight",
        "4",
    ]
    args = train_fixmatch.parse_args(ns3l.argv[1:])
    assert (args.dataset, args.num_labeled, args.total_steps, args.eval_every, args.median_of) == (
        "fashion_mnist",
        250,
        2000,
        100,
        5,
    )
    assert (args.batch_size, args.uratio, args.ns3l_weight, args.threshold, args.pad_to) == (16, 7, 4.0, 0.05, 32)


def test_digits_few_labels_suite_has_every_row_and_each_script_parses_it():
    """The laptop suite: the fourteen rows the README's table names, every one on digits with 30 labels, and each
    +ns3l row is its partner plus --ns3l only (so the paired NS3L effect compares one change)."""
    import importlib

    suite = run.digits_few_labels_suite()
    names = [c.name for c in suite]
    assert names == [
        "supervised",
        "pseudo-label",
        "ns3l",
        "vat",
        "vat+entmin",
        "vat+ns3l",
        "pi",
        "pi+ns3l",
        "mixmatch",
        "mixmatch+ns3l",
        "fixmatch",
        "fixmatch+ns3l",
        "freematch",
        "freematch+ns3l",
    ]
    configs = {c.name: c.argv for c in suite}
    for name, argv in configs.items():
        if name.endswith("+ns3l"):
            partner = configs[name[: -len("+ns3l")]]
            assert argv[0] == partner[0] and sorted(argv[1:]) == sorted(partner[1:] + ["--ns3l"]), name
        args = importlib.import_module(argv[0][: -len(".py")]).parse_args(argv[1:])
        assert (args.dataset, args.num_labeled) == ("digits", 30), name
    assert configs["ns3l"] == ["train_supervised.py", "--ns3l", *configs["supervised"][1:]]
    import train_freematch  # FreeMatch's rows report the median of the last 20, FixMatch's rule, not USB's best

    assert train_freematch.parse_args(configs["freematch"][1:]).reported == "median_test_error"


def test_run_executes_skips_finished_and_resumes(tmp_path, capsys):
    fake = tmp_path / "fake_train.py"  # a stand-in training script honouring the STYLE.md contract
    fake.write_text(
        "import argparse, json, os\n"
        "p = argparse.ArgumentParser(); p.add_argument('--seed', type=int); p.add_argument('--runs-dir');\n"
        "p.add_argument('--run-name'); p.add_argument('--resume'); p.add_argument('--value', type=float)\n"
        "a = p.parse_args(); d = a.resume or os.path.join(a.runs_dir, a.run_name); os.makedirs(d, exist_ok=True)\n"
        "json.dump({'steps': 5, 'steps_per_second': 1.0, 'test_error_at_best_valid': (a.value or 0) + (a.seed or 0),\n"
        "           'resumed': bool(a.resume)}, open(os.path.join(d, 'summary.json'), 'w'))\n"
    )
    runs = str(tmp_path / "runs")
    os.makedirs(os.path.join(runs, "b__seed2"))
    open(os.path.join(runs, "b__seed2", "checkpoint.pt"), "w").close()  # died after a checkpoint -> --resume
    argv = [
        "--config",
        "a",
        f"python {fake} --value 10",
        "--config",
        "b",
        f"python {fake} --value 20",
        "--seeds",
        "1",
        "2",
        "--runs-dir",
        runs,
        "--workers",
        "2",
    ]
    assert run.main(argv) == 0
    with open(os.path.join(runs, "b__seed2", "summary.json")) as f:
        assert json.load(f)["resumed"] is True
    assert os.path.exists(os.path.join(runs, "a__seed1.log"))
    groups = report.collect(runs)
    assert [r["test_error_at_best_valid"] for r in groups["a"]["runs"]] == [11.0, 12.0]
    capsys.readouterr()
    assert run.main(argv + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("# done: ") == 4  # a second call runs nothing


def test_run_resumes_a_real_script_with_its_whole_command_and_refuses_another_budget(tmp_path, capsys, monkeypatch):
    from conftest import TINY

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    runs = str(tmp_path / "runs")
    tiny = [a for a in TINY if a not in ("--total-steps", "20")]
    # An interrupted run: 10 of 20 steps done, checkpoint written, no summary.json yet.
    first = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train_supervised.py"),
            *tiny,
            "--total-steps",
            "10",
            "--seed",
            "1",
            "--runs-dir",
            runs,
            "--run-name",
            "sup__seed1",
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    os.remove(os.path.join(runs, "sup__seed1", "summary.json"))
    argv = [
        "--config",
        "sup",
        "python train_supervised.py " + " ".join(tiny + ["--total-steps", "20"]),
        "--seeds",
        "1",
        "--runs-dir",
        runs,
    ]
    assert run.main(argv) == 0
    log = open(os.path.join(runs, "sup__seed1.log")).read()
    assert "--run-name sup__seed1 --resume" in log and "at step 10" in log
    with open(os.path.join(runs, "sup__seed1", "summary.json")) as f:
        assert json.load(f)["steps"] == 20
    capsys.readouterr()
    with pytest.raises(SystemExit, match="finished 20 steps, this sweep asks for 30"):
        run.main(argv[:2] + [argv[2].replace("--total-steps 20", "--total-steps 30")] + argv[3:])
    # Every training script resumes (train_fmnist_ablation.py too); a command whose script has no --resume (a user's
    # own) starts an interrupted run again instead of passing --resume.
    own = os.path.join(runs, "own.py")
    open(own, "w").write("print('no resume here')\n")
    for name, script, state in (("fm", "train_fmnist_ablation.py", "resume"), ("own", own, "new")):
        os.makedirs(os.path.join(runs, f"{name}__seed1"))
        open(os.path.join(runs, f"{name}__seed1", "checkpoint.pt"), "w").close()
        (job,) = run.plan([run.Config(name, [script, "--epochs", "1"])], [1], runs)
        assert job[3] == state and ("--resume" in job[2]) == (state == "resume")


def test_run_placeholders_name_this_seed_and_runs_dir():
    config = run.Config("warm", ["train_imagenet_mel.py", "--init-from", "{runs_dir}/ce+mel__seed{seed}"])
    argv = run.build_command(config, 3, "runs/x")
    assert argv[argv.index("--init-from") + 1] == "runs/x/ce+mel__seed3"
    assert argv[-6:] == ["--seed", "3", "--runs-dir", "runs/x", "--run-name", "warm__seed3"]


def test_run_rejects_bad_names():
    with pytest.raises(SystemExit):
        run.parse_args(["--config", "a__b", "python x.py"])
    with pytest.raises(SystemExit):
        run.parse_args([])


# -------------------------------------------------------------------------------------------------------- speed.py
def test_speed_ratio_arithmetic():
    assert speed.overhead(10.0, 10.0) == 0.0
    assert speed.overhead(10.0, 9.7) == pytest.approx(0.030928, rel=1e-4)  # 3 % fewer steps/s = 3.09 % more time
    assert speed.overhead(4.0, 5.0) == pytest.approx(-0.2)
    assert speed.speedup(5.0, 2.0) == 2.5
    rounds = [{"A": 10.0, "B": 9.0}, {"A": 8.0, "B": 8.0}, {"A": 6.0, "B": None}]
    assert speed.paired(rounds, "A", "B", speed.overhead) == pytest.approx([1 / 9, 0.0])
    assert speed.summarise([0.3, 0.1, 0.2]) == (0.2, 0.1, 0.3)
    assert speed.summarise([]) == (None, None, None)


def test_speed_report_verdicts():
    results = {
        "pseudo-label": [{"PL": 10.0, "PL+NS3L": 9.9}, {"PL": 9.0, "PL+NS3L": 8.9}],
        "vat": [{"VAT": 1.0, "VAT+NS3L": 0.9, "NS3L": 2.5}],
    }
    text = speed.format_report(results, {"dataset": "x", "batch_ms": 1.0, "step_ms": 100.0, "share": 0.01})
    assert "NS3L overhead on Pseudo-Label: +1.1 %" in text and "met" in text.splitlines()[0]
    assert "NS3L overhead on VAT: +11.1 %" in text and "MISSED" in text.splitlines()[1]
    assert "NS3L alone vs VAT (speed-up): 2.50x" in text
    assert "= 1.0 % (target < 5 %: met)" in text


def test_speed_groups_use_identical_data_and_model(tmp_path):
    npz = speed.make_npz(str(tmp_path / "d.npz"), num_train=40, num_test=10)
    import numpy as np

    with np.load(npz) as f:
        assert f["x_train"].shape == (40, 3, 32, 32) and f["x_train"].dtype == np.uint8
    groups = speed.groups(npz, 7, 10, 1)
    for name in ("pseudo-label", "vat", "pi", "mixmatch"):
        argvs = list(groups[name].values())
        tail = lambda a: [x for x in a if x not in ("--ns3l", "--pseudo-label")][1:]  # noqa: E731
        if name != "vat":  # on/off twins differ only by --ns3l
            assert tail(argvs[0]) == tail(argvs[1]) and "--ns3l" in argvs[1] and "--ns3l" not in argvs[0]
        for argv in argvs:
            assert argv[argv.index("--dataset") + 1] == npz and argv[argv.index("--total-steps") + 1] == "7"
    assert groups["vat"]["NS3L"][0] == "train_supervised.py" and "--ns3l" in groups["vat"]["NS3L"]


# ------------------------------------------------------------------------------------------------- paper scripts
PAPER_SCRIPTS = [
    "table1_protocol_a",
    "table2_vat_combinations",
    "table3_mixmatch_cifar10",
    "table4_mixmatch_svhn",
    "table5_mixmatch_stl10",
    "figure3_sensitivity",
    "xc_adversarial_negatives",
    "imagenet_mel_note",
    "fixmatch_cifar10",
    "freematch_cifar10",
]


@pytest.mark.parametrize("name", PAPER_SCRIPTS)
def test_paper_scripts_have_commands_seeds_and_existing_scripts(name):
    module = importlib.import_module(name)
    assert module.SEEDS and module.SETTINGS
    for configs in module.SETTINGS.values():
        assert len({c.name for c in configs}) == len(configs)
        for c in configs:
            assert os.path.exists(os.path.join(ROOT, c.argv[0])), c.argv
            assert "__" not in c.name and " " not in c.name


def test_paper_numbers_match_the_paper():
    t1 = importlib.import_module("table1_protocol_a").SETTINGS
    paper = {s: {c.name: c.paper for c in cs} for s, cs in t1.items()}
    assert paper["cifar10"]["ns3l"] == (16.03, 0.05) and paper["svhn"]["vat+ns3l"] == (5.51, 0.14)
    assert paper["cifar100"]["supervised"] == (48.26, 0.25)
    ns3l = next(c for c in t1["cifar10"] if c.name == "ns3l")
    assert ns3l.argv == ["train_supervised.py", "--dataset", "cifar10", "--num-labeled", "4000", "--ns3l"]
    t3 = importlib.import_module("table3_mixmatch_cifar10").SETTINGS
    assert {c.name: c.paper for c in t3["cifar10-250"]} == {"mixmatch": (14.49, 1.60), "mixmatch+ns3l": (12.48, 1.21)}
    f3 = importlib.import_module("figure3_sensitivity").SETTINGS
    assert all(len(v) == 12 for v in f3.values())  # 4 thresholds x 3 weights
    assert [c.paper for c in f3["ns3l-cifar10"] if c.paper] == [(16.03, 0.05)]
    fixmatch = importlib.import_module("fixmatch_cifar10").SETTINGS  # FixMatch paper, Table 2, FixMatch (RA)
    assert {s: [c.paper for c in cs] for s, cs in fixmatch.items()} == {
        "cifar10-40": [(13.81, 3.37), None],
        "cifar10-250": [(5.07, 0.65), None],
        "cifar10-4000": [(4.26, 0.05), None],
    }
    freematch = importlib.import_module("freematch_cifar10").SETTINGS  # USB results/classic_cv.csv:18
    assert {s: [c.paper for c in cs] for s, cs in freematch.items()} == {
        "cifar10-40": [(4.97, 0.09), None],
        "cifar10-250": [(4.85, 0.10), None],
        "cifar10-4000": [(4.14, 0.19), None],
    }
    import train_freematch

    for setting, configs in freematch.items():
        for c in configs:
            a = train_freematch.parse_args(c.argv[1:])
            assert (a.total_steps, a.eval_every, a.reported, a.strong_augment) == (
                1 << 20,
                5120,
                "best_test_error",
                "usb",
            )
            assert a.ns3l == (c.name == "freematch+ns3l") and str(a.num_labeled) == setting.split("-")[1]


def test_paper_recipes_resolve_to_the_corrected_protocol():
    """Each paper command, parsed by its own script, has the settings behind the paper's numbers."""
    import train_mixmatch
    import train_pi
    import train_supervised
    import train_vat

    parsers = {
        "train_supervised.py": train_supervised,
        "train_vat.py": train_vat,
        "train_pi.py": train_pi,
        "train_mixmatch.py": train_mixmatch,
    }
    resolved = {}
    for table in ("table1_protocol_a", "table2_vat_combinations", "table3_mixmatch_cifar10", "table4_mixmatch_svhn"):
        for setting, configs in importlib.import_module(table).SETTINGS.items():
            for c in configs:
                args = parsers[c.argv[0]].parse_args(c.argv[1:])
                assert args.include_labeled is False, (table, c.name)  # disjoint labeled / unlabeled sets
                resolved[table, setting, c.name] = args
    assert resolved["table1_protocol_a", "cifar10", "supervised"].batch_size == 100
    assert resolved["table1_protocol_a", "cifar10", "ns3l"].batch_size == 50
    assert resolved["table1_protocol_a", "svhn", "vat"].vat_kl == "oliver"
    for setting in ("cifar10-250", "cifar10-4000"):
        assert resolved["table3_mixmatch_cifar10", setting, "mixmatch"].total_steps == 307_200
    svhn = resolved["table4_mixmatch_svhn", "svhn-1000", "mixmatch+ns3l"]
    assert (svhn.total_steps, svhn.num_valid, svhn.ns3l_weight) == (307_200, 7325, 2.0)
    import train_fixmatch

    for setting, configs in importlib.import_module("fixmatch_cifar10").SETTINGS.items():
        for c in configs:
            a = train_fixmatch.parse_args(c.argv[1:])
            assert (a.total_steps, a.batch_size, a.uratio, a.confidence, a.lr, a.weight_decay, a.ema_decay) == (
                1 << 20,
                64,
                7,
                0.95,
                0.03,
                5e-4,
                0.999,
            )
            assert (a.depth, a.width, a.num_valid, a.exclude_labeled, a.median_of) == (28, 2, 1, False, 20)
            assert a.ns3l == (c.name == "fixmatch+ns3l") and str(a.num_labeled) == setting.split("-")[1]


def test_paper_recipes_train_in_exact_fp32_with_fp32():
    """--fp32 gives the WRN commands --no-bf16 (the original code's arithmetic), before the user's extra flags so that
    those still win; without it the scripts' default (bf16 autocast on CUDA) stays."""
    import _paper

    import train_fixmatch

    fixmatch = importlib.import_module("fixmatch_cifar10").SETTINGS["cifar10-40"][1]
    exact = _paper.with_precision(fixmatch, ["--total-steps", "8"], fp32=True)
    assert exact.argv[-3:] == ["--no-bf16", "--total-steps", "8"] and exact.paper == fixmatch.paper
    assert train_fixmatch.parse_args(exact.argv[1:]).bf16 is False
    assert train_fixmatch.parse_args(_paper.with_precision(fixmatch).argv[1:]).bf16 is None  # CUDA: bf16
    for table in ("table1_protocol_a", "table2_vat_combinations", "table3_mixmatch_cifar10", "fixmatch_cifar10"):
        for configs in importlib.import_module(table).SETTINGS.values():
            assert all("--no-bf16" in _paper.with_precision(c, fp32=True).argv for c in configs), table
    xc = next(iter(importlib.import_module("xc_adversarial_negatives").SETTINGS.values()))[0]
    assert _paper.with_precision(xc, fp32=True).argv == xc.argv  # train_xc.py has no bf16 flag
    script = os.path.join(ROOT, "benchmark", "paper", "fixmatch_cifar10.py")
    for flags, count in (([], 0), (["--fp32"], 6)):
        result = subprocess.run([sys.executable, script, "--seeds", "1", *flags], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.count("--no-bf16") == count, result.stderr


def test_paper_script_prints_commands_without_running(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmark", "paper", "table4_mixmatch_svhn.py"),
            "--runs-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("python train_mixmatch.py")]
    assert len(commands) == 20 and "| svhn-250 | mixmatch+ns3l | 3.38 ± 0.08 |" in result.stdout
    assert not os.path.exists(tmp_path / "r")


def test_speed_inprocess_report_uses_per_iteration_ratios():
    times = {
        "PL": [1.0, 2.0],
        "PL+NS3L": [1.01, 2.02],
        "VAT": [3.0, 6.0],
        "VAT+NS3L": [3.0, 6.0],
        "Pi": [2.0, 2.0],
        "Pi+NS3L": [2.1, 2.1],
        "NS3L": [1.0, 2.0],
        "NS3L-loss-only": [0.001, 0.001],
    }
    medians = {k: sorted(v)[0] for k, v in times.items()}
    text = speed.format_inprocess(medians, times)
    assert "NS3L overhead on PL: +1.0 %" in text and "NS3L overhead on VAT: +0.0 %" in text
    assert "NS3L overhead on Pi: +5.0 %" in text and "NS3L alone vs VAT: 3.00x" in text
    assert "1.00 ms = 0.10 % of a Pseudo-Label step" in text
    assert "MixMatch" not in text  # not measured in these times: no line
    times.update({"MixMatch": [4.0, 4.0], "MixMatch+NS3L": [4.08, 4.08]})
    medians.update({"MixMatch": 4.0, "MixMatch+NS3L": 4.08})
    assert "NS3L overhead on MixMatch: +2.0 %" in speed.format_inprocess(medians, times)


def test_speed_inprocess_measures_every_variant():
    medians, times = speed.measure_inprocess(repeats=1, depth=10, width=1, threads=1, batch_size=4)
    assert {
        "PL",
        "PL+NS3L",
        "NS3L",
        "VAT",
        "VAT+NS3L",
        "Pi",
        "Pi+NS3L",
        "MixMatch",
        "MixMatch+NS3L",
        "NS3L-loss-only",
    } <= set(medians)
    assert all(value > 0 for value in medians.values())


def test_run_only_keeps_the_given_order(tmp_path, capsys):
    assert (
        run.main(
            [
                "--suite",
                "fmnist_cpu",
                "--only",
                "pi",
                "supervised",
                "--seeds",
                "4",
                "--dry-run",
                "--runs-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("--run-name ")[1] for line in lines] == ["pi__seed4", "supervised__seed4"]


# --------------------------------------------------------------------------------------- speed.py compile group
def test_speed_compile_group_measures_every_combination_with_the_scripts_losses():
    """The compiled / eager x channels_last / contiguous alternation runs the scripts' own steps (here Pseudo-Label's;
    every pass kind compiles correctly: tests/test_compile.py) and reports images/s and ratios to eager contiguous."""
    results, ratios = speed.measure_compile(1, 10, 1, 1, methods=("PL",), batch_sizes={"PL": 4})
    for method in ("PL",):
        assert set(results[method]) == {
            "contiguous/eager",
            "contiguous/compiled",
            "channels_last/eager",
            "channels_last/compiled",
        }
        assert ratios[method]["contiguous/eager"] == 1.0
        for r in results[method].values():
            assert r["median_s"] > 0 and r["images_per_second"] == pytest.approx(
                speed.IMAGES_PER_STEP[method] / r["median_s"]
            )
    text = speed.format_compile(results, ratios, 10, 1)
    assert "PL step, WRN-10-1, 100 images per step" in text and "channels_last/compiled" in text


def test_speed_groups_pass_compile_to_the_wrn_scripts(tmp_path):
    groups = speed.groups(str(tmp_path / "d.npz"), 5, 10, 1, compiled=True)
    for group in ("pseudo-label", "vat", "pi", "mixmatch"):
        assert all("--compile" in argv for argv in groups[group].values())


# ------------------------------------------------------------------------------------------------- gpu_check.py
import gpu_check  # noqa: E402


def test_gpu_check_runs_each_kind_of_row_on_the_cpu_and_prints_its_table(tmp_path, capsys):
    """The whole check with --device cpu: each kind of row passes (finite errors, a checkpoint, and for a WRN script
    the bit-exact resume under --torch-deterministic), one table. FixMatch stands for the WRN scripts: the others
    take the same path (wrn_rows) with their own flags, which
    test_gpu_check_knows_every_wrn_script_and_its_images_per_step parses."""
    code = gpu_check.main(
        [
            "--device",
            "cpu",
            "--steps",
            "2",
            "--resume-steps",
            "2",
            "--depth",
            "10",
            "--width",
            "1",
            "--no-compile",
            "--threads",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "r.json"),
            "--scripts",
            "train_fixmatch.py",
            "train_fmnist_ablation.py",
            "train_xc.py",
            "train_imagenet_mel.py",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["script"], r["variant"]) for r in rows] == [
        ("train_fixmatch.py", "eager"),
        ("train_fixmatch.py", "resume 1+1"),
        ("train_fmnist_ablation.py", "default"),
        ("train_xc.py", "default"),
        ("train_imagenet_mel.py", "default"),
    ]
    assert all(not r["problems"] for r in rows)
    assert all(r["steps_per_second"] > 0 and r["images_per_second"] > 0 for r in rows if "resume" not in r["variant"])
    fixmatch = next(r for r in rows if r["script"] == "train_fixmatch.py")
    assert fixmatch["images_per_second"] == pytest.approx(fixmatch["steps_per_second"] * 64 * 15)
    assert (
        "| script | data | variant | steps/s | images/s | compiled / eager | peak GPU memory | compile time | check |"
        in out
    )
    assert "5 of 5 rows pass" in out


def test_gpu_check_reports_a_failing_run_and_a_resume_that_differs(tmp_path):
    problems = gpu_check.check_run({"exit": 1}, "Traceback\nValueError: boom\n", str(tmp_path), ["final_test_error"])
    assert problems == ["exit 1: ValueError: boom"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"final_test_error": float("nan")}))
    problems = gpu_check.check_run({"exit": 0}, "step 2 loss nan", str(run), ["final_test_error"])
    assert len(problems) == 3  # non-finite error, nan loss, no checkpoint
    import torch

    for name, value in (("a", 1.0), ("b", 1.0 + 1e-7)):
        (tmp_path / name).mkdir()
        torch.save({"model": {"w": torch.tensor([value])}}, tmp_path / name / "checkpoint.pt")
    assert "model.w differs" in gpu_check.same_weights(str(tmp_path / "a"), str(tmp_path / "b"))
    assert gpu_check.same_weights(str(tmp_path / "a"), str(tmp_path / "a")) is None
    table = gpu_check.format_table(
        [
            {
                "script": "s.py",
                "data": "d",
                "variant": "compiled",
                "steps_per_second": 2.0,
                "images_per_second": 400.0,
                "peak_gib": 1.5,
                "compile_seconds": 30.0,
                "problems": [],
            },
            {
                "script": "s.py",
                "data": "d",
                "variant": "eager",
                "steps_per_second": 1.0,
                "images_per_second": 200.0,
                "peak_gib": None,
                "compile_seconds": None,
                "problems": ["exit 1: x"],
            },
        ]
    )
    assert "| s.py | d | compiled | 2.00 | 400 | 2.00x | 1.50 GiB | 30.0 s | pass |" in table
    assert "FAIL: exit 1: x" in table


def test_gpu_check_refuses_cuda_without_a_gpu_and_a_missing_fmnist(tmp_path, capsys):
    if not __import__("torch").cuda.is_available():
        assert gpu_check.main(["--workdir", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--fmnist", str(tmp_path / "none"), "--workdir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_profile_prints_top_operators_and_syncs(capsys):
    import profile_steps as profile_tool

    assert (
        profile_tool.main(
            [
                "train_pi.py",
                "--steps",
                "2",
                "--depth",
                "10",
                "--width",
                "1",
                "--rows",
                "5",
                "--threads",
                "1",
                "--",
                "--no-cuda",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out
    assert "host-device synchronisations over 2 steps" in out


def test_gpu_check_knows_every_wrn_script_and_its_images_per_step():
    """Each WRN script's row uses flags the script accepts and counts its images per step from its own arguments
    (Protocol A 50 + 50 by default with an unlabeled term; MixMatch 64 x (1 + K); FixMatch B x (1 + 2 mu))."""
    import importlib

    expected = {
        "train_supervised.py": 100,
        "train_vat.py": 100,
        "train_pi.py": 100,
        "train_mixmatch.py": 192,
        "train_fixmatch.py": 480,  # the synthetic row: 32 labeled + 2 views x 7 x 32 unlabeled
        "train_freematch.py": 480,
    }
    assert set(gpu_check.WRN_SCRIPTS) == set(expected)
    for script, (flags, images_per_step) in gpu_check.WRN_SCRIPTS.items():
        module = importlib.import_module(script[:-3])
        args = module.parse_args([*flags, "--dataset", "synthetic", "--compile", "--torch-deterministic"])
        assert images_per_step(vars(args)) == expected[script], script


def test_gpu_check_reads_an_idx_folder_as_given_and_rejects_unknown_scripts(tmp_path, capsys):
    """--fmnist DIR: the four idx files of that folder become the .npz every script reads (not whatever copy a
    loader would find elsewhere); a folder without them is one line and exit 2; a script name it does not know is an
    argparse error, so a typo cannot give an empty, passing table."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(12, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(5, dtype=np.uint8),
    }
    for name, array in arrays.items():
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(folder / (name + ".gz"), "wb") as f:
            f.write(header + array.tobytes())
    npz = np.load(gpu_check.idx_to_npz(str(folder), str(tmp_path)))
    assert npz["x_train"].reshape(12, 28, 28).tolist() == arrays["train-images-idx3-ubyte"].tolist()
    assert npz["y_test"].tolist() == list(range(5))
    assert gpu_check.main(["--device", "cpu", "--fmnist", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--scripts", "train_vat"])


def test_report_warns_when_runs_come_from_different_code_or_libraries(tmp_path, capsys):
    runs = str(tmp_path / "runs")

    def leg(commit, torch_version="2.14.1", dirty=False):
        return {"commit": commit, "dirty": dirty, "python": "3.11.7", "torch": torch_version, "torchvision": "0.29.1"}

    for name, legs in (
        ("vat__seed1", [leg("a" * 40)]),
        ("vat__seed2", [leg("a" * 40), leg("b" * 40)]),  # resumed under another commit
        ("pi__seed1", [leg("a" * 40, torch_version="2.13.0")]),
        ("pi__seed2", [leg("a" * 40, dirty=True)]),
    ):
        write_summary(runs, name, test_error_at_best_valid=10.0)
        with open(os.path.join(runs, name, "run_info.json"), "w") as f:
            json.dump({"legs": legs}, f)
    write_summary(runs, "old__seed1", test_error_at_best_valid=10.0)  # written before run_info.json existed
    write_summary(runs, "bad__seed1", test_error_at_best_valid=10.0)
    with open(os.path.join(runs, "bad__seed1", "run_info.json"), "w") as f:
        f.write("{not json")  # unreadable: counted as unknown, no traceback
    assert report.main([runs]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "report.py: warning: the runs of vat come from 2 commits: aaaaaaaaaa; bbbbbbbbbb" in err
    assert not any("the runs of pi come from 2 commits" in line for line in err)  # clean and dirty: one commit
    assert any("the runs of pi come from 2 library versions" in line and "torch 2.13.0" in line for line in err)
    assert "report.py: warning: this table's runs come from 2 commits: aaaaaaaaaa; bbbbbbbbbb" in err
    assert "report.py: warning: some runs ran with uncommitted changes to commit aaaaaaaaaa" in err
    assert "report.py: note: 2 runs have no readable run_info.json (older runs), e.g. bad__seed1" in err
    one = str(tmp_path / "one")  # runs of one commit and one set of libraries: no warning
    for seed in (1, 2):
        write_summary(one, f"vat__seed{seed}", test_error_at_best_valid=10.0)
        with open(os.path.join(one, f"vat__seed{seed}", "run_info.json"), "w") as f:
            json.dump({"legs": [leg("c" * 40)]}, f)
    assert report.main([one]) == 0 and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_reproduces_a_runs_final_test_error_and_refuses_other_runs(tmp_path, capsys):
    """benchmark/evaluate.py rebuilds the model from a run's checkpoint (the EMA weights for FixMatch) and prints the
    test error of the checkpoint's weights: equal to summary.json's final_test_error, with the per-class errors."""
    import evaluate
    import torch
    from conftest import TINY, run_script

    fixmatch = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--batch-size", "4", "--uratio", "2"]
    fixmatch += ["--total-steps", "6", "--eval-every", "3", "--no-cuda", "--runs-dir", tmp_path]
    runs = [("train_supervised.py", [*TINY, "--runs-dir", tmp_path]), ("train_fixmatch.py", fixmatch)]
    for script, argv in [*runs, ("train_freematch.py", fixmatch)]:
        name = script[:-3]
        result = run_script(script, *argv, "--run-name", name)
        assert result.returncode == 0, result.stderr
        assert evaluate.main([str(tmp_path / name), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert report["weights"] == ("model" if name == "train_supervised" else "ema_model")
        assert report["test_error"] == pytest.approx(summary["final_test_error"], abs=1e-9)
        assert report["test_error"] == report["summary_final_test_error"]
        assert sorted(report["per_class_error"]) == [str(c) for c in range(10)]  # synthetic: 10 classes
        per_class = list(report["per_class_error"].values())
        assert min(per_class) <= report["test_error"] <= max(per_class)
    # an interrupted run (a checkpoint, no summary) is evaluated too; other runs are one line and exit 1
    (tmp_path / "train_supervised" / "summary.json").unlink()
    assert evaluate.main([str(tmp_path / "train_supervised")]) == 0
    assert "test error" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1 and "no checkpoint.pt" in capsys.readouterr().err
    # an unreadable summary.json is no comparison; a checkpoint of an older version without a setting is one line
    (tmp_path / "train_fixmatch" / "summary.json").write_text("{not json")
    assert evaluate.main([str(tmp_path / "train_fixmatch"), "--json"]) == 0
    assert "summary_final_test_error" not in json.loads(capsys.readouterr().out)
    checkpoint = torch.load(tmp_path / "train_fixmatch" / "checkpoint.pt", weights_only=True)
    del checkpoint["args"]["pad_to"]
    torch.save(checkpoint, tmp_path / "train_fixmatch" / "checkpoint.pt")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tmp_path / "train_fixmatch")])
    assert exit_info.value.code == 1 and "the checkpoint lacks what this version needs" in capsys.readouterr().err
