"""train_supervised.py: NS3L / Pseudo-Label / EntMin losses against hand computations, end-to-end runs, determinism,
resume, a learning check on real data (digits), and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY, read_scalars, refuse_here, run_script

import train_supervised as ts

SCRIPT = "train_supervised.py"
SUMMARY_KEYS = {
    "steps",
    "steps_per_second",
    "final_valid_error",
    "final_test_error",
    "best_valid_error",
    "test_error_at_best_valid",
    "args",
}


# ------------------------------------------------------------------------------------------------------ losses
def test_ns3l_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0, -3.0], [0.5, 0.4, 0.3, -6.0]])
    probs = torch.softmax(logits, 1)  # row 0: [.8438, .1142, .0420, .0057]; row 1: [.3672, .3322, .3006, .0009]
    negatives = ts.ns3l_negatives(logits, 0.05)
    assert negatives.tolist() == [[False, False, True, True], [False, False, False, True]]
    expected = -(math.log(1 - probs[0, 2] - probs[0, 3]) + math.log(1 - probs[1, 3])) / 2
    assert ts.ns3l_loss(logits, negatives).item() == pytest.approx(expected, rel=1e-5)
    assert ts.ns3l_loss(logits, torch.zeros_like(negatives)).item() == pytest.approx(0.0, abs=1e-7)


def test_ns3l_loss_stable_at_extreme_logits_and_gradient():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 999.0]], requires_grad=True)
    # row 0: the negative class holds all the mass -> loss clamps at -log(1e-8), like the authors' clamp
    negatives = torch.tensor([[True, False, False], [False, False, True]])
    loss = ts.ns3l_loss(logits, negatives)
    loss.backward()
    expected = (-math.log(1e-8) + math.log1p(math.exp(-1.0))) / 2  # row 1: -log(e^1000 / (e^1000 + e^999))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(logits.grad).all()
    # gradient pushes the negatives' logits down and the others up
    small = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    ts.ns3l_loss(small, torch.tensor([[False, False, True]])).backward()
    assert small.grad[0, 2] > 0 and small.grad[0, :2].sum() < 0


def test_ns3l_mask_uses_threshold_and_carries_no_gradient():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).requires_grad_()
    assert ts.ns3l_negatives(logits, 0.06).tolist() == [[False, False, False, True]]
    assert ts.ns3l_negatives(logits, 0.2).tolist() == [[False, False, True, True]]
    assert not ts.ns3l_negatives(logits, 0.2).requires_grad


def test_pseudo_label_and_entropy_hand_computations():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    probs = torch.softmax(logits, 1)
    loss, mask, targets = ts.pseudo_label_loss(logits, 0.95)
    assert mask.tolist() == [1.0, 0.0] and targets.tolist() == [0, 0]
    assert loss.item() == pytest.approx(-math.log(probs[0, 0]) / 2, rel=1e-5)  # mean over all rows
    entropy = -(probs * probs.log()).sum(1).mean()
    assert ts.entropy_loss(logits).item() == pytest.approx(entropy.item(), rel=1e-5)
    assert ts.entropy_loss(torch.zeros(1, 4)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_rampup_schedule():
    assert ts.rampup(0, 50_000) == pytest.approx(math.exp(-5))
    assert ts.rampup(25_000, 50_000) == pytest.approx(math.exp(-5 * 0.25))
    assert ts.rampup(50_000, 50_000) == 1.0 and ts.rampup(10, 0) == 1.0


def test_paper_learning_rates_and_threshold_default():
    assert ts.parse_args([]).lr == 3e-3
    assert ts.parse_args(["--ns3l"]).lr == 6e-4
    assert ts.parse_args(["--pseudo-label"]).lr == 3e-4
    assert ts.parse_args(["--ns3l", "--lr", "0.1"]).lr == 0.1
    args = ts.parse_args([])
    assert (args.total_steps, args.lr_decay_step, args.rampup_steps, args.batch_size) == (200_000, 130_000, 50_000, 100)
    assert ts.parse_args(["--ns3l"]).batch_size == ts.parse_args(["--ns3l"]).unlabeled_batch_size == 50


# ------------------------------------------------------------------------------------------------- end to end
def _run(tmp_path, name, *extra):
    result = run_script(SCRIPT, *TINY, "--runs-dir", tmp_path, "--run-name", name, *extra)
    assert result.returncode == 0, result.stderr
    return os.path.join(tmp_path, name)


@pytest.mark.parametrize(
    "flags,tags",
    [
        ([], []),
        (["--ns3l"], ["losses/ns3l", "charts/ns3l_negatives_per_sample", "charts/ns3l_false_negative_rate"]),
        (
            ["--pseudo-label", "--pl-threshold", "0.2"],
            ["losses/pseudo_label", "charts/pl_mask_rate", "charts/pl_accuracy"],
        ),
        (
            ["--ns3l", "--pseudo-label", "--entmin", "--ns3l-extra-pass"],
            ["losses/ns3l", "losses/pseudo_label", "losses/entropy"],
        ),
    ],
)
def test_end_to_end(tmp_path, flags, tags):
    run_dir = _run(tmp_path, "run", *flags)
    for name in ("args.json", "split.json", "checkpoint.pt", "summary.json"):
        assert os.path.exists(os.path.join(run_dir, name))
    scalars = read_scalars(run_dir)
    expected = [
        "losses/supervised",
        "losses/total",
        "charts/SPS",
        "charts/learning_rate",
        "eval/valid_error",
        "eval/test_error",
        "eval/test_error_at_best_valid",
    ] + tags
    for tag in expected:
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag]), tag
    if not flags:  # the baseline uses labeled data only
        assert not any(t.startswith(("losses/ns3l", "losses/pseudo", "losses/entropy")) for t in scalars)
    assert [s for s, _ in scalars["eval/test_error"]] == [10, 20]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert SUMMARY_KEYS <= set(summary) and summary["steps"] == 20 and summary["steps_per_second"] > 0
    for key in ("final_valid_error", "final_test_error", "best_valid_error", "test_error_at_best_valid"):
        assert 0 <= summary[key] <= 100
    assert summary["best_valid_error"] == min(v for _, v in scalars["eval/valid_error"])
    split = json.load(open(os.path.join(run_dir, "split.json")))
    assert len(split["labeled"]) == 40 and len(split["valid"]) == 50
    if "--ns3l" in flags:
        negatives = [v for _, v in scalars["charts/ns3l_negatives_per_sample"]]
        assert all(0 < v < 10 for v in negatives) and summary["args"]["threshold"] == pytest.approx(0.04)


def test_determinism_and_seed(tmp_path):
    a = json.load(open(os.path.join(_run(tmp_path, "a", "--ns3l"), "summary.json")))
    b = json.load(open(os.path.join(_run(tmp_path, "b", "--ns3l"), "summary.json")))
    _run(tmp_path, "c", "--ns3l", "--seed", "2")
    la = [v for _, v in read_scalars(os.path.join(tmp_path, "a"))["losses/total"]]
    lb = [v for _, v in read_scalars(os.path.join(tmp_path, "b"))["losses/total"]]
    lc = [v for _, v in read_scalars(os.path.join(tmp_path, "c"))["losses/total"]]
    assert la == lb and a["final_test_error"] == b["final_test_error"]
    assert la != lc


def test_resume_matches_uninterrupted_run(tmp_path):
    full = _run(tmp_path, "full", "--ns3l", "--pseudo-label")
    part = _run(tmp_path, "part", "--ns3l", "--pseudo-label", "--total-steps", "10")
    result = run_script(SCRIPT, "--resume", part, "--total-steps", "20")
    assert result.returncode == 0, result.stderr
    a, b = (json.load(open(os.path.join(d, "summary.json"))) for d in (full, part))
    for key in ("final_valid_error", "final_test_error", "best_valid_error", "test_error_at_best_valid"):
        assert a[key] == b[key], key
    wa = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    losses = dict(read_scalars(part)["losses/total"])
    assert sorted(losses) == [5, 10, 15, 20] and losses[20] == dict(read_scalars(full)["losses/total"])[20]
    assert [s for s, _ in read_scalars(part)["eval/test_error"]] == [10, 20]  # the eval at the checkpoint survives
    legs = json.load(open(os.path.join(part, "run_info.json")))["legs"]  # each leg's provenance, in order
    assert [leg["start_step"] for leg in legs] == [0, 10] and "--resume" in legs[1]["command"]


def test_learns_digits(tmp_path):
    """Real data, fixed seed and steps. Measured (seed 1, one thread): supervised 5.03 % test error, NS3L 3.82 %
    (4.83 % supervised with two threads); chance is 90 %. A broken loss, split or augmentation lands far above 12 %."""
    common_args = [
        "--dataset",
        "digits",
        "--depth",
        "10",
        "--width",
        "1",
        "--total-steps",
        "300",
        "--eval-every",
        "150",
        "--log-every",
        "150",
        "--rampup-steps",
        "100",
        "--bn-momentum",
        "0.05",
        "--torch-deterministic",
        "--no-cuda",
        "--runs-dir",
        tmp_path,
    ]
    for name, flags in (("sup", []), ("ns3l", ["--ns3l"])):
        result = run_script(SCRIPT, *common_args, "--run-name", name, *flags)
        assert result.returncode == 0, result.stderr
        summary = json.load(open(os.path.join(tmp_path, name, "summary.json")))
        assert summary["test_error_at_best_valid"] < 12.0, (name, summary["test_error_at_best_valid"])


# ------------------------------------------------------------------------------------------------- bad input
def _assert_one_line_failure(result):
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    return lines[-1]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--threshold", "1.5"], "--threshold"),
        (["--threshold", "0"], "--threshold"),
        (["--dataset", "imagenet"], "unknown data set"),
        (["--num-labeled", "5000"], "exceed"),
        (["--depth", "12"], "--depth"),
        (["--dataset", "cifar10", "--data-dir", "nowhere"], "--download"),
        (["--num-valid", "0"], "--num-valid"),
        (["--unlabeled-batch-size", "0"], "--unlabeled-batch-size"),
        (["--ns3l-weight", "nan"], "--ns3l-weight"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, flags, message, monkeypatch, capsys):
    """In this process (main() as the command line runs it; the failures come before any training); the subprocess
    test below checks the same contract through a real command line."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *TINY, "--runs-dir", str(tmp_path / "runs"), *flags])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ts.main()
    result = subprocess.CompletedProcess([], exit_info.value.code, "", capsys.readouterr().err)
    assert message in _assert_one_line_failure(result)
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_bad_input_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    result = refuse_here(
        SCRIPT, *TINY, "--runs-dir", tmp_path / "runs", "--dataset", "cifar10", "--data-dir", "nowhere"
    )
    assert "--download" in _assert_one_line_failure(result)
    assert not os.path.exists(tmp_path / "runs")


