"""Bad input to a run's mechanics, over every training script: one line on stderr, no traceback, exit 2 for a flag and
1 for the rest, and the runs and data directories exactly as they were. The categories: seeds outside numpy's range,
run names that leave --runs-dir, a --runs-dir that cannot hold runs, a taken name, --resume of a run that stopped
before its first checkpoint, of a finished run, or with flags that differ from the saved run. Then the parts that
need real processes: the lock that keeps a second process out of a run directory, and benchmark/run.py ending its
runs when it is interrupted. The data categories are in tests/test_data_validation.py."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, refuse_here

import bookkeeping
import common

PROTOCOL_A = [*TINY, "--total-steps", "2", "--eval-every", "2", "--log-every", "1"]
WRN = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--bn-momentum", "0.1", "--no-cuda"]
SCRIPTS = {  # script: the flags of a tiny run that works (the imagenet one adds its --data-dir)
    "train_supervised.py": PROTOCOL_A,
    "train_vat.py": PROTOCOL_A,
    "train_pi.py": PROTOCOL_A,
    "train_mixmatch.py": [*WRN, "--batch-size", "8", "--total-steps", "2", "--eval-every", "2", "--log-every", "1"],
    "train_fixmatch.py": [
        *WRN,
        *("--batch-size", "4", "--uratio", "2", "--total-steps", "2", "--eval-every", "2", "--log-every", "1"),
    ],
    "train_freematch.py": [
        *WRN,
        *("--batch-size", "4", "--uratio", "2", "--total-steps", "2", "--eval-every", "2", "--log-every", "1"),
    ],
    "train_fmnist_ablation.py": [
        *("--dataset", "synthetic", "--num-labeled", "40", "--total-steps", "2", "--log-every", "1"),
        *("--eval-every", "2", "--batch-size", "20", "--unlabeled-batch-size", "40", "--hidden", "8", "--no-cuda"),
    ],
    "train_xc.py": [
        *("--dataset", "planted", "--num-classes", "8", "--num-features", "4", "--eval-size", "20"),
        *("--batch-size", "8", "--total-steps", "2", "--eval-every", "2", "--pca-dim", "3", "--no-cuda"),
    ],
    "train_imagenet_mel.py": [
        *("--crop-size", "32", "--resize-size", "36", "--block-config", "2,2", "--growth-rate", "8"),
        *("--num-init-features", "16", "--num-workers", "0", "--num-labeled", "8", "--num-unlabeled", "-1"),
        *("--num-valid", "4", "--batch-size", "8", "--total-steps", "2", "--eval-every", "2", "--log-every", "1"),
        "--no-cuda",
    ],
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    for split, per_class in (("train", 8), ("val", 2)):
        for c in range(3):
            os.makedirs(root / split / f"class{c}")
            for i in range(per_class):
                Image.new("RGB", (40, 40), (80 * c, 40 + i, 200 - 60 * c)).save(root / split / f"class{c}" / f"{i}.png")
    return str(root)


def tiny(script, image_folder):
    return SCRIPTS[script] + (["--data-dir", image_folder] if script == "train_imagenet_mel.py" else [])


def snapshot(*roots):
    """Every path under ``roots`` with its size and modification time: equal snapshots = nothing on disk changed."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                stat = os.lstat(path)
                seen[path] = (stat.st_size, stat.st_mtime_ns)
    return seen


def main_of(script):
    return importlib.import_module(script[: -len(".py")]).main


def call(script, argv):
    """Run ``script``'s main() in this process with ``argv`` (conftest.refuse_here); (exit code, stdout, stderr)."""
    result = refuse_here(script, *argv)
    return result.returncode, result.stdout, result.stderr


