"""benchmark/run.py's cluster backend without a cluster: the Slurm submission checked as text (a stand-in sbatch on
PATH keeps the script submitit renders), and the same tasks run for real through submitit's local executor (real
processes, one of them preempted mid-run and requeued) and its debug executor (in this process)."""

import glob
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import run  # noqa: E402

pytest.importorskip("submitit")  # in requirements-dev.txt; without it only these tests are skipped

# A real run short enough for a test, long enough to be preempted between its first checkpoint and its end.
DIGITS = "python train_supervised.py --dataset digits --total-steps 400 --eval-every 20 --log-every 50 --no-cuda"


def fake_slurm(tmp_path, monkeypatch, job_id=4242, queued="", squeue_status=0):
    """sbatch / srun / squeue stand-ins on PATH: sbatch keeps its script and answers as Slurm does; squeue records its
    arguments in squeue_args and prints ``queued``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "sbatch": f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch_{job_id}.sh\necho "Submitted batch job {job_id}"\n',
        "srun": "#!/bin/sh\nexit 0\n",
        "squeue": f"#!/bin/sh\necho \"$@\" > {tmp_path}/squeue_args\nprintf '{queued}'\n"
        + (
            f"echo 'squeue: error: Unable to contact slurm controller' >&2\nexit {squeue_status}\n"
            if squeue_status
            else ""
        ),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


SLURM = ["--backend", "slurm", "--partition", "gpu", "--time", "600", "--max-running", "2"]
SLURM += ["--slurm-extra", "account=lab", "--slurm-setup", "source venv/bin/activate"]


def test_slurm_submission_renders_one_throttled_array_and_refuses_a_second_while_queued(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch)
    runs = str(tmp_path / "runs")
    argv = SLURM + ["--config", "a", DIGITS, "--config", "b", DIGITS + " --ns3l", "--seeds", "1", "2"]
    assert run.main(argv + ["--runs-dir", runs]) == 0
    out = capsys.readouterr().out
    assert "submitted 4 runs as Slurm job array 4242" in out and "squeue -j 4242" in out
    sbatch = (tmp_path / "sbatch_4242.sh").read_text()
    for line in (
        "#SBATCH --array=0-3%2",  # 2 configurations x 2 seeds, at most --max-running at once
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=600",
        "#SBATCH --signal=USR2@90",  # the warning submitit turns into a checkpoint and a requeue
        "#SBATCH --account=lab",
        "#SBATCH --job-name=ns3l-runs",
        "source venv/bin/activate",
        f"export PYTHONPATH={os.path.join(ROOT, 'benchmark')}",
    ):
        assert line in sbatch, line
    assert f"#SBATCH --output={runs}/.submitit/%A_%a/%A_%a_0_log.out" in sbatch
    # one pickled task per run, in plan order (seed-major), each the run's own configuration and seed
    import submitit

    tasks = [
        submitit.helpers.DelayedSubmission.load(f"{runs}/.submitit/4242_{i}/4242_{i}_submitted.pkl").function
        for i in range(4)
    ]
    assert [(t.config.name, t.seed, t.threads) for t in tasks] == [("a", 1, 8), ("b", 1, 8), ("a", 2, 8), ("b", 2, 8)]
    with open(f"{runs}/.submitit/submitted.json") as f:
        assert json.load(f)[0]["runs"] == ["a__seed1", "b__seed1", "a__seed2", "b__seed2"]

    # While the array is queued, a second submission would train the same runs twice: refused, nothing written.
    fake_slurm(tmp_path, monkeypatch, job_id=4243, queued="4242\\n4242\\n")
    before = sorted(os.listdir(f"{runs}/.submitit"))
    with pytest.raises(SystemExit) as stop:
        run.main(argv + ["--runs-dir", runs])
    assert "job array 4242" in str(stop.value.code) and "still queued or running" in str(stop.value.code)
    assert (tmp_path / "squeue_args").read_text().split() == ["--noheader", "--format=%F", "--jobs=4242"]
    assert sorted(os.listdir(f"{runs}/.submitit")) == before and not (tmp_path / "sbatch_4243.sh").exists()

    # Once it has left the queue, submitting again sends only the runs that have not finished.
    fake_slurm(tmp_path, monkeypatch, job_id=4243)
    os.makedirs(f"{runs}/a__seed1")
    with open(f"{runs}/a__seed1/summary.json", "w") as f:
        json.dump({"steps": 400}, f)
    assert run.main(argv + ["--runs-dir", runs]) == 0
    assert "#SBATCH --array=0-2%2" in (tmp_path / "sbatch_4243.sh").read_text()

    # An squeue that fails cannot tell whether an array is queued: one line, nothing submitted.
    fake_slurm(tmp_path, monkeypatch, job_id=4244, squeue_status=1)
    with pytest.raises(SystemExit) as stop:
        run.main(argv + ["--runs-dir", runs])
    assert "Unable to contact slurm controller" in stop.value.code and "\n" not in stop.value.code
    assert not (tmp_path / "sbatch_4244.sh").exists()


def test_the_script_itself_submits_tasks_that_load_as_run_task(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch, job_id=77)
    runs = tmp_path / "runs"
    command = [sys.executable, os.path.join(ROOT, "benchmark", "run.py"), *SLURM, "--mem-gb", "1.5"]
    command += ["--config", "a", DIGITS, "--seeds", "1", "--runs-dir", str(runs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "submitted 1 run as Slurm job 77\n" in done.stdout
    assert "#SBATCH --mem=1536MB" in (tmp_path / "sbatch_77.sh").read_text()  # Slurm takes whole numbers only
    import submitit

    (pickle,) = glob.glob(f"{runs}/.submitit/77/77_submitted.pkl")
    task = submitit.helpers.DelayedSubmission.load(pickle).function
    assert type(task).__module__ == "run" and task.config.name == "a"  # by reference: the task process imports run
    assert "PYTHONPATH" not in os.environ or os.path.join(ROOT, "benchmark") not in os.environ["PYTHONPATH"]


def test_a_paper_recipe_takes_the_same_flags(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmark", "paper"))
    import table3_mixmatch_cifar10 as table3

    fake_slurm(tmp_path, monkeypatch)
    runs = str(tmp_path / "table3")
    argv = ["--run", "--setting", "cifar10-250", "--seeds", "1", "2", "--runs-dir", runs] + SLURM
    assert table3.SETTINGS and table3.main.__module__ == "_paper"
    from _paper import main

    assert main("table3", "t", table3.SETTINGS, table3.SEEDS, argv + ["--", "--data-dir", "/datasets"]) == 0
    assert "#SBATCH --array=0-3%2" in (tmp_path / "sbatch_4242.sh").read_text()  # mixmatch +- ns3l x 2 seeds
    import submitit

    task = submitit.helpers.DelayedSubmission.load(f"{runs}/cifar10-250/.submitit/4242_1/4242_1_submitted.pkl")
    assert task.function.config.name == "mixmatch+ns3l" and task.function.config.argv[-2:] == [
        "--data-dir",
        "/datasets",
    ]


def test_slurm_backend_refuses_a_machine_without_slurm_and_bad_flags_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun or squeue
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as stop:
        run.main(["--backend", "slurm", "--config", "a", DIGITS, "--runs-dir", str(runs)])
    assert stop.value.code.startswith("run.py: error: --backend slurm: sbatch, srun, squeue not found")
    assert not runs.exists()
    assert run.main(["--backend", "slurm", "--config", "a", DIGITS, "--runs-dir", str(runs), "--dry-run"]) == 0
    for bad in (["--time", "0"], ["--slurm-extra", "account"], ["--max-running", "0"], ["--mem-gb", "-1"]):
        with pytest.raises(SystemExit) as stop:
            run.main(["--backend", "slurm", "--config", "a", DIGITS, "--runs-dir", str(runs)] + bad)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("run.py: error: ") and err.count("\n") == 1, err
    assert not runs.exists()


def test_a_refused_submission_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch)
    runs = tmp_path / "table" / "cifar10-40"  # as a recipe's: two directories made for it
    assert run.main(SLURM + ["--config", "a", DIGITS, "--runs-dir", str(runs)]) == 0  # an earlier array
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{tmp_path}/table/**", recursive=True)}
    refused = "#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n"
    (tmp_path / "bin" / "sbatch").write_text(refused)
    for where in (runs, tmp_path / "fresh" / "cifar10-40"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            run.main(SLURM + ["--config", "a", DIGITS, "--config", "b", DIGITS, "--runs-dir", str(where)])
        assert str(stop.value.code).startswith("run.py: error: submission failed: ")
        assert "invalid partition" in str(stop.value.code) and "\n" not in str(stop.value.code)
        assert capsys.readouterr().err == ""  # submitit's own print of sbatch's message is not shown twice
    assert {p: os.path.getmtime(p) for p in glob.glob(f"{tmp_path}/table/**", recursive=True)} == before
    assert not (tmp_path / "fresh").exists()


def processes():
    """{pid: (parent pid, command line)} of this machine's processes, from /proc."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    found[int(name)] = (parent, f.read().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, ValueError, IndexError):
                continue
    return found