def test_existing_run_and_corrupt_checkpoint_lose_nothing(tmp_path):
    run_dir = _run(tmp_path, "taken")
    before = {n: open(os.path.join(run_dir, n), "rb").read() for n in os.listdir(run_dir)}
    result = refuse_here(SCRIPT, *TINY, "--runs-dir", tmp_path, "--run-name", "taken")
    assert "already exists" in _assert_one_line_failure(result)
    assert {n: open(os.path.join(run_dir, n), "rb").read() for n in os.listdir(run_dir)} == before
    result = refuse_here(SCRIPT, "--resume", run_dir)  # finished: nothing to continue, nothing to overwrite
    assert "already finished" in _assert_one_line_failure(result)
    assert {n: open(os.path.join(run_dir, n), "rb").read() for n in os.listdir(run_dir)} == before
    with open(os.path.join(run_dir, "checkpoint.pt"), "wb") as f:
        f.write(before["checkpoint.pt"][:1000])  # truncated
    result = refuse_here(SCRIPT, "--resume", run_dir, "--total-steps", "30")
    assert "corrupt" in _assert_one_line_failure(result)
    assert open(os.path.join(run_dir, "checkpoint.pt"), "rb").read() == before["checkpoint.pt"][:1000]
    assert sorted(os.listdir(run_dir)) == sorted(before)
    result = refuse_here(SCRIPT, "--resume", tmp_path / "missing")
    assert "no such run directory" in _assert_one_line_failure(result)