def refused(script, argv, code, message, *roots):
    before = snapshot(*roots)
    got, _, err = call(script, argv)
    assert got == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert err.startswith(f"{script}: error: "), err
    assert snapshot(*roots) == before
    return err


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, image_folder):
    """One finished tiny run of every script, made once: the --resume cases read them (and must not change them)."""
    runs = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    try:
        for script in SCRIPTS:
            mp.setattr(
                sys, "argv", [script, *tiny(script, image_folder), "--runs-dir", str(runs), "--run-name", script]
            )
            main_of(script)()
            for run_dir in list(bookkeeping._locks):
                bookkeeping.unlock_run_dir(run_dir)
            assert os.path.isfile(runs / script / "summary.json")
    finally:
        mp.undo()
    return runs


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_records_its_provenance_in_run_info(script, finished_runs):
    """run_info.json: one record for the run's one leg, naming the command, the code and the libraries."""
    legs = json.loads((finished_runs / script / "run_info.json").read_text())["legs"]
    assert len(legs) == 1 and legs[0]["start_step"] == 0
    assert f"{script} " in legs[0]["command"] and f"--run-name {script}" in legs[0]["command"]
    assert legs[0]["torch"] == bookkeeping.torch.__version__ and legs[0]["device"]
    assert "commit" in legs[0] and "dirty" in legs[0]


