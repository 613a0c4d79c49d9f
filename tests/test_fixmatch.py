"""Tests for train_fixmatch.py: the cosine LR, the masked pseudo-label loss and NS3L's negatives against hand
computations, the L2 term on kernels only and the Nesterov update against TF's formula, the EMA, the one joint pass
of [labeled; weak; strong] and its BatchNorm statistics, the strong view's pipeline, the defaults, end-to-end runs
(outputs inspected), resume, bad inputs."""

import copy
import json
import math
import os
import statistics
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import read_scalars, refuse_here, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import train_fixmatch as fm  # noqa: E402
import wrn  # noqa: E402

TINY = [
    "--dataset",
    "synthetic",
    "--depth",
    "10",
    "--width",
    "1",
    "--batch-size",
    "4",
    "--uratio",
    "2",
    "--bn-momentum",
    "0.1",
    "--log-every",
    "2",
    "--torch-deterministic",
    "--no-cuda",
]


def tiny_model(bn_momentum=0.1, seed=0):
    torch.manual_seed(seed)
    args = fm.parse_args(["--dataset", "synthetic", "--depth", "10", "--width", "1", "--bn-momentum", str(bn_momentum)])
    args.num_stages = 3
    return fm.make_model(10, args, 3)


# --------------------------------------------------------------------------------------------------------- maths
def test_cosine_lr_is_the_official_seven_sixteenths_cosine():
    assert fm.cosine_lr(0.03, 0, 1000) == pytest.approx(0.03)
    assert fm.cosine_lr(0.03, 500, 1000) == pytest.approx(0.03 * math.cos(7 * math.pi / 32))
    assert fm.cosine_lr(0.03, 1000, 1000) == pytest.approx(0.03 * 0.19509032201612825)  # cos(7 pi / 16)
    assert fm.cosine_lr(0.03, 5000, 1000) == pytest.approx(0.03 * 0.19509032201612825)  # clipped at the end


def test_fixmatch_losses_match_a_hand_computation():
    logits_x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    logits_weak = torch.tensor([[5.0, 0.0, 0.0], [0.5, 0.4, 0.0], [0.0, 0.0, 4.0]])
    logits_strong = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    p_weak = torch.softmax(logits_weak, 1)
    confidence = float(p_weak[2].max())  # row 2 sits exactly at the threshold: >= keeps it
    loss_xe, loss_xeu, probs, pseudo, mask = fm.fixmatch_losses(
        logits_x, labels, logits_weak, logits_strong, confidence
    )
    xe = -(math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(1 / (2 + math.e))) / 2
    assert float(loss_xe) == pytest.approx(xe, rel=1e-6)
    assert pseudo.tolist() == [0, 0, 2] and mask.tolist() == [1.0, 0.0, 1.0]
    # rows 0 and 2 count, row 1 (max probability 0.37) is masked out; the mean is over all three rows
    row0 = -math.log(math.e / (math.e + math.e**2 + 1))
    row2 = -math.log(1 / 3)
    assert float(loss_xeu) == pytest.approx((row0 + row2) / 3, rel=1e-6)
    torch.testing.assert_close(probs, p_weak)


def test_pseudo_label_is_detached_and_the_gradient_reaches_the_strong_view_only():
    logits_weak = torch.tensor([[5.0, 0.0, 0.0], [0.0, 6.0, 0.0]], requires_grad=True)
    logits_strong = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    _, loss_xeu, probs, _, _ = fm.fixmatch_losses(torch.zeros(1, 3), torch.tensor([0]), logits_weak, logits_strong, 0.9)
    assert not probs.requires_grad
    loss_xeu.backward()
    assert logits_weak.grad is None
    expected = (torch.softmax(logits_strong.detach(), 1) - torch.eye(3)[[0, 1]]) / 2  # d mean CE / d logits
    torch.testing.assert_close(logits_strong.grad, expected)


def test_ns3l_negatives_come_from_the_weak_view_and_the_loss_matches_by_hand():
    probs_weak = torch.softmax(torch.tensor([[2.0, 1.5, -3.0, -3.0], [0.0, 0.0, 0.0, 0.0]]), 1)
    negatives = fm.ns3l_negatives(probs_weak, 0.5 / 4)
    assert negatives.tolist() == [[False, False, True, True], [False, False, False, False]]  # 0.25 is not < 0.125
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 1.0, 2.0, 3.0]])
    p = torch.softmax(logits, 1)
    by_hand = (-torch.log(1 - p[0, 2] - p[0, 3]) + 0.0) / 2  # a row without negatives adds -log 1 = 0
    torch.testing.assert_close(fm.ns3l_loss(logits, negatives), by_hand)
    everything = torch.ones(1, 4, dtype=torch.bool)  # all classes negative: clamped at -log 1e-8, never inf
    assert float(fm.ns3l_loss(logits[:1], everything)) == pytest.approx(-math.log(1e-8), rel=1e-5)


