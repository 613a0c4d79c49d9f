"""Tests for train_mixmatch.py: sharpening, mixup, label guessing and the interleaved forward against BatchNorm,
decoupled weight decay, EMA, the lambda_u ramp, the NS3L mask on mixed targets, end-to-end runs, resume, bad inputs."""

import copy
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import refuse_here  # noqa: E402

import train_mixmatch as mm  # noqa: E402
import wrn  # noqa: E402

SCRIPT = os.path.join(ROOT, "train_mixmatch.py")
TINY = [
    "--dataset",
    "synthetic",
    "--depth",
    "10",
    "--width",
    "1",
    "--batch-size",
    "8",
    "--log-every",
    "2",
    "--rampup-steps",
    "4",
    "--torch-deterministic",
    "--no-cuda",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # tiny runs; CI cores are shared


def run_script(args, timeout=120):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT
    )


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tiny_model(bn_momentum=0.001, seed=0):
    torch.manual_seed(seed)
    args = mm.parse_args(["--dataset", "synthetic", "--depth", "10", "--width", "1", "--bn-momentum", str(bn_momentum)])
    return mm.make_model(10, args, 3)


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# --------------------------------------------------------------------------------------------------------- maths
def test_sharpen_matches_hand_computation():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.25, 0.25, 0.5]])
    expected = torch.tensor([[0.36, 0.09, 0.01], [0.0625, 0.0625, 0.25]])
    expected = expected / expected.sum(1, keepdim=True)  # [0.36/0.46, ...], [1/6, 1/6, 2/3]
    torch.testing.assert_close(mm.sharpen(probs, 0.5), expected)
    torch.testing.assert_close(mm.sharpen(probs, 0.5)[1], torch.tensor([1 / 6, 1 / 6, 2 / 3]))
    torch.testing.assert_close(mm.sharpen(probs, 1.0), probs)


def test_mixup_lambda_at_least_half_and_formula():
    torch.manual_seed(0)
    inputs, targets = torch.randn(4000, 1, 2, 2), torch.softmax(torch.randn(4000, 5), 1)
    mixed_x, mixed_y, lam, perm = mm.mixup(inputs, targets, alpha=0.75)
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    assert lam.std() > 0.1  # drawn per row, not one lambda for the batch
    torch.testing.assert_close(mixed_x, lam.view(-1, 1, 1, 1) * inputs + (1 - lam.view(-1, 1, 1, 1)) * inputs[perm])
    torch.testing.assert_close(mixed_y, lam[:, None] * targets + (1 - lam[:, None]) * targets[perm])
    torch.testing.assert_close(mixed_y.sum(1), torch.ones(4000))
    assert sorted(perm.tolist()) == list(range(4000)) and (perm != torch.arange(4000)).any()


def test_label_guess_has_no_gradient_and_leaves_bn_statistics():
    model = tiny_model(bn_momentum=0.5)
    model.train()
    views = [torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16) + 1.0]
    before = bn_buffers(model)
    guessed = mm.guess_labels(model, views, temperature=0.5)
    assert not guessed.requires_grad and guessed.grad_fn is None
    for name, value in bn_buffers(model).items():
        assert torch.equal(value, before[name]), name
    # Each view is its own training-mode pass (its own batch statistics), then mean softmax, then sharpen.
    with torch.no_grad(), wrn.no_bn_update(model):
        expected = mm.sharpen((torch.softmax(model(views[0]), 1) + torch.softmax(model(views[1]), 1)) / 2, 0.5)
        joint = mm.sharpen(torch.softmax(model(torch.cat(views)), 1).view(2, 16, 10).mean(0), 0.5)
    torch.testing.assert_close(guessed, expected)
    assert not torch.allclose(guessed, joint, atol=1e-4)  # one joint pass would share batch statistics
    torch.testing.assert_close(guessed.sum(1), torch.ones(16))