# ------------------------------------------------------------------------------------------------ flags (exit 2)
FLAG_CASES = [
    (["--seed", "-1"], "--seed must be in [0, 2^32 - 1], got -1"),
    (["--seed", str(2**32)], "--seed must be in [0, 2^32 - 1], got 4294967296"),
    (["--seed", "1.5"], "--seed must be a whole number"),
    (["--run-name", "../outside"], "--run-name must be a plain directory name"),
    (["--run-name", "a/b"], "--run-name must be a plain directory name"),
    (["--run-name", ".."], "--run-name must be a plain directory name"),
    (["--run-name", "."], "--run-name must be a plain directory name"),
    (["--run-name", ""], "--run-name must be a plain directory name"),
    (["--se", "1"], "unrecognized arguments: --se 1"),  # no abbreviations: --resume sees every flag as given
    (["--run-name", "a\nb"], "--run-name must be printable"),  # a newline would split the one line
    (["--run-name", "x" * 256], "--run-name must be at most 255 bytes long, got 256"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, message", FLAG_CASES)
def test_bad_run_flags_are_one_line_and_exit_2(script, flags, message, tmp_path, image_folder):
    argv = [*tiny(script, image_folder), "--runs-dir", tmp_path / "runs", *flags]
    refused(script, argv, 2, message, tmp_path)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- run directories (exit 1)
def runs_dir_cases(tmp_path):
    """(--runs-dir, --run-name, message) of places where no run can be made; each made here, before the snapshot."""
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "checkpoint.pt").write_bytes(b"a run's")
    (tmp_path / "runs" / "stopped").mkdir()
    (tmp_path / "runs" / "stopped" / "args.json").write_text("{}")
    return [
        (tmp_path / "a_file", "x", "a_file is not a directory"),
        (tmp_path / "a_file" / "below", "x", "a_file is not a directory"),
        (tmp_path / "runs", "taken", "already exists: choose another --run-name, or continue it with --resume"),
        (tmp_path / "runs", "stopped", "holds no checkpoint"),
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_unusable_runs_dir_or_taken_name_is_one_line_and_changes_nothing(script, tmp_path, image_folder):
    for runs_dir, name, message in runs_dir_cases(tmp_path):
        argv = [*tiny(script, image_folder), "--runs-dir", runs_dir, "--run-name", name]
        refused(script, argv, 1, message, tmp_path)
    if os.geteuid() != 0:  # root writes anywhere, so only another user can see this refusal
        os.makedirs(tmp_path / "locked")
        os.chmod(tmp_path / "locked", 0o500)
        argv = [*tiny(script, image_folder), "--runs-dir", tmp_path / "locked" / "runs"]
        refused(script, argv, 1, "is not writable", tmp_path)


def test_runs_dir_that_is_not_writable_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    """The check itself (os.access), for root too: a --runs-dir whose nearest existing part is not writable."""
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    os.makedirs(tmp_path / "ro")
    assert "ro is not writable" in bookkeeping.run_dir_problem(str(tmp_path / "ro" / "runs"), "ignored")
    assert bookkeeping.run_dir_problem(str(tmp_path / "rw"), str(tmp_path / "rw" / "x")) is None


# ------------------------------------------------------------------------------------------------------- --resume
@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_of_a_finished_or_unstarted_run_is_refused(script, finished_runs, tmp_path, image_folder):
    data = tiny(script, image_folder) if script == "train_imagenet_mel.py" else []  # it resumes with its command
    run_dir = finished_runs / script
    refused(script, ["--resume", run_dir, *data], 1, "already finished", finished_runs)
    stopped = tmp_path / "stopped"  # what a run killed before its first checkpoint leaves
    stopped.mkdir()
    (stopped / "args.json").write_text((run_dir / "args.json").read_text())
    message = f"remove it (rm -r {stopped}) and start it again"
    refused(script, ["--resume", stopped, *data], 1, message, tmp_path, finished_runs)
    nowhere = ["--resume", tmp_path / "nowhere", *data]
    refused(script, nowhere, 1, "no such run directory", tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_that_loads_but_does_not_fit_is_one_line_and_changes_nothing(
    script, finished_runs, tmp_path, image_folder
):
    """A checkpoint.pt torch can read whose content does not fit the run (an entry missing, another model's weights):
    one line, exit 1, and the run directory exactly as it was (no event file from the refused leg)."""
    import shutil

    import torch

    data = tiny(script, image_folder) if script == "train_imagenet_mel.py" else []
    for case in ("no optimizer", "other weights"):
        run_dir = tmp_path / case.replace(" ", "_")
        shutil.copytree(finished_runs / script, run_dir)
        checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        if case == "no optimizer":
            del checkpoint["optimizer"]
        else:
            name = next(iter(checkpoint["model"]))
            checkpoint["model"][name] = torch.zeros(1)
        torch.save(checkpoint, run_dir / "checkpoint.pt")
        argv = ["--resume", run_dir, *data, "--total-steps", "3"]
        refused(script, argv, 1, "checkpoint.pt does not fit this run", tmp_path)


RESUME_CONFLICTS = {  # a flag per script whose value differs from the saved run's
    "train_supervised.py": ["--lr", "0.1"],
    "train_vat.py": ["--vat-eps", "1.5"],
    "train_pi.py": ["--depth", "16"],
    "train_mixmatch.py": ["--depth", "16"],
    "train_fixmatch.py": ["--lambda-u", "2"],
    "train_freematch.py": ["--fairness-weight", "0.5"],
    "train_fmnist_ablation.py": ["--lr", "0.5"],
    "train_xc.py": ["--method", "uniform"],
}


@pytest.mark.parametrize("script", RESUME_CONFLICTS)
def test_resume_refuses_flags_that_differ_from_the_saved_run(script, finished_runs):
    flag = RESUME_CONFLICTS[script]
    argv = ["--resume", finished_runs / script, "--total-steps", "4", *flag]
    err = refused(script, argv, 2, "continues the run with its saved arguments", finished_runs)
    assert flag[0] in err and "--total-steps" in err  # what differs, and what may change
    # The same flag at the saved value is no conflict: the refusal is about the value, not the flag.
    saved = json.loads((finished_runs / script / "args.json").read_text())
    name = flag[0][2:].replace("-", "_")
    same = [flag[0], str(saved[name])] if len(flag) == 2 else ([] if saved[name] else [f"--no-{flag[0][2:]}"])
    _, _, err = call(script, ["--resume", finished_runs / script, *same])
    assert "saved arguments" not in err and "already finished" in err


def test_imagenet_resume_without_total_steps_keeps_the_runs_length(finished_runs, image_folder):
    """Its recipe's length (90 epochs) is not the run's (2 steps): resuming the finished run is refused, not trained
    on to the recipe, and extending it needs --total-steps."""
    run_dir = finished_runs / "train_imagenet_mel.py"
    before = snapshot(finished_runs)
    flags = tiny("train_imagenet_mel.py", image_folder)
    at = flags.index("--total-steps")
    argv = ["--resume", run_dir, *flags[:at], *flags[at + 2 :]]  # its command without --total-steps 2
    code, _, err = call("train_imagenet_mel.py", argv)
    assert code == 1 and "already finished 2 steps" in err and snapshot(finished_runs) == before


# ---------------------------------------------------------------------------------------------------- strict JSON
def test_summaries_are_strict_json_without_nan(tmp_path):
    bookkeeping.write_json(str(tmp_path / "s.json"), {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": 2}})

    def no_constants(name):
        raise ValueError(f"not strict JSON: {name}")

    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=no_constants) == {
        "a": None,
        "b": [1.5, None],
        "c": {"d": 2},
    }


def test_mixmatch_without_validation_writes_null_and_no_nan_hparam(tmp_path):
    argv = [*SCRIPTS["train_mixmatch.py"], "--num-valid", "0", "--runs-dir", tmp_path, "--run-name", "r"]
    code, _, err = call("train_mixmatch.py", argv)
    assert code == 0, err
    text = (tmp_path / "r" / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["best_valid_error"] is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "r"))
    accumulator.Reload()
    hparams = [tag for tag in accumulator.Tags()["scalars"] if tag.startswith("hparam/")]
    assert hparams and "hparam/best_valid_error" not in hparams


# ------------------------------------------------------------------------- a run that fails before its checkpoint
def test_a_failure_before_the_first_checkpoint_removes_the_new_run_dir(tmp_path):
    run_dir = bookkeeping.create_run_dir(str(tmp_path / "runs"), "r")
    bookkeeping.write_json(os.path.join(run_dir, "args.json"), {})
    with pytest.raises(SystemExit):
        bookkeeping.fail("found late")
    assert not (tmp_path / "runs").exists() and not bookkeeping._locks  # the --runs-dir made for it goes too
    run_dir = bookkeeping.create_run_dir(str(tmp_path / "runs"), "kept")  # after its first checkpoint it stays
    bookkeeping.save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), {"step": 1})
    with pytest.raises(SystemExit):
        bookkeeping.fail("found later")
    assert os.listdir(tmp_path / "runs") == ["kept"]
    bookkeeping.unlock_run_dir(run_dir)


def test_an_exception_before_the_first_checkpoint_removes_the_new_run_dir(tmp_path):
    """Ctrl-C: the directory goes and one line says why; a bug (any other exception) keeps its traceback."""
    for raised, expected in (("KeyboardInterrupt", "-c: stopped by Ctrl-C"), ("ValueError('a bug')", "Traceback")):
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import bookkeeping; "
            f"bookkeeping.create_run_dir(sys.argv[2], 'r'); raise {raised}"
        )
        result = subprocess.run([sys.executable, "-c", code, ROOT, str(tmp_path)], capture_output=True, text=True)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert os.listdir(tmp_path) == []
    assert result.stderr.strip().splitlines()[-1] == "ValueError: a bug"


