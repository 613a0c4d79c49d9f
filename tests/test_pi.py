"""train_pi.py: consistency loss by hand, the target pass (no gradient, BN statistics untouched), NS3L, end-to-end
runs of Pi and Pi + NS3L on synthetic data, exact resume, and bad inputs."""

import copy
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import read_scalars, run_script  # noqa: E402

import common  # noqa: E402
import train_pi  # noqa: E402
import wrn  # noqa: E402

TINY_NO_STEPS = [
    "--dataset",
    "synthetic",
    "--depth",
    "10",
    "--width",
    "1",
    "--log-every",
    "5",
    "--eval-every",
    "5",
    "--batch-size",
    "16",
    "--bn-momentum",
    "0.1",
    "--torch-deterministic",
    "--no-cuda",
]
TINY = TINY_NO_STEPS + ["--total-steps", "10"]
SUMMARY_KEYS = {
    "steps",
    "steps_per_second",
    "final_valid_error",
    "final_test_error",
    "best_valid_error",
    "test_error_at_best_valid",
    "args",
}


def run(*args):
    return run_script("train_pi.py", *args, timeout=300)


def scalars(run_dir):
    return read_scalars(run_dir)


def tiny_model():
    torch.manual_seed(0)
    return wrn.WideResNet(10, depth=10, width=1, bn_momentum=0.1).train()


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# ------------------------------------------------------------------------------------------------------------ losses
def test_consistency_loss_matches_hand_computation():
    # softmax([0, 0]) = (1/2, 1/2); softmax([log 3, 0]) = (3/4, 1/4): squared differences 1/16, 1/16 in row 0, 0 in
    # row 1 -> mean over rows AND classes = (1/16 + 1/16) / 4 = 1/32 (a sum over classes would give 1/16).
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)
    target = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]], requires_grad=True)
    loss = train_pi.consistency_loss(logits, target)
    assert loss.item() == pytest.approx(1 / 32, abs=1e-7)
    loss.backward()
    assert target.grad is None or torch.all(target.grad == 0)  # the target is detached
    # d/dz0 of row 0: (1/4) * 2 * (p0 - t0) * dp0/dz0 + same for class 1; p = (1/2, 1/2), t = (3/4, 1/4)
    # dp0/dz0 = 1/4, dp1/dz0 = -1/4 -> (1/4) * [2 * (-1/4) * 1/4 + 2 * (1/4) * (-1/4)] = -1/16
    assert logits.grad[0, 0].item() == pytest.approx(-1 / 16, abs=1e-7)
    assert logits.grad[1].abs().max().item() < 1e-7


def test_consistency_zero_when_both_passes_identical_and_positive_with_augmentation():
    model = tiny_model()
    torch.manual_seed(1)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    same = common.augment(images, flip=False, shift=0, noise_std=0.0)
    loss = train_pi.consistency_loss(model(same), train_pi.target_pass(model, same))
    assert loss.item() < 1e-12
    torch.manual_seed(2)
    loss_aug = train_pi.consistency_loss(
        model(common.augment(images, True, 2, 0.15)), train_pi.target_pass(model, common.augment(images, True, 2, 0.15))
    )
    assert loss_aug.item() > 1e-6


def test_target_pass_has_no_gradient_and_leaves_bn_statistics_unchanged():
    model = tiny_model()
    x = torch.randn(8, 3, 16, 16)
    before = bn_buffers(model)
    out = train_pi.target_pass(model, x)
    assert not out.requires_grad and out.grad_fn is None
    after = bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # it is a training-mode pass (batch statistics), i.e. what the first pass computes on the same input ...
    reference = copy.deepcopy(model)
    assert torch.allclose(out, reference(x), atol=1e-5)
    # ... and that ordinary pass does move the statistics, so the check above can fail
    assert any(not torch.equal(before[k], v) for k, v in bn_buffers(reference).items())
    assert model.training and all(m.update_stats for m in model.modules() if isinstance(m, wrn.BatchNorm2d))


def test_ns3l_loss_and_negatives():
    probs = torch.tensor([[0.70, 0.28, 0.02], [0.5, 0.3, 0.2]])
    logits = probs.log()
    negatives = train_pi.ns3l_negatives(logits, 0.04)
    assert negatives.tolist() == [[False, False, True], [False, False, False]]
    expected = (-math.log(1 - 0.02) + 0.0) / 2
    assert train_pi.ns3l_loss(logits, negatives).item() == pytest.approx(expected, rel=1e-5)


def test_rampup_schedule():
    assert train_pi.rampup(0, 100) == pytest.approx(math.exp(-5))
    assert train_pi.rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert train_pi.rampup(100, 100) == 1.0 and train_pi.rampup(7, 0) == 1.0