def summary_errors(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return {k: v for k, v in json.load(f).items() if "error" in k or k == "steps"}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the task's process through /proc")
def test_local_executor_requeues_a_preempted_task_to_the_numbers_of_an_uninterrupted_run(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    argv = ["--backend", "submitit-local", "--gpus-per-task", "0", "--runs-dir", runs, "--seeds", "3"]
    argv += ["--config", "preempted", DIGITS, "--config", "uninterrupted", DIGITS]
    result = {}
    sweep = threading.Thread(target=lambda: result.setdefault("code", run.main(argv)))
    sweep.start()
    deadline = time.time() + 300
    checkpoint = os.path.join(runs, "preempted__seed3", "checkpoint.pt")
    while not os.path.exists(checkpoint) and time.time() < deadline and sweep.is_alive():
        time.sleep(0.05)
    assert os.path.exists(checkpoint), "the run never wrote its first checkpoint"
    # Slurm's warning before a time limit or at a preemption: SIGUSR2 to the task (the submitit process that started
    # the training run), which submitit turns into Task.checkpoint and a requeue.
    table = processes()
    training = [pid for pid, (_, cmd) in table.items() if f"--runs-dir {runs} --run-name preempted__seed3" in cmd]
    assert len(training) == 1
    for pid in (table[training[0]][0], training[0]):  # Slurm signals every process of the job step
        os.kill(pid, signal.SIGUSR2)
    sweep.join(timeout=300)
    assert not sweep.is_alive() and result["code"] == 0
    assert "2 of 2 runs finished, 0 failed" in capsys.readouterr().out
    log = open(os.path.join(runs, "preempted__seed3.log")).read()
    assert log.count("$ python train_supervised.py") == 2 and "stopped by SIGTERM" in log
    assert f"--resume {runs}/preempted__seed3" in log.splitlines()[-1] or "--resume" in log.split("$ ")[-1]
    with open(os.path.join(runs, "preempted__seed3", "run_info.json")) as f:
        legs = json.load(f)["legs"]
    assert len(legs) == 2 and legs[0]["start_step"] == 0 and legs[1]["start_step"] > 0
    assert summary_errors(os.path.join(runs, "preempted__seed3")) == summary_errors(
        os.path.join(runs, "uninterrupted__seed3")
    )
    # a finished run is never run again
    mtime = os.path.getmtime(os.path.join(runs, "preempted__seed3", "summary.json"))
    assert run.main(argv) == 0
    assert "every run has finished, nothing to submit" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(runs, "preempted__seed3", "summary.json")) == mtime


def test_debug_executor_runs_the_tasks_here_and_counts_a_failed_one(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    short = DIGITS.replace("--total-steps 400", "--total-steps 20")
    argv = ["--backend", "submitit-debug", "--runs-dir", runs, "--seeds", "1"]
    argv += ["--config", "ok", short, "--config", "broken", short + " --lr -1"]
    assert run.main(argv) == 1
    out = capsys.readouterr().out
    # (submitit's debug executor opens pdb on a failing task; under pytest's capture pdb cannot read and gives up)
    assert "1 of 2 runs finished, 1 failed" in out and "broken__seed1: failed (" in out
    assert "exit 2 after" in open(os.path.join(runs, "broken__seed1.log")).read() or "exit 2 after" in out
    assert summary_errors(os.path.join(runs, "ok__seed1"))["steps"] == 20
    import report

    assert sorted(report.collect(runs)) == ["ok"]  # .submitit is not a configuration; a refused run left nothing
