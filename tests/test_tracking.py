"""--track (Weights & Biases, CleanRL's convention) with no network: WANDB_MODE=offline keeps each W&B run in
RUN_DIR/wandb/offline-run-*/run-<id>.wandb, which these tests read back record by record."""

import glob
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, read_scalars, refuse_here, run_script

needs_wandb = pytest.mark.skipif(  # in requirements-dev.txt; the Quickstart's install does not need it
    importlib.util.find_spec("wandb") is None, reason="wandb is not installed"
)

SCRIPT = "train_supervised.py"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def read_wandb_runs(run_dir):
    """[{"id", "history", "config", "exit_code"}] of the offline W&B runs under run_dir/wandb, oldest first. A
    run-<id>.wandb file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) around a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data, pos, chunks, records = open(path, "rb").read(), 7, b"", []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            chunks = chunk if kind in (1, 2) else chunks + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                records.append(record)
        kinds = [r.WhichOneof("record_type") for r in records]
        history = [
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r, kind in zip(records, kinds)
            if kind == "history"
        ]
        config = {}
        for r, kind in zip(records, kinds):
            updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
            config.update({item.key: json.loads(item.value_json) for item in updates})
        (run_id,) = {r.run.run_id for r, kind in zip(records, kinds) if kind == "run"}
        exits = [r.exit.exit_code for r, kind in zip(records, kinds) if kind == "exit"]
        runs.append({"id": run_id, "history": history, "config": config, "exit_code": exits[-1] if exits else None})
    return runs


XC = ["--num-classes", "64", "--total-steps", "30", "--batch-size", "32", "--eval-every", "15", "--log-every", "10"]
ABLATION = ["--num-labeled", "40", "--total-steps", "6", "--log-every", "3", "--eval-every", "3", "--batch-size", "20"]
ABLATION += ["--unlabeled-batch-size", "100", "--hidden", "16", "--no-cuda"]
FMNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")


@needs_wandb
@pytest.mark.parametrize(
    "script,flags,tag",
    [
        (SCRIPT, [*TINY, "--ns3l"], "losses/ns3l"),
        ("train_xc.py", [*XC, "--no-cuda"], "eval/test_log_likelihood"),
        pytest.param(
            "train_fmnist_ablation.py", ABLATION, "eval/mean_last_test_error",
            marks=pytest.mark.skipif(not FMNIST, reason="needs Debian's dataset-fashion-mnist"),
        ),
    ],
)  # fmt: skip
def test_track_sends_every_scalar_once_and_the_arguments(tmp_path, script, flags, tag):
    result = run_script(script, *flags, "--runs-dir", tmp_path, "--run-name", "t", "--track",
                        "--wandb-project-name", "ns3l-test")  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "t"
    (run,) = read_wandb_runs(run_dir)
    steps = [row["global_step"] for row in run["history"]]
    assert steps == sorted(set(steps)), "each logged step is one W&B row, sent once"
    scalars = {tag: points for tag, points in read_scalars(run_dir).items() if not tag.startswith("hparam/")}
    assert tag in scalars
    for name, points in scalars.items():  # every TensorBoard point, same step, same value; nothing else
        sent = [(row["global_step"], row[name]) for row in run["history"] if name in row]
        assert [s for s, _ in sent] == [s for s, _ in points], name
        assert [v for _, v in sent] == pytest.approx([v for _, v in points], rel=1e-6), name
    assert set().union(*run["history"]) - set(scalars) <= {"global_step", "_step", "_timestamp", "_runtime"}
    assert run["config"]["wandb_project_name"] == "ns3l-test" and run["config"]["seed"] == 1
    assert run["exit_code"] == 0
    assert (run_dir / "wandb" / "run_id").read_text().strip() == run["id"]
    assert not glob.glob(str(run_dir / "wandb" / "**" / "events.out.tfevents*"), recursive=True)  # nothing to re-read


def children(pid):
    """The pids whose parent is ``pid`` (from /proc): W&B's wandb-core service of a tracked run."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