# ------------------------------------------------------------------------------------ real processes: the lock
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")
LONG = [*TINY, "--total-steps", "100000", "--eval-every", "2", "--log-every", "1"]


def wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_second_process_is_refused_while_a_run_is_alive(tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    script = os.path.join(ROOT, "train_supervised.py")
    first = subprocess.Popen(
        [sys.executable, script, *LONG, "--runs-dir", tmp_path / "runs", "--run-name", "busy"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: (run_dir / "checkpoint.pt").exists()), first.stderr.read()
        before = snapshot(tmp_path / "runs")
        second = subprocess.run(
            [sys.executable, script, "--resume", run_dir, "--no-cuda"], env=ENV, capture_output=True, text=True
        )
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert "another process is running in that run directory" in second.stderr
        assert first.poll() is None and set(snapshot(tmp_path / "runs")) >= set(before)  # the first goes on
    finally:
        first.kill()
        first.wait()
    # The OS released the lock with the process: the run continues from its checkpoint.
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    third = subprocess.run(
        [sys.executable, script, "--resume", run_dir, "--no-cuda", "--total-steps", str(step + 2)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert third.returncode == 0 and "resumed" in third.stdout, third.stderr


# ------------------------------------------------------------------------- real processes: the sweep runner's runs
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import run  # noqa: E402


def start_sweep(runs):
    command = f"python train_supervised.py {' '.join(LONG)}"
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "benchmark", "run.py"), "--config", "long", command, "--seeds", "1"]
        + ["--runs-dir", str(runs)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def training_pid(run_dir):
    """The pid of the training process that holds ``run_dir`` open (its lock), from /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if "train_supervised.py" in cmdline and "long__seed1" in cmdline and str(run_dir.parent) in cmdline:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the training process through /proc")
def test_interrupted_runner_ends_its_runs_and_a_killed_ones_orphan_is_not_joined(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "long__seed1"
    # SIGTERM: the runner ends its run (its own process group) and exits 128 + 15.
    runner = start_sweep(runs)
    assert wait_for(lambda: (run_dir / "checkpoint.pt").exists())
    child = training_pid(run_dir)
    assert child and alive(child)
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signal.SIGTERM and "SIGTERM: stopping 1 running run(s)" in err
    assert wait_for(lambda: not alive(child), timeout=15)
    # SIGKILL: the runner cannot stop its run, which goes on; a new runner leaves that directory alone.
    runner = start_sweep(runs)
    assert wait_for(lambda: training_pid(run_dir) is not None and run.in_use(str(run_dir)))  # it holds the lock
    orphan = training_pid(run_dir)
    runner.kill()
    runner.wait()
    try:
        assert alive(orphan)
        again = start_sweep(runs)
        out, err = again.communicate(timeout=60)
        assert again.returncode == 1 and "skipped, another process is running in" in out
        assert alive(orphan) and training_pid(run_dir) == orphan  # no second writer was started
    finally:
        os.kill(orphan, signal.SIGKILL)


# ------------------------------------------------------------------------------- limits and what numpy cannot read
def test_numbers_past_what_torch_holds_are_flag_errors_and_messages_stay_one_line():
    import argparse

    for parse, text in ((bookkeeping.positive_float, "1e300"), (bookkeeping.positive_int, str(10**12))):
        with pytest.raises(argparse.ArgumentTypeError, match="at most"):
            parse(text)
    assert bookkeeping.positive_float("3e38") == 3e38 and bookkeeping.positive_int(str(2**31 - 1)) == 2**31 - 1
    assert bookkeeping.one_line("runs/a\nb\tc") == "runs/a\\nb\\tc"
    import numpy as np

    with pytest.raises(common.DataError, match="above 2"):  # uint64 2^64 - 1 would become -1 as int64
        common.check_labels(np.array([0, 2**64 - 1], dtype=np.uint64), "f.npz", "y_train", 2)


def test_an_npy_named_npz_and_an_out_of_memory_error_are_one_line(tmp_path):
    import numpy as np

    np.save(tmp_path / "one.npy", np.zeros(3))
    os.rename(tmp_path / "one.npy", tmp_path / "one.npz")
    with pytest.raises(common.DataError, match="holds one array"):
        common.load_dataset(str(tmp_path / "one.npz"))
    code = "import bookkeeping; raise MemoryError('Unable to allocate 8.00 TiB')"  # what a huge --width meets
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "-c: error: out of memory (Unable to allocate 8.00 TiB); use a smaller model or batch"
    ]


def test_sigterm_before_the_first_checkpoint_removes_the_run_and_says_so_in_one_line(tmp_path):
    """kill, timeout and cluster schedulers send SIGTERM: it ends a run as Ctrl-C does (no traceback, one line), and
    a run stopped before its first checkpoint leaves no directory (nor the --runs-dir made for it) to block its name."""
    command = [sys.executable, os.path.join(ROOT, "train_supervised.py"), *TINY, "--total-steps", "100000"]
    command += ["--eval-every", "100000", "--runs-dir", str(tmp_path / "runs"), "--run-name", "a"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (tmp_path / "runs" / "a" / "args.json").exists())
        time.sleep(1.0)  # training, long before the checkpoint at step 100,000
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert err.strip().splitlines()[-1:] == ["train_supervised.py: stopped by SIGTERM"] and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