def test_default_hyperparameters():
    pi = train_pi.parse_args([])
    assert (pi.lr, pi.pi_weight, pi.rampup_steps, pi.total_steps, pi.lr_decay_step) == (
        3e-4,
        20.0,
        50_000,
        200_000,
        130_000,
    )
    both = train_pi.parse_args(["--ns3l"])
    assert (both.lr, both.ns3l_weight, both.pi_weight) == (6e-4, 1.0, 20.0)


# ------------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def pi_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("pi")
    result = run(*TINY, "--runs-dir", runs, "--run-name", "full")
    return result, runs / "full"


def check_run(result, run_dir, tags):
    assert result.returncode == 0, result.stderr
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir))
    found = scalars(run_dir)
    assert tags <= set(found), tags - set(found)
    for tag in tags:
        assert all(math.isfinite(v) for _, v in found[tag]), tag
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["steps"] == 10 and summary["steps_per_second"] > 0
    for key in ("final_valid_error", "final_test_error", "best_valid_error", "test_error_at_best_valid"):
        assert 0.0 <= summary[key] <= 100.0
    return found, summary


BASE_TAGS = {
    "losses/supervised",
    "losses/consistency",
    "losses/total",
    "charts/learning_rate",
    "charts/SPS",
    "charts/unlabeled_weight_ramp",
    "charts/pi_argmax_agreement",
    "eval/valid_error",
    "eval/test_error",
    "eval/test_error_at_best_valid",
}


def test_end_to_end_pi(pi_run):
    result, run_dir = pi_run
    found, summary = check_run(result, run_dir, BASE_TAGS)
    assert "losses/ns3l" not in found
    assert all(v > 0 for _, v in found["losses/consistency"])  # the two passes see different augmentations
    assert summary["args"]["lr"] == 3e-4 and not summary["args"]["ns3l"]
    assert {"args.json", "split.json", "checkpoint.pt"} <= set(os.listdir(run_dir))


def test_end_to_end_pi_ns3l(tmp_path):
    result = run(*TINY, "--runs-dir", tmp_path, "--run-name", "ns3l", "--ns3l")
    tags = BASE_TAGS | {"losses/ns3l", "charts/ns3l_negatives_per_sample", "charts/ns3l_false_negative_rate"}
    found, summary = check_run(result, tmp_path / "ns3l", tags)
    assert all(v > 0 for _, v in found["losses/ns3l"])
    assert (summary["args"]["lr"], summary["args"]["threshold"]) == (6e-4, pytest.approx(0.04))


def test_resume_matches_uninterrupted_run(pi_run, tmp_path):
    _, full_dir = pi_run
    first = run(*TINY_NO_STEPS, "--total-steps", "5", "--runs-dir", tmp_path, "--run-name", "half")
    assert first.returncode == 0, first.stderr
    second = run("--resume", tmp_path / "half", "--total-steps", "10")
    assert second.returncode == 0, second.stderr
    full = torch.load(full_dir / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == full["step"] == 10
    for name, value in full["model"].items():
        assert torch.allclose(value.float(), resumed["model"][name].float(), atol=1e-5), name


# ------------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "flags",
    [
        ["--pi-weight", "-1"],
        ["--threshold", "1.5"],
        ["--lr", "0"],
        ["--depth", "11"],
        ["--dataset", "nope"],
        ["--total-steps", "0"],
        ["--pi-weight", "nan"],
    ],
)
def test_bad_flag_values_rejected(flags, capsys):
    with pytest.raises(SystemExit) as error:
        train_pi.parse_args(flags)
    assert error.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]


def run_main(monkeypatch, capsys, *args):
    """main() in this process as the command line runs it: (exit code, stderr). For failures before any training."""
    monkeypatch.setattr(sys, "argv", ["train_pi.py", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_pi.main()
    return exit_info.value.code, capsys.readouterr().err


def test_bad_inputs_exit_with_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    code, err = run_main(monkeypatch, capsys, *TINY, "--runs-dir", runs, "--num-labeled", "100000")  # impossible split
    assert code != 0 and len(err.strip().splitlines()) == 1 and not runs.exists()
    existing = runs / "taken"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    code, err = run_main(monkeypatch, capsys, *TINY, "--runs-dir", runs, "--run-name", "taken")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "already exists" in err
    assert os.listdir(existing) == ["keep.txt"]
    (existing / "checkpoint.pt").write_bytes(b"not a checkpoint")
    corrupt = run("--resume", existing)  # this one through a real command line
    assert corrupt.returncode != 0 and len(corrupt.stderr.strip().splitlines()) == 1 and "corrupt" in corrupt.stderr
    assert sorted(os.listdir(existing)) == ["checkpoint.pt", "keep.txt"]
