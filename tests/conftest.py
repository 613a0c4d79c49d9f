"""Shared test helpers: run a training script as a subprocess (or, for a run that must be refused, in this process)
and read its TensorBoard scalars."""

import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tiny settings every end-to-end run of a Protocol A script can share.
TINY = [
    "--dataset",
    "synthetic",
    "--depth",
    "10",
    "--width",
    "1",
    "--log-every",
    "5",
    "--eval-every",
    "10",
    "--total-steps",
    "20",
    "--batch-size",
    "16",
    "--bn-momentum",
    "0.1",
    "--torch-deterministic",
    "--no-cuda",
]


def run_script(script, *args, cwd=None, timeout=600):
    """Run ``python <ROOT>/<script> args...`` on the CPU; return the CompletedProcess (text output)."""
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1"
    )  # 1 thread: immune to oversubscription on a shared machine
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def refuse_here(script, *args):
    """Run ``script``'s main() in this process, for input it must refuse before any training: the CompletedProcess a
    subprocess would give (exit code, stdout, stderr), without a new interpreter's 2-3 s of imports. An uncaught
    exception propagates, so a traceback still fails the test. The run-directory locks this call took are released."""
    import torch

    import bookkeeping

    argv = [os.path.join(ROOT, script), *map(str, args)]
    saved_argv, threads = sys.argv, torch.get_num_threads()
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            importlib.import_module(script[: -len(".py")]).main()
    except SystemExit as exit_info:
        code = 0 if exit_info.code is None else exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        for run_dir in list(bookkeeping._locks):
            bookkeeping.unlock_run_dir(run_dir)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows ``run_dir``: all its event files read as one run, in order,
    with the purge a resumed run asks for applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def tiny_args():
    return list(TINY)


# The slowest files first (summed test time per file, --durations=0, 2 cores, 2026-12-06): pytest-xdist (loadfile)
# hands files to its workers in collection order, so starting the long ones first keeps both workers busy to the end.
SLOWEST_FIRST = [
    "test_compile.py",
    "test_supervised.py",
    "test_benchmark.py",
    "test_xc.py",
    "test_imagenet_mel.py",
    "test_fmnist_ablation.py",
    "test_fixmatch.py",
    "test_mixmatch.py",
    "test_vat.py",
    "test_bad_input.py",
    "test_pi.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable within a file
