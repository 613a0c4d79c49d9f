"""Runs written before issue 31 moved train_xc.py's data loading (to common.py) and train_imagenet_mel.py's model, data
pipeline and DDP helpers (to imagenet_mel_parts.py) resume under the new code to the numbers of the new code's own
runs: a checkpoint names no moved class, and the behaviour did not change. The old code is the commit before the move,
taken from this checkout's history (skipped where there is none, e.g. an exported tarball)."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "69b561a9fd42280deed34f2d50f4bc5ce3462c3e"  # the last commit before issue 31's move


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", BEFORE + "^{commit}"], capture_output=True).returncode:
        pytest.skip("the commit before the move is not in this checkout's history")
    archive = subprocess.run(["git", "-C", ROOT, "archive", BEFORE], capture_output=True, check=True).stdout
    folder = tmp_path_factory.mktemp("before_issue_31")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def script(code_root, name, *args, cwd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    result = subprocess.run(
        [sys.executable, os.path.join(code_root, name), *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("data", ["planted", "npz"])
def test_an_xc_run_of_the_old_code_resumes_to_an_uninterrupted_new_run(old_code, tmp_path, data):
    """Both data paths: the planted problem, and a file data set (the moved loader: validate_arrays,
    reindex_by_frequency, the authors' held-out split)."""
    flags = ["--dataset", "planted", "--num-classes", "50", "--num-features", "6", "--eval-size", "200"]
    if data == "npz":
        import numpy as np

        generator = torch.Generator().manual_seed(3)
        means = torch.randn(20, 6, generator=generator) * 2
        y = torch.randint(0, 20, (700,), generator=generator)
        x = means[y] + torch.randn(700, 6, generator=generator)
        np.savez(tmp_path / "d.npz", x_train=x[:600].numpy(), y_train=y[:600].numpy(), x_test=x[600:].numpy(),
                 y_test=y[600:].numpy())  # fmt: skip
        flags = ["--dataset", tmp_path / "d.npz"]
    flags += ["--batch-size", "32", "--eval-every", "10", "--log-every", "5", "--pca-dim", "3", "--threads", "1"]
    flags += ["--runs-dir", tmp_path / "runs"]
    script(old_code, "train_xc.py", *flags, "--total-steps", "10", "--run-name", "old", cwd=tmp_path)
    script(ROOT, "train_xc.py", *flags, "--total-steps", "30", "--run-name", "new", cwd=tmp_path)
    resumed = script(ROOT, "train_xc.py", "--resume", tmp_path / "runs" / "old", "--total-steps", "30", cwd=tmp_path)
    assert "at step 10" in resumed.stdout
    old, new = (json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("old", "new"))
    for key in (
        "steps",
        "final_test_log_likelihood",
        "final_test_error",
        "best_valid_error",
        "test_error_at_best_valid",
    ):
        assert old[key] == new[key], key
    a, b = (torch.load(tmp_path / "runs" / n / "checkpoint.pt", weights_only=True) for n in ("old", "new"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_an_imagenet_run_of_the_old_code_resumes_as_a_run_of_the_new_code(old_code, tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    for split, per_class in (("train", 16), ("val", 4)):
        for c in range(3):
            os.makedirs(data / split / f"class{c}")
            for i in range(per_class):
                Image.new("RGB", (40, 40), (80 * c, 40 + 3 * i, 200 - 60 * c)).save(
                    data / split / f"class{c}" / f"{i}.png"
                )
    flags = [
        "--data-dir",
        data,
        "--num-labeled",
        "12",
        "--num-unlabeled",
        "-1",
        "--num-valid",
        "6",
        "--batch-size",
        "8",
    ]
    flags += ["--lr", "0.05", "--log-every", "5", "--eval-every", "5", "--crop-size", "32", "--resize-size", "36"]
    flags += ["--block-config", "2,2", "--growth-rate", "8", "--num-init-features", "16", "--num-workers", "0"]
    flags += ["--no-cuda", "--torch-deterministic", "--runs-dir", tmp_path / "runs"]
    script(old_code, "train_imagenet_mel.py", *flags, "--total-steps", "10", "--run-name", "old", cwd=tmp_path)
    script(ROOT, "train_imagenet_mel.py", *flags, "--total-steps", "10", "--run-name", "new", cwd=tmp_path)
    for name in ("old", "new"):  # each continued by the new code
        script(ROOT, "train_imagenet_mel.py", *flags, "--total-steps", "15", "--resume", tmp_path / "runs" / name,
               cwd=tmp_path)  # fmt: skip
    old, new = (json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("old", "new"))
    for key in ("steps", "final_test_error", "final_valid_error", "best_valid_error", "test_error_at_best_valid"):
        assert old[key] == new[key], key
    a, b = (torch.load(tmp_path / "runs" / n / "checkpoint.pt", weights_only=True) for n in ("old", "new"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


FLAG_DUMP = """
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
import bookkeeping
captured = {}
def capture(self, args=None, namespace=None):
    captured["parser"] = self
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = capture
module = __import__(sys.argv[2])
try:
    module.parse_args([])
except SystemExit:
    pass
def name(value):
    return getattr(value, "__name__", None) if callable(value) else value
print(json.dumps({
    ",".join(a.option_strings) or a.dest: [a.dest, type(a).__name__, name(a.type), repr(a.default), repr(a.choices),
                                           repr(a.nargs), repr(a.const), a.required]
    for a in captured["parser"]._actions
}))
"""


@pytest.mark.parametrize(
    "name",
    ["train_supervised", "train_vat", "train_pi", "train_mixmatch", "train_fixmatch", "train_fmnist_ablation",
     "train_xc", "train_imagenet_mel"],
)  # fmt: skip
def test_every_flag_keeps_its_type_default_and_choices(old_code, name):
    """The compacted argparse blocks: every flag of the script before the move has the same action, type, default,
    choices, nargs and requiredness now (only help texts changed); flags added since are allowed."""

    def flags(code_root):
        done = subprocess.run([sys.executable, "-c", FLAG_DUMP, str(code_root), name], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    before, now = flags(old_code), flags(ROOT)
    assert {k: v for k, v in now.items() if k in before} == before