def test_interleave_is_its_own_inverse_and_mixes_chunks():
    chunks = [torch.arange(10) + 100 * i for i in range(3)]
    mixed = mm.interleave(chunks, 10)
    assert mm.interleave_offsets(10, 2) == [0, 3, 6, 10]  # official: the remainder goes to the last groups
    assert mixed[0].tolist() == [0, 1, 2, 103, 104, 105, 206, 207, 208, 209]
    for chunk in mixed:
        assert len({int(v) // 100 for v in chunk}) >= 2  # every chunk holds labeled and unlabeled rows
    for back, original in zip(mm.interleave(mixed, 10), chunks):
        assert torch.equal(back, original)


def test_only_first_interleaved_chunk_updates_bn_statistics():
    model = tiny_model(bn_momentum=1.0)  # momentum 1: the running mean is exactly the last update's batch mean
    model.train()
    torch.manual_seed(1)
    chunks = [torch.randn(12, 3, 16, 16) + shift for shift in (0.0, 2.0, -3.0)]
    counter = model.units[0].bn1.num_batches_tracked.clone()
    logits = mm.interleaved_forward(model, chunks)
    interleaved = mm.interleave(chunks, 12)
    with torch.no_grad():
        first_mean = model.stem(interleaved[0]).mean((0, 2, 3))
        last_mean = model.stem(interleaved[-1]).mean((0, 2, 3))
    running = model.units[0].bn1.running_mean
    torch.testing.assert_close(running, first_mean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(running, last_mean, atol=1e-2)
    assert model.units[0].bn1.num_batches_tracked == counter + 1
    # Logits come back in the original order, each row computed inside its interleaved chunk's batch.
    with torch.no_grad(), wrn.no_bn_update(model):
        expected = mm.interleave([model(c) for c in interleaved], 12)
    for got, want in zip(logits, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert logits[0].requires_grad


def test_weight_decay_touches_conv_and_linear_weights_only():
    model = tiny_model()
    with torch.no_grad():  # non-trivial BN affine and biases so "unchanged" is meaningful
        for name, p in model.named_parameters():
            if not name.endswith("weight") or p.dim() == 1:
                p.uniform_(0.5, 1.5)
    before = copy.deepcopy(model.state_dict())
    mm.decoupled_weight_decay_(model, 0.1)
    decayed = 0
    for module_name, module in model.named_modules():
        for name, tensor in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight":
                torch.testing.assert_close(tensor, before[key] * 0.9)
                decayed += 1
            else:
                assert torch.equal(tensor, before[key]), key
    assert decayed == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for key, value in bn_buffers(model).items():
        assert torch.equal(value, before[key])


def test_ema_update_matches_formula_and_copies_bn_statistics():
    model = tiny_model()
    ema = copy.deepcopy(model)
    old = {k: v.clone() for k, v in ema.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.units[0].bn1.running_mean.add_(3.0)
        model.units[0].bn1.running_var.mul_(2.0)
    mm.ema_update_(ema, model, decay=0.9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(ema.named_parameters())[name], 0.9 * old[name] + 0.1 * p)
    for (name, buffer), ema_buffer in zip(model.named_buffers(), ema.buffers()):
        assert torch.equal(ema_buffer, buffer), name  # official: BN statistics are read from the live model


def test_lambda_u_linear_ramp_and_protocol_defaults():
    assert mm.linear_rampup(0, 16384) == 0.0
    assert mm.linear_rampup(8192, 16384) == 0.5
    assert mm.linear_rampup(16384, 16384) == 1.0
    assert mm.linear_rampup(10**6, 16384) == 1.0
    assert mm.linear_rampup(0, 0) == 1.0
    args = mm.parse_args([])
    assert (
        args.rampup_steps,
        args.lambda_u,
        args.batch_size,
        args.k_augment,
        args.alpha,
        args.temperature,
        args.lr,
        args.weight_decay,
        args.ema_decay,
        args.eval_every,
        args.threshold,
    ) == (16384, 75.0, 64, 2, 0.75, 0.5, 0.002, 0.02, 0.999, 1024, 0.05)
    assert args.ns3l_weight == 5.0 and args.num_labeled == 250 and args.total_steps == 307_200
    assert mm.parse_args(["--num-labeled", "4000"]).ns3l_weight == 10.0
    for dataset, lambda_u, weight, stages in (("svhn", 250, 2, 3), ("stl10", 50, 2, 4), ("cifar100", 150, 2, 3)):
        a = mm.parse_args(["--dataset", dataset])
        assert (a.lambda_u, a.ns3l_weight, a.num_stages) == (lambda_u, weight, stages), dataset


def test_ns3l_mask_built_from_mixed_targets():
    one_hot = torch.eye(4)[[0, 1, 2]]
    guessed = torch.tensor([[0.7, 0.26, 0.03, 0.01]])
    targets = torch.cat([one_hot, guessed])
    torch.manual_seed(0)
    _, mixed, lam, perm = mm.mixup(torch.zeros(4, 1, 1, 1), targets, 0.75)
    negatives = mm.ns3l_negatives(mixed, 0.05)
    assert torch.equal(negatives, mixed < 0.05)
    for i in range(4):  # the classes present in either mixed-in target (with weight >= T) are never negatives
        present = (lam[i] * targets[i] >= 0.05) | ((1 - lam[i]) * targets[perm[i]] >= 0.05)
        assert torch.equal(negatives[i], ~present)
    # A hand example: mixing classes 0 and 1 with lambda' = 0.7 leaves 2 and 3 as negatives.
    hand = mm.ns3l_negatives(0.7 * torch.eye(4)[0:1] + 0.3 * torch.eye(4)[1:2], 0.05)
    assert hand.tolist() == [[False, False, True, True]]
    assert mm.ns3l_negatives(torch.tensor([[0.05, 0.95, 0.0]]), 0.05).tolist() == [[False, False, True]]  # strict <
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    p = torch.softmax(logits, 1)[0]
    torch.testing.assert_close(mm.ns3l_loss(logits, hand), -torch.log(1 - p[2] - p[3]))


# ---------------------------------------------------------------------------------------------------- end to end
COMMON_TAGS = {
    "losses/xe",
    "losses/l2u",
    "losses/total",
    "charts/SPS",
    "charts/learning_rate",
    "charts/lambda_u",
    "charts/guess_accuracy",
    "eval/test_error",
    "eval/valid_error",
    "eval/median_last20_test_error",
    "eval/test_error_raw",
}
SUMMARY_KEYS = {
    "steps",
    "steps_per_second",
    "final_valid_error",
    "final_test_error",
    "best_valid_error",
    "test_error_at_best_valid",
    "median_last20_test_error",
    "args",
}


def check_run(run_dir, steps, ns3l):
    scalars = read_scalars(run_dir)
    expected = COMMON_TAGS | ({"losses/ns3l", "charts/ns3l_negatives_per_sample"} if ns3l else set())
    assert expected <= set(scalars), expected - set(scalars)
    if not ns3l:
        assert "losses/ns3l" not in scalars
    for tag, values in scalars.items():
        assert all(math.isfinite(v) for v in values), tag
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == steps and summary["args"]["ns3l"] == ns3l
    tests = scalars["eval/test_error"]
    assert summary["median_last20_test_error"] == pytest.approx(statistics.median(tests[-20:]))
    for key in ("final_test_error", "test_error_at_best_valid", "median_last20_test_error"):
        assert 0.0 <= summary[key] <= 100.0
    return scalars, summary


def test_end_to_end_mixmatch(tmp_path):
    result = run_script(
        TINY + ["--total-steps", "4", "--eval-every", "2", "--runs-dir", str(tmp_path), "--run-name", "mm"]
    )
    assert result.returncode == 0, result.stderr
    scalars, _ = check_run(tmp_path / "mm", 4, ns3l=False)
    assert len(scalars["eval/test_error"]) == 2
    assert scalars["charts/lambda_u"][-1] == pytest.approx(75.0 * 3 / 4)  # ramp at step index 3 of 4


def test_end_to_end_ns3l_and_resume_restores_ema(tmp_path):
    args = TINY + ["--ns3l", "--eval-every", "2", "--runs-dir", str(tmp_path)]
    straight = run_script(args + ["--total-steps", "4", "--run-name", "straight"])
    assert straight.returncode == 0, straight.stderr
    check_run(tmp_path / "straight", 4, ns3l=True)
    first = run_script(args + ["--total-steps", "2", "--run-name", "resumed"])
    assert first.returncode == 0, first.stderr
    second = run_script(["--resume", str(tmp_path / "resumed"), "--total-steps", "4", "--no-cuda"])
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout
    scalars, _ = check_run(tmp_path / "resumed", 4, ns3l=True)
    assert len(scalars["eval/test_error"]) == 2  # evaluations of both legs, median over both
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    differs = False
    for name, value in a["ema_model"].items():
        torch.testing.assert_close(b["ema_model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        differs |= value.dtype.is_floating_point and not torch.allclose(value, a["model"][name])
    assert differs  # the EMA model is not the live model, so restoring it is what made them agree
    torch.testing.assert_close(b["model"], a["model"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "argv",
    [
        ["--threshold", "1.5"],
        ["--threshold", "0"],
        ["--alpha", "0"],
        ["--temperature", "-1"],
        ["--k-augment", "0"],
        ["--batch-size", "2"],
        ["--ema-decay", "1.0"],
        ["--weight-decay", "-0.1"],
        ["--lambda-u", "-1"],
        ["--rampup-steps", "-5"],
        ["--depth", "12"],
        ["--dataset", "imagenet"],
        ["--total-steps", "0"],
        ["--lr", "0"],
        ["--bn-momentum", "0"],
        ["--ns3l-weight", "-2"],
        ["--num-stages", "0"],
    ],
)
def test_bad_flags_rejected_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        mm.parse_args(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]


def test_bad_inputs_write_nothing(tmp_path):
    runs = tmp_path / "runs"
    bad = refuse_here("train_mixmatch.py", *TINY + ["--alpha", "-1", "--runs-dir", str(runs), "--run-name", "x"])
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--alpha" in bad.stderr
    missing = refuse_here(
        "train_mixmatch.py", *TINY + ["--dataset", str(tmp_path / "nope.npz"), "--runs-dir", str(runs)]
    )
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert not runs.exists()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = refuse_here("train_mixmatch.py", *["--resume", str(corrupt)])
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and "corrupt" in result.stderr
    assert sorted(os.listdir(corrupt)) == ["checkpoint.pt"]
    assert (corrupt / "checkpoint.pt").read_bytes() == b"not a checkpoint"
