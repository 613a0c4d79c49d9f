"""Tests for bookkeeping.py's flag types and defaults tables, the BatchNorm-momentum warning and the writing mechanics
every script shares (interval means, scalars, the progress line, summary.json), and for each WRN script's table of
defaults per data set (the value a flag gets, the table in --help, the Quickstart's short digits run)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bookkeeping  # noqa: E402
import train_fixmatch  # noqa: E402
import train_mixmatch  # noqa: E402
import train_pi  # noqa: E402
import train_supervised  # noqa: E402
import train_vat  # noqa: E402

WRN_SCRIPTS = (train_supervised, train_vat, train_pi, train_mixmatch, train_fixmatch)


@pytest.mark.parametrize(
    "kind, good, bad",
    [
        (bookkeeping.positive_int, {"1": 1, "7": 7}, ["0", "-3", "1.5", "x"]),
        (bookkeeping.nonnegative_int, {"0": 0}, ["-1"]),
        (bookkeeping.positive_float, {"1e-3": 1e-3}, ["0", "-1", "nan", "x"]),
        (bookkeeping.nonnegative_float, {"0": 0.0, "2.5": 2.5}, ["-0.1", "nan"]),
        (bookkeeping.open_unit, {"0.5": 0.5}, ["0", "1", "1.5", "nan"]),
        (bookkeeping.unit_interval, {"0": 0.0, "1": 1.0}, ["1.01"]),
        (bookkeeping.momentum, {"1": 1.0, "0.001": 0.001}, ["0"]),
        (bookkeeping.ema_decay, {"0": 0.0, "0.999": 0.999}, ["1"]),
        (bookkeeping.wrn_depth, {"10": 10, "28": 28}, ["4", "12", "27"]),
    ],
)
def test_flag_types_accept_and_reject(kind, good, bad):
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(Exception):
            kind(text)


@pytest.mark.parametrize("module", WRN_SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr must be > 0, got -1"),
        (["--depth", "12"], "--depth must be 6n + 4 >= 10, got 12"),
        (["--threshold", "1.5"], "--threshold must be in (0, 1), got 1.5"),
        (["--bn-momentum", "0"], "--bn-momentum must be in (0, 1], got 0"),
        (["--total-steps", "0"], "--total-steps must be >= 1, got 0"),
        (["--eval-every", "nan"], "--eval-every must be a whole number >= 1, got 'nan'"),
        (["--lr", "inf"], "--lr must be finite and > 0, got inf"),
    ],
)
def test_bad_flag_values_are_one_line(module, flags, message, capsys):
    with pytest.raises(SystemExit) as error:
        module.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert error.value.code == 2 and err == [f"{os.path.basename(sys.argv[0])}: error: {message}"]


def test_defaults_come_from_the_data_sets_row_and_a_given_flag_wins():
    paper, cpu = train_supervised.parse_args(["--ns3l"]), train_supervised.parse_args(["--dataset", "digits", "--ns3l"])
    assert (paper.total_steps, paper.depth, paper.bn_momentum, paper.num_labeled) == (200_000, 28, 0.001, 4000)
    assert (
        cpu.total_steps,
        cpu.lr_decay_step,
        cpu.rampup_steps,
        cpu.eval_every,
        cpu.depth,
        cpu.bn_momentum,
        cpu.num_labeled,
        cpu.num_valid,
    ) == (2000, 1500, 500, 500, 10, 0.01, 100, 200)
    assert (cpu.lr, cpu.batch_size, cpu.threshold) == (6e-4, 50, 0.04)  # the method's values, on every data set
    given = train_supervised.parse_args(["--dataset", "digits", "--total-steps", "50", "--depth", "16"])
    assert (given.total_steps, given.depth, given.eval_every) == (50, 16, 500)
    assert train_vat.parse_args(["--dataset", "cifar10"]).vat_eps == 6.0
    assert train_vat.parse_args(["--dataset", "svhn"]).vat_eps == 1.0
    mm = train_mixmatch.parse_args(["--dataset", "digits"])
    assert (mm.total_steps, mm.depth, mm.ema_decay, mm.eval_every, mm.rampup_steps) == (1000, 10, 0.99, 10, 250)
    for module in WRN_SCRIPTS:  # every data set has a row, and every row names only real flags
        flags = vars(module.parse_args([]))
        assert set(module.DEFAULTS) == {
            "cifar10",
            "cifar100",
            "svhn",
            "stl10",
            "fashion_mnist",
            "mnist",
            "npz",
            "digits",
            "synthetic",
        }
        assert all(name in flags for row in module.DEFAULTS.values() for name in row), module.__name__


@pytest.mark.parametrize("module", WRN_SCRIPTS, ids=lambda m: m.__name__)
def test_help_shows_the_defaults_table_and_its_sources(module, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    out = capsys.readouterr().out
    table = out[out.index("defaults per --dataset") :]
    digits = next(line for line in table.splitlines() if line.split() and line.split()[0] == "digits")
    assert str(module.DEFAULTS["digits"]["total_steps"]) in digits.split()
    assert "where they come from" in table and "this project's choice" in table
    assert "(default: None)" not in out  # a table flag says where its default comes from instead


def test_bn_momentum_warning(capsys):
    bookkeeping.warn_bn_momentum(0.001, 200)  # the case: 92 % error at 0.001, 34 % at 0.1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("warning: --bn-momentum 0.001") and out[0].endswith("--bn-momentum 0.1")
    bookkeeping.warn_bn_momentum(0.001, 2000)
    assert capsys.readouterr().out.strip().endswith("--bn-momentum 0.01")
    bookkeeping.warn_bn_momentum(0.1, 60)  # shorter than 100 steps: more than 0.1 ...
    assert capsys.readouterr().out.strip().endswith("--bn-momentum 0.3")
    # ... and the suggestion itself is quiet, as are the paper, digits' row, a 100-step run at 0.1 and a 5-step run
    # at momentum 1 (the last batch's statistics: nothing shorter exists)
    for momentum, steps in ((0.3, 60), (0.001, 200_000), (0.01, 2000), (0.1, 100), (1.0, 5)):
        bookkeeping.warn_bn_momentum(momentum, steps)
    assert capsys.readouterr().out == ""


def test_a_script_warns_about_a_short_run_with_the_papers_momentum(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train_supervised.py"),
            "--dataset",
            "synthetic",
            "--depth",
            "10",
            "--width",
            "1",
            "--bn-momentum",
            "0.001",
            "--total-steps",
            "2",
            "--no-cuda",
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "short",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--total-steps 2" in warnings[0] and warnings[0].endswith("--bn-momentum 1")


def test_interval_means_scalars_progress_line_and_summary(tmp_path):
    sums = {"losses/total": torch.tensor(6.0), "charts/x": torch.tensor(3.0)}
    assert bookkeeping.interval_means(sums, 3) == {"losses/total": 2.0, "charts/x": 1.0}
    assert bookkeeping.interval_means({}, 3) == {}

    class Writer:
        def __init__(self):
            self.points, self.hparams, self.closed = [], None, False

        def add_scalar(self, tag, value, step, walltime=None):
            self.points.append((tag, value, step))

        def add_hparams(self, hparams, metrics, run_name=None):
            self.hparams = metrics

        def close(self):
            self.closed = True

    writer = Writer()
    bookkeeping.write_scalars(writer, 5, {"charts/SPS": float("nan"), "eval/test_error": 3.5})
    assert writer.points == [("eval/test_error", 3.5, 5)]  # nan (an interval of only the compiling step) skipped
    line = bookkeeping.progress_line(50, 150, 2.0, loss=0.25, lr=3e-3)
    assert line == "step 50/150 loss 0.25 lr 0.003 SPS 2.00 ETA 0.8 min"
    assert "ETA nan min" in bookkeeping.progress_line(1, 10, float("nan"), loss=1.0)
    args = bookkeeping.argparse.Namespace(seed=3, dataset="digits")
    summary = bookkeeping.write_summary(
        writer,
        str(tmp_path),
        {"steps": 9, "final_test_error": 1.5, "best_valid_error": None},
        args,
        reported=("final_test_error", "best_valid_error"),
    )
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert (
        on_disk
        == summary
        == {
            "steps": 9,
            "final_test_error": 1.5,
            "best_valid_error": None,
            "reported_metric": "final_test_error",
            "cpu_threads": bookkeeping.torch.get_num_threads(),  # what a CPU number depends on
            "args": {"seed": 3, "dataset": "digits"},
        }
    )
    assert writer.hparams == {"hparam/final_test_error": 1.5} and writer.closed
    assert not math.isnan(on_disk["final_test_error"])


# ---------------------------------------------------------------------------------------------------- provenance
def test_git_state_names_the_commit_and_uncommitted_changes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert bookkeeping.git_state(str(repo)) == {"commit": head, "dirty": False}
    (repo / "new.txt").write_text("untracked files are not code changes\n")
    assert bookkeeping.git_state(str(repo))["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert bookkeeping.git_state(str(repo)) == {"commit": head, "dirty": True}
    assert bookkeeping.git_state(str(tmp_path / "nowhere")) == {"commit": None, "dirty": None}


def test_run_info_gets_a_record_per_leg_and_a_discarded_leg_leaves_it_as_it_was(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setattr(sys, "argv", ["train_x.py", "--seed", "3", "--run-name", "a b"])
    assert bookkeeping.record_leg(str(run_dir), 0) == {}
    first = json.loads((run_dir / "run_info.json").read_text())
    leg = first["legs"][0]
    assert leg["start_step"] == 0 and leg["command"].endswith("train_x.py --seed 3 --run-name 'a b'")
    assert leg["torch"] == torch.__version__ and leg["cuda"] == torch.version.cuda and leg["host"]
    assert leg["start_time"].endswith("+00:00") and leg["cpu_threads"] == torch.get_num_threads()
    assert {"commit", "dirty", "python", "torchvision", "numpy", "cudnn", "device"} <= set(leg)
    assert leg["commit"] == bookkeeping.git_state()["commit"]  # this checkout's HEAD (None outside git)
    previous = bookkeeping.record_leg(str(run_dir), 40)  # a resumed leg appends
    assert previous == first
    assert [leg["start_step"] for leg in json.loads((run_dir / "run_info.json").read_text())["legs"]] == [0, 40]

    class Writer:
        def close(self):
            pass

    # the resumed leg fails before its next checkpoint: its record goes with its event file
    monkeypatch.setitem(bookkeeping._resumed, "run_dir", str(run_dir))
    monkeypatch.setitem(bookkeeping._resumed, "writer", Writer())
    monkeypatch.setitem(bookkeeping._resumed, "before", set(os.listdir(run_dir)))
    monkeypatch.setitem(bookkeeping._resumed, "run_info", previous)
    bookkeeping.discard_resumed_leg()
    assert json.loads((run_dir / "run_info.json").read_text()) == first