@needs_wandb
def test_a_stopped_tracked_run_is_one_line_and_its_resume_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "t"
    argv = [sys.executable, os.path.join(ROOT, SCRIPT), *TINY, "--runs-dir", str(tmp_path), "--run-name", "t"]
    argv = [a for a in argv] + ["--track", "--total-steps", "5000", "--eval-every", "10"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1 and err.strip().splitlines() == ["train_supervised.py: stopped by SIGTERM"], err
    (first,) = read_wandb_runs(run_dir)
    assert first["exit_code"] == 1  # W&B shows the leg as failed

    import torch

    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    total = step + 20
    result = run_script(SCRIPT, "--resume", run_dir, "--total-steps", total)  # tracked, as the run was
    assert result.returncode == 0, result.stderr
    first, second = read_wandb_runs(run_dir)
    assert second["id"] == first["id"] and second["exit_code"] == 0
    assert [row["global_step"] for row in second["history"]][-1] == total
    assert min(row["global_step"] for row in second["history"]) > step
    # the tracking flags change no result, so a resume may turn tracking off (or move it to another project)
    result = run_script(SCRIPT, "--resume", run_dir, "--total-steps", total + 10, "--no-track")
    assert result.returncode == 0, result.stderr
    assert len(read_wandb_runs(run_dir)) == 2
    with open(run_dir / "summary.json") as f:
        assert json.load(f)["args"]["track"] is False


@needs_wandb
def test_a_tracked_run_stopped_with_its_wandb_service_is_one_line(tmp_path):
    """As Slurm or a process-group kill does: SIGTERM to the run and to W&B's wandb-core at once."""
    argv = [sys.executable, os.path.join(ROOT, SCRIPT), *TINY, "--runs-dir", str(tmp_path), "--run-name", "t"]
    argv += ["--track", "--total-steps", "5000", "--eval-every", "10"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "t" / "checkpoint.pt").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    service = children(child.pid)
    assert service, "wandb-core runs beside a tracked run"
    for pid in [child.pid, *service]:
        os.kill(pid, signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1 and err.strip().splitlines() == ["train_supervised.py: stopped by SIGTERM"], err
    assert (tmp_path / "t" / "checkpoint.pt").exists()


def test_track_without_wandb_is_one_line_before_the_data_are_read(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec and import both fail
    missing = tmp_path / "missing.npz"  # read after parsing: its error would come first if wandb were checked later
    result = refuse_here(SCRIPT, *TINY, "--dataset", missing, "--runs-dir", tmp_path / "runs", "--track")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "--track needs wandb: pip install wandb==0.31.0" in result.stderr and not (tmp_path / "runs").exists()


@needs_wandb
def test_a_refused_resume_of_a_tracked_run_leaves_its_wandb_folder_as_it_was(tmp_path, monkeypatch):
    result = run_script(SCRIPT, *TINY, "--runs-dir", tmp_path, "--run-name", "t", "--track")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "t"

    def snapshot():
        return {
            path: os.readlink(path)
            if os.path.islink(path)
            else open(path, "rb").read()
            if os.path.isfile(path)
            else "dir"
            for path in glob.glob(str(run_dir / "**"), recursive=True)
        }

    before = snapshot()
    import wandb

    def failing_init(**kwargs):  # what a failing wandb.init leaves: a new run folder, latest-run pointed at it
        folder = os.path.join(kwargs["dir"], "wandb", "run-20990101_000000-" + kwargs["id"])
        os.makedirs(os.path.join(folder, "logs"))
        os.remove(os.path.join(kwargs["dir"], "wandb", "latest-run"))
        os.symlink(os.path.basename(folder), os.path.join(kwargs["dir"], "wandb", "latest-run"))
        raise RuntimeError("no route to the W&B server")

    monkeypatch.setattr(wandb, "init", failing_init)
    refused = refuse_here(SCRIPT, "--resume", run_dir, "--total-steps", "40")
    assert refused.returncode == 1 and "--track: wandb.init failed (RuntimeError" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert snapshot() == before