def test_hidden_label_stats_by_hand():
    y = torch.tensor([0, 1, 2, -1])
    pseudo = torch.tensor([0, 2, 2, 1])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    negatives = torch.tensor([[False, True, True], [True, False, True], [False, False, True], [True, True, False]])
    stats = fm.hidden_label_stats(y, pseudo, mask, negatives)
    assert float(stats["charts/mask_rate"]) == 0.75
    assert float(stats["charts/pseudo_label_accuracy"]) == 0.5  # masked and known: rows 0 (right) and 1 (wrong)
    assert float(stats["charts/pseudo_label_accuracy_all"]) == pytest.approx(2 / 3)  # rows 0, 2 right of 0, 1, 2
    assert float(stats["charts/ns3l_negatives_per_sample"]) == pytest.approx(7 / 4)
    assert float(stats["charts/ns3l_false_negative_rate"]) == pytest.approx(1 / 3)  # row 2's class 2 is a negative
    assert "charts/ns3l_negatives_per_sample" not in fm.hidden_label_stats(y, pseudo, mask)


def test_l2_term_on_kernels_only_and_nesterov_matches_tf():
    """SGD(momentum 0.9, nesterov, weight_decay on kernels) = TF's MomentumOptimizer(use_nesterov=True) on the loss
    + wd sum 1/2 ||w||^2 over conv / dense kernels: accum <- 0.9 accum + g; w <- w - lr (g + 0.9 accum)."""
    model = tiny_model()
    groups = fm.optimizer_groups(model, 5e-4)
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in groups[0]["params"]} == kernels and groups[0]["weight_decay"] == 5e-4
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == len(list(model.parameters())) - len(kernels)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(groups, lr=0.03, momentum=0.9, nesterov=True)
    x = torch.randn(8, 3, 16, 16)
    accum = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for lr in (0.03, 0.02):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        reference.zero_grad()
        l2 = sum(0.5 * m.weight.square().sum() for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        (reference(x).square().mean() + 5e-4 * l2).backward()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                accum[name] = 0.9 * accum[name] + p.grad
                p -= lr * (p.grad + 0.9 * accum[name])
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_ema_update_matches_formula_and_copies_bn_statistics():
    model = tiny_model()
    ema = copy.deepcopy(model)
    old = {k: v.clone() for k, v in ema.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.units[0].bn1.running_mean.add_(3.0)
    fm.ema_update_(ema, model, decay=0.999)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(ema.named_parameters())[name], 0.999 * old[name] + 0.001 * p)
    for (name, buffer), ema_buffer in zip(model.named_buffers(), ema.buffers()):
        assert torch.equal(ema_buffer, buffer), name


def test_pad_images_pads_black_around_the_centre():
    images = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    padded = common.pad_images(images, 32)
    assert padded.shape == (2, 1, 32, 32) and padded.dtype == torch.uint8
    assert torch.equal(padded[:, :, 2:30, 2:30], images)
    assert int(padded.sum()) == 200 * 2 * 28 * 28  # the 2-px border is 0
    assert common.pad_images(images, 28) is images and common.pad_images(images, 0) is images


def test_grid_test_errors_keep_the_grid_and_the_end():
    evaluations = [(2, 10.0), (4, 20.0), (5, 90.0), (6, 30.0), (8, 40.0)]
    assert fm.grid_test_errors(evaluations, 2, 8) == [10.0, 20.0, 30.0, 40.0]  # 5 was an old leg's end


# ------------------------------------------------------------------------------------------------------- defaults
def test_official_defaults_and_the_data_sets_rows():
    a = fm.parse_args([])
    assert (a.batch_size, a.uratio, a.confidence, a.lambda_u, a.lr, a.weight_decay, a.ema_decay) == (
        64,
        7,
        0.95,
        1.0,
        0.03,
        5e-4,
        0.999,
    )
    assert (a.total_steps, a.eval_every, a.median_of, a.num_labeled, a.num_valid) == (1 << 20, 1024, 20, 250, 1)
    assert (a.depth, a.width, a.bn_momentum, a.threshold, a.ns3l_weight, a.ns3l_view) == (
        28,
        2,
        0.001,
        0.05,
        1.0,
        "strong",
    )
    assert (a.randaugment_ops, a.randaugment_magnitude, a.exclude_labeled, a.pad_to) == (2, 10, False, 0)
    c100 = fm.parse_args(["--dataset", "cifar100"])
    assert (c100.width, c100.weight_decay, c100.threshold, c100.num_labeled) == (8, 1e-3, 0.005, 10000)
    assert fm.parse_args(["--dataset", "cifar100", "--width", "2"]).width == 2  # the narrow net is one flag away
    assert fm.parse_args(["--dataset", "fashion_mnist"]).pad_to == 32
    digits = fm.parse_args(["--dataset", "digits"])
    assert (digits.total_steps, digits.eval_every, digits.depth, digits.batch_size, digits.ema_decay) == (
        2000,
        20,
        10,
        32,
        0.99,
    )  # 1,000 steps had not converged with 30 labels (2026-12-06)
    # what only the (padded) image size decides: the crop padding and the official scales = log2(size) - 2
    assert fm.parse_args(["--dataset", "stl10"]).num_stages == 4  # the paper's WRN-37-2; the code's rule says 5
    for size, shift, stages in ((32, 4, 3), (28, 4, 3), (96, 12, 5), (8, 1, 1)):  # ilog2 rounds up (libml/utils.py)
        r = fm.resolve_defaults(fm.parse_args([]), "cifar10", 10, size)
        assert (r.shift, r.num_stages) == (shift, stages), size


# ------------------------------------------------------------------------------------------------ one joint pass
@pytest.fixture
def spy(monkeypatch):
    records, forward = [], wrn.WideResNet.forward

    def recording_forward(self, x):
        out = forward(self, x)
        records.append(dict(training=self.training, batch=len(x), input=x.detach().clone(), out_dtype=out.dtype))
        return out

    monkeypatch.setattr(wrn.WideResNet, "forward", recording_forward)
    yield records
    torch.use_deterministic_algorithms(False)


def run_main(monkeypatch, tmp_path, *argv, name="run"):
    monkeypatch.setattr(
        sys, "argv", ["train_fixmatch.py", *TINY, "--runs-dir", str(tmp_path), "--run-name", name, *argv]
    )
    fm.main()
    with open(tmp_path / name / "summary.json") as f:
        summary = json.load(f)
    with open(tmp_path / name / "split.json") as f:
        split = json.load(f)
    return summary, split


def test_one_training_pass_per_step_over_labeled_weak_and_strong(monkeypatch, tmp_path, spy):
    calls = []
    rand_augment = common.rand_augment

    def recording(images, *args, **kwargs):
        out = rand_augment(images, *args, **kwargs)
        calls.append((images.clone(), out, args, kwargs))
        return out

    monkeypatch.setattr(common, "rand_augment", recording)
    summary, split = run_main(monkeypatch, tmp_path, "--total-steps", "3", "--eval-every", "3")
    training = [r for r in spy if r["training"]]
    assert [r["batch"] for r in training] == [4 + 2 * 8] * 3  # one pass of 4 labeled + 8 weak + 8 strong per step
    assert len(calls) == 3
    for images, out, args, kwargs in calls:
        assert images.dtype == out.dtype == torch.uint8 and images.shape == (8, 3, 16, 16)
        assert args == (2, 10) and kwargs == {"probability": 0.5, "cutout": 8}  # 2 ops, levels 1..9, Cutout 16 / 32
    # the strong rows of the pass are the normalised RandAugment output; the weak rows are not the same images
    first = training[0]["input"]
    torch.testing.assert_close(first[12:], calls[0][1].float() / 127.5 - 1.0)
    assert not torch.equal(first[4:12], first[12:])
    # official split: every labeled image is in the unlabeled stream
    assert split["labeled_in_unlabeled"] is True and set(split["labeled"]) <= set(split["unlabeled"])
    assert summary["median_of"] == 20 and 0.0 <= summary["median_test_error"] <= 100.0


def test_the_joint_pass_updates_bn_with_the_whole_batch():
    model = tiny_model(bn_momentum=1.0)  # momentum 1: the running mean is the last batch's mean
    model.train()
    x, weak, strong = torch.randn(4, 3, 16, 16), torch.randn(8, 3, 16, 16) + 2.0, torch.randn(8, 3, 16, 16) - 3.0
    model(torch.cat([x, weak, strong]))
    with torch.no_grad():
        joint_mean = model.stem(torch.cat([x, weak, strong])).mean((0, 2, 3))
    torch.testing.assert_close(model.units[0].bn1.running_mean, joint_mean, rtol=1e-4, atol=1e-5)


def test_exclude_labeled_makes_the_split_disjoint(monkeypatch, tmp_path, spy):
    _, split = run_main(monkeypatch, tmp_path, "--total-steps", "1", "--eval-every", "1", "--exclude-labeled")
    assert split["labeled_in_unlabeled"] is False and not set(split["labeled"]) & set(split["unlabeled"])


def test_bf16_channels_last_training_with_fp32_evaluation(monkeypatch, tmp_path, spy):
    summary, _ = run_main(
        monkeypatch, tmp_path, "--bf16", "--channels-last", "--ns3l", "--total-steps", "2", "--eval-every", "2"
    )
    training = [r for r in spy if r["training"]]
    evaluation = [r for r in spy if not r["training"]]
    assert training and all(r["out_dtype"] == torch.bfloat16 for r in training)
    assert all(r["input"].is_contiguous(memory_format=torch.channels_last) for r in training)
    assert evaluation and all(r["out_dtype"] == torch.float32 for r in evaluation)
    assert math.isfinite(summary["final_test_error"])


def test_ns3l_view_weak_changes_the_run(monkeypatch, tmp_path, spy):
    run_main(monkeypatch, tmp_path, "--ns3l", "--total-steps", "2", "--eval-every", "2", name="strong")
    run_main(
        monkeypatch, tmp_path, "--ns3l", "--ns3l-view", "weak", "--total-steps", "2", "--eval-every", "2", name="w"
    )
    a = torch.load(tmp_path / "strong" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # same seed, another loss


# ---------------------------------------------------------------------------------------------------- end to end
TAGS = {
    "losses/xe",
    "losses/xeu",
    "losses/total",
    "charts/SPS",
    "charts/learning_rate",
    "charts/mask_rate",
    "charts/pseudo_label_accuracy",
    "charts/pseudo_label_accuracy_all",
    "eval/test_error",
    "eval/valid_error",
    "eval/test_error_raw",
    "eval/median_test_error",
}
NS3L_TAGS = {"losses/ns3l", "charts/ns3l_negatives_per_sample", "charts/ns3l_false_negative_rate"}


def check_run(run_dir, steps, ns3l, median_of=20):
    scalars = {tag: [v for _, v in values] for tag, values in read_scalars(run_dir).items()}
    assert TAGS | (NS3L_TAGS if ns3l else set()) <= set(scalars), (TAGS | NS3L_TAGS) - set(scalars)
    assert ns3l or not NS3L_TAGS & set(scalars)
    for tag, values in scalars.items():
        assert all(math.isfinite(v) for v in values), tag
    for tag in ("charts/mask_rate", "charts/pseudo_label_accuracy", "charts/ns3l_false_negative_rate"):
        assert all(0.0 <= v <= 1.0 for v in scalars.get(tag, [])), tag
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == steps and summary["args"]["ns3l"] == ns3l
    tests = scalars["eval/test_error"]
    assert summary["median_test_error"] == pytest.approx(statistics.median(tests[-median_of:]))
    valids = scalars["eval/valid_error"]  # the number settings are selected on: the same evaluations, validation set
    assert summary["median_valid_error"] == pytest.approx(statistics.median(valids[-median_of:]))
    return scalars, summary


def test_end_to_end_lr_schedule_and_median(tmp_path):
    result = run_script(
        "train_fixmatch.py",
        *TINY,
        "--total-steps",
        "6",
        "--eval-every",
        "2",
        "--median-of",
        "2",
        "--runs-dir",
        tmp_path,
        "--run-name",
        "fm",
    )
    assert result.returncode == 0, result.stderr
    scalars, summary = check_run(tmp_path / "fm", 6, ns3l=False, median_of=2)
    assert len(scalars["eval/test_error"]) == 3
    assert summary["median_test_error"] == pytest.approx(statistics.median(scalars["eval/test_error"][-2:]))
    # logged LR at steps 2, 4, 6 is the LR of step indices 1, 3, 5
    expected = [fm.cosine_lr(0.03, k, 6) for k in (1, 3, 5)]
    assert scalars["charts/learning_rate"] == pytest.approx(expected, rel=1e-6)
    assert "median of the last 2 EMA test errors" in result.stdout


def test_end_to_end_ns3l_and_an_interrupted_run_resumes_exactly(monkeypatch, tmp_path, capsys):
    args = [*TINY, "--ns3l", "--eval-every", "2", "--total-steps", "4", "--runs-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["train_fixmatch.py", *args, "--run-name", "straight"])
    fm.main()  # every leg in this process: the same threads, so the same summation order
    check_run(tmp_path / "straight", 4, ns3l=True)
    # The same run stopped after step 2 (--stop-at: a checkpoint, no summary), then resumed: the legs equal the run.
    monkeypatch.setattr(sys, "argv", ["train_fixmatch.py", *args, "--run-name", "resumed", "--stop-at", "2"])
    fm.main()
    assert "stopped at step 2 of 4; continue with" in capsys.readouterr().out
    assert not (tmp_path / "resumed" / "summary.json").exists()
    monkeypatch.setattr(sys, "argv", ["train_fixmatch.py", "--resume", str(tmp_path / "resumed"), "--no-cuda"])
    fm.main()
    torch.use_deterministic_algorithms(False)
    assert "resumed" in capsys.readouterr().out
    scalars, _ = check_run(tmp_path / "resumed", 4, ns3l=True)
    assert len(scalars["eval/test_error"]) == 2
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema_model"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert b["optimizer"]["state"]
    # The evaluation record: the same steps, and the same test errors (a flat list: pytest.approx takes no pairs).
    assert [step for step, _ in b["evaluations"]] == [step for step, _ in a["evaluations"]] == [2, 4]
    assert [error for _, error in b["evaluations"]] == pytest.approx([error for _, error in a["evaluations"]])
    assert [step for step, _ in b["valid_evaluations"]] == [2, 4]  # the validation record survives the stop too
    assert [e for _, e in b["valid_evaluations"]] == pytest.approx([e for _, e in a["valid_evaluations"]])


# ----------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "argv",
    [
        ["--confidence", "1.5"],
        ["--threshold", "0"],
        ["--uratio", "0"],
        ["--lambda-u", "-1"],
        ["--randaugment-magnitude", "1"],
        ["--ns3l-view", "both"],
        ["--median-of", "0"],
        ["--weight-decay", "-1"],
        ["--ema-decay", "1"],
        ["--dataset", "imagenet"],
    ],
)
def test_bad_flags_rejected_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        fm.parse_args(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and (argv[0] in err[0] or "unknown data set" in err[0])


def test_bad_inputs_write_nothing_and_keep_what_is_on_disk(tmp_path):
    runs = tmp_path / "runs"
    missing = refuse_here("train_fixmatch.py", *TINY, "--dataset", tmp_path / "nope.npz", "--runs-dir", runs)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    cutout = refuse_here("train_fixmatch.py", *TINY, "--cutout", "40", "--runs-dir", runs)
    assert cutout.returncode == 1 and "--cutout 40" in cutout.stderr and len(cutout.stderr.strip().splitlines()) == 1
    assert not runs.exists()
    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "keep.txt").write_text("mine")
    taken = refuse_here("train_fixmatch.py", *TINY, "--runs-dir", runs, "--run-name", "taken", "--total-steps", "1")
    assert taken.returncode == 1 and len(taken.stderr.strip().splitlines()) == 1
    assert os.listdir(runs / "taken") == ["keep.txt"] and (runs / "taken" / "keep.txt").read_text() == "mine"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = refuse_here("train_fixmatch.py", "--resume", corrupt)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and "corrupt" in result.stderr
    assert (corrupt / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    finished = run_script("train_fixmatch.py", *TINY, "--runs-dir", runs, "--run-name", "done", "--total-steps", "1")
    assert finished.returncode == 0, finished.stderr
    again = refuse_here("train_fixmatch.py", "--resume", runs / "done", "--no-cuda")
    assert again.returncode == 1 and "already finished" in again.stderr


def test_help_names_the_official_sources(capsys):
    with pytest.raises(SystemExit):
        fm.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "WRN-28-8" in out and "ab_fixmatch_ra.py" in out and "(default: None)" not in out


def test_module_loss_helpers_use_float32_on_bf16_logits():
    logits = torch.randn(4, 10).bfloat16()
    loss_xe, loss_xeu, probs, _, _ = fm.fixmatch_losses(logits[:2], torch.tensor([1, 2]), logits, logits, 0.0)
    assert loss_xe.dtype == loss_xeu.dtype == probs.dtype == torch.float32
    assert fm.ns3l_loss(logits, probs < 0.05).dtype == torch.float32
    assert float(loss_xeu) == pytest.approx(float(F.cross_entropy(logits.float(), probs.argmax(1))), rel=1e-5)
