"""Tests for train_freematch.py: the self-adaptive thresholds and the fairness term against hand computations and
against USB's own code (transcribed), NS3L's class-adaptive negatives, weight decay on weights only, the one joint
pass of [labeled; weak; strong], USB's defaults, end-to-end runs (tags inspected), an interrupted run resumed
bit-exactly, bad inputs."""

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import read_scalars, refuse_here, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import train_freematch as fm  # noqa: E402
import wrn  # noqa: E402

TINY = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--batch-size", "4", "--uratio", "2"]
TINY += ["--bn-momentum", "0.1", "--log-every", "2", "--torch-deterministic", "--no-cuda"]


def state(time_p, p_model, label_hist):
    return {"time_p": torch.tensor(time_p), "p_model": torch.tensor(p_model), "label_hist": torch.tensor(label_hist)}


def test_threshold_updates_and_mask_match_a_hand_computation():
    s = fm.initial_thresholds(3, "cpu")
    assert float(s["time_p"]) == pytest.approx(1 / 3) and torch.allclose(s["p_model"], torch.full((3,), 1 / 3))
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    new = fm.update_thresholds(s, probs, momentum=0.9)
    # time_p = 0.9 / 3 + 0.1 x mean(0.7, 0.8, 0.6, 0.4) = 0.3 + 0.0625
    assert float(new["time_p"]) == pytest.approx(0.3625)
    # p_model = 0.9 / 3 + 0.1 x column means (0.425, 0.4, 0.175)
    assert new["p_model"].tolist() == pytest.approx([0.3425, 0.34, 0.3175])
    # argmax: 0, 1, 0, 2 -> histogram (0.5, 0.25, 0.25)
    assert new["label_hist"].tolist() == pytest.approx([0.35, 0.325, 0.325])
    # local thresholds: time_p x p_model / max(p_model) = 0.3625 x (1, 0.34 / 0.3425, 0.3175 / 0.3425)
    local = fm.local_thresholds(new)
    assert local.tolist() == pytest.approx([0.3625, 0.3625 * 0.34 / 0.3425, 0.3625 * 0.3175 / 0.3425])
    # mask: 0.7 >= 0.3625, 0.8 >= 0.3598, 0.6 >= 0.3625, 0.4 >= 0.3360
    assert fm.freematch_mask(probs, new).tolist() == [1.0, 1.0, 1.0, 1.0]
    high = state(0.75, [0.5, 0.25, 0.25], [1 / 3] * 3)  # local (0.75, 0.375, 0.375)
    assert fm.freematch_mask(probs, high).tolist() == [0.0, 1.0, 0.0, 1.0]
    clipped = fm.update_thresholds(state(0.99, [1 / 3] * 3, [1 / 3] * 3), probs, momentum=0.9, clip=True)
    assert float(clipped["time_p"]) == pytest.approx(0.95)  # SVHN's clip_thresh


def usb_entropy_loss(mask, logits_s, prob_model, label_hist):
    """semilearn/algorithms/freematch/freematch.py:16-44, as written there (indexing the masked rows)."""

    def replace_inf_to_zero(val):
        val[val == float("inf")] = 0.0
        return val

    mask = mask.bool()
    logits_s = logits_s[mask]
    prob_s = logits_s.softmax(dim=-1)
    _, pred_label_s = torch.max(prob_s, dim=-1)
    hist_s = torch.bincount(pred_label_s, minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()
    prob_model = prob_model.reshape(1, -1)
    label_hist = label_hist.reshape(1, -1)
    prob_model_scaler = replace_inf_to_zero(1 / label_hist).detach()
    mod_prob_model = prob_model * prob_model_scaler
    mod_prob_model = mod_prob_model / mod_prob_model.sum(dim=-1, keepdim=True)
    mean_prob_scaler_s = replace_inf_to_zero(1 / hist_s).detach()
    mod_mean_prob_s = prob_s.mean(dim=0, keepdim=True) * mean_prob_scaler_s
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum(dim=-1, keepdim=True)
    loss = mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)
    return loss.sum(dim=1).mean()


def test_fairness_loss_equals_usbs_code_and_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(12, 5, generator=generator) * 3
        mask = (torch.rand(12, generator=generator) < 0.6).float()
        mask[trial % 12] = 1.0
        p_model = torch.softmax(torch.randn(5, generator=generator), 0)
        label_hist = torch.softmax(torch.randn(5, generator=generator), 0)
        ours, theirs = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        mine = fm.fairness_loss(mask, ours, p_model, label_hist)
        usb = usb_entropy_loss(mask, theirs, p_model, label_hist)
        assert mine.item() == pytest.approx(usb.item(), rel=1e-5, abs=1e-6)
        mine.backward()
        usb.backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    # by hand: two masked rows, both predicted class 0 -> hbar = (1, 0), pbar = (0.8, 0.2) scaled to (0.8, 0) -> (1, 0)
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.1, 0.9]]))
    loss = fm.fairness_loss(torch.tensor([1.0, 1.0, 0.0]), logits, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    assert float(loss) == pytest.approx(0.5 * math.log(1 + 1e-12) + 0.5 * math.log(1e-12))
    # no masked row: 0, and a finite (zero) gradient
    logits = torch.randn(4, 3, requires_grad=True)
    loss = fm.fairness_loss(torch.zeros(4), logits, torch.full((3,), 1 / 3), torch.full((3,), 1 / 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(4, 3))


def test_freematch_losses_update_first_then_mask_and_the_pseudo_label_is_detached():
    logits_x, labels = torch.randn(2, 3), torch.tensor([0, 2])
    logits_weak = torch.randn(4, 3, requires_grad=True)
    logits_strong = torch.randn(4, 3, requires_grad=True)
    s = fm.initial_thresholds(3, "cpu")
    loss_xe, loss_xeu, loss_fair, probs, pseudo, mask, new = fm.freematch_losses(
        logits_x, labels, logits_weak, logits_strong, s, 0.999, False
    )
    expected_state = fm.update_thresholds(s, torch.softmax(logits_weak.detach(), 1), 0.999)
    assert float(new["time_p"]) == pytest.approx(float(expected_state["time_p"]))
    assert torch.equal(mask, fm.freematch_mask(probs, expected_state))  # the mask uses this batch's update
    expected = (F.cross_entropy(logits_strong, logits_weak.argmax(1), reduction="none") * mask).mean()
    assert loss_xeu.item() == pytest.approx(expected.item())
    assert float(loss_xe) == pytest.approx(float(F.cross_entropy(logits_x, labels)))
    (loss_xeu + loss_fair).backward()
    assert logits_weak.grad is None and logits_strong.grad is not None


def test_ns3l_class_adaptive_negatives_by_hand():
    probs = torch.tensor([[0.02, 0.9, 0.08], [0.3, 0.3, 0.4]])
    fixed = fm.ns3l_negatives(probs, 0.5 / 3)
    assert fixed.tolist() == [[True, False, True], [False, False, False]]
    s = state(0.5, [0.1, 0.6, 0.3], [1 / 3] * 3)  # T_k = (0.5 / 3) x 3 x p_model = (0.05, 0.3, 0.15)
    adaptive = fm.ns3l_negatives(probs, 0.5 / 3, s)
    assert adaptive.tolist() == [[True, False, True], [False, False, False]]
    assert fm.ns3l_negatives(torch.tensor([[0.06, 0.29, 0.65]]), 0.5 / 3, s).tolist() == [[False, True, False]]


def test_weight_decay_on_conv_and_dense_weights_only():
    model = wrn.WideResNet(10, 10, 1, 3)
    decay, no_decay = fm.optimizer_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {
        id(m.weight) for m in model.modules() if hasattr(m, "weight") and m.weight.ndim > 1
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_usbs_defaults_per_data_set():
    args = fm.parse_args(["--dataset", "cifar10"])
    assert (args.num_labeled, args.num_valid, args.total_steps, args.eval_every) == (40, 0, 1 << 20, 5120)
    assert (args.batch_size, args.uratio, args.lr, args.weight_decay, args.ema_decay) == (64, 7, 0.03, 5e-4, 0.999)
    assert (args.fairness_weight, args.ema_p, args.lambda_u, args.randaugment_ops) == (0.001, 0.999, 1.0, 3)
    assert (args.depth, args.width, args.clip_threshold, args.threshold) == (28, 2, False, 0.05)
    assert fm.parse_args(["--dataset", "svhn"]).clip_threshold is True
    assert fm.parse_args(["--dataset", "svhn", "--no-clip-threshold"]).clip_threshold is False
    c100 = fm.parse_args(["--dataset", "cifar100"])
    assert (c100.num_labeled, c100.weight_decay, c100.width, c100.threshold) == (400, 1e-3, 2, 0.005)
    assert fm.parse_args(["--dataset", "stl10"]).num_stages == 4
    assert fm.parse_args(["--strong-augment", "fixmatch"]).randaugment_ops == 2
    assert fm.resolve_defaults(fm.parse_args([]), "cifar10", 10, 96).shift == 12  # int(96 x 0.125)


@pytest.fixture
def spy(monkeypatch):
    records, forward = [], wrn.WideResNet.forward

    def recording_forward(self, x):
        out = forward(self, x)
        records.append(dict(training=self.training, batch=len(x), input=x.detach().clone()))
        return out

    monkeypatch.setattr(wrn.WideResNet, "forward", recording_forward)
    yield records
    torch.use_deterministic_algorithms(False)


def test_one_joint_pass_per_step_with_usbs_strong_view(monkeypatch, tmp_path, spy):
    calls = []
    usb = common.usb_rand_augment

    def recording(images, *args, **kwargs):
        out = usb(images, *args, **kwargs)
        calls.append((images, out, args))
        return out

    monkeypatch.setattr(common, "usb_rand_augment", recording)
    argv = [*TINY, "--total-steps", "3", "--eval-every", "3", "--runs-dir", tmp_path, "--run-name", "r"]
    monkeypatch.setattr(sys, "argv", ["train_freematch.py", *map(str, argv)])
    fm.main()
    training = [r for r in spy if r["training"]]
    assert [r["batch"] for r in training] == [4 + 2 * 8] * 3
    assert len(calls) == 3 and all(a == (3,) and i.dtype == o.dtype == torch.uint8 for i, o, a in calls)
    torch.testing.assert_close(training[0]["input"][12:], (calls[0][1].float() / 255 - 0.5) / 0.5)
    split = json.load(open(tmp_path / "r" / "split.json"))
    assert set(split["labeled"]) <= set(split["unlabeled"])  # include_lb_to_ulb


def test_end_to_end_tags_and_an_interrupted_run_resumes_exactly(tmp_path):
    common_argv = [*TINY, "--total-steps", "8", "--eval-every", "2", "--ns3l", "--runs-dir", tmp_path]
    whole = run_script("train_freematch.py", *common_argv, "--run-name", "whole")
    assert whole.returncode == 0, whole.stderr
    first = run_script("train_freematch.py", *common_argv, "--run-name", "legs", "--stop-at", "4")
    assert first.returncode == 0 and "stopped at step 4 of 8" in first.stdout, first.stderr
    assert not (tmp_path / "legs" / "summary.json").exists()
    second = run_script("train_freematch.py", "--resume", tmp_path / "legs")
    assert second.returncode == 0, second.stderr
    a, b = (json.load(open(tmp_path / name / "summary.json")) for name in ("whole", "legs"))
    for key in (
        "best_test_error",
        "median_test_error",
        "final_test_error",
        "final_valid_error",
        "final_global_threshold",
    ):
        assert a[key] == b[key], key
    scalars, resumed = read_scalars(tmp_path / "whole"), read_scalars(tmp_path / "legs")
    for tag in ("losses/total", "losses/fairness", "losses/ns3l", "charts/global_threshold", "eval/test_error"):
        assert scalars[tag] == resumed[tag], tag
    expected = {"losses/xe", "losses/xeu", "losses/fairness", "losses/ns3l", "charts/global_threshold",
                "charts/local_threshold_min", "charts/local_threshold_max", "charts/mask_rate",
                "charts/pseudo_label_accuracy", "charts/ns3l_negatives_per_sample", "charts/ns3l_false_negative_rate",
                "eval/test_error", "eval/best_test_error", "eval/median_test_error"}  # fmt: skip
    assert expected <= set(scalars)
    threshold = [v for _, v in scalars["charts/global_threshold"]]
    assert threshold[0] > 0.1 and all(b >= a - 1e-3 for a, b in zip(threshold, threshold[1:]))  # rises from 1 / C
    assert all(0 <= v <= 1 for _, v in scalars["charts/mask_rate"])
    assert a["reported_metric"] == "best_test_error"
    assert a["best_test_error"] == min(v for _, v in scalars["eval/test_error"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--strong-augment", "randaug"], "--strong-augment"),
        (["--ema-p", "1.5"], "--ema-p"),
        (["--threshold", "0"], "--threshold"),
        (["--fairness-weight", "-1"], "--fairness-weight"),
        (["--ns3l-threshold", "adaptive"], "--ns3l-threshold"),
    ],
)
def test_bad_flags_are_one_line(argv, message, tmp_path):
    result = refuse_here("train_freematch.py", *TINY, "--runs-dir", tmp_path / "runs", *argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_resuming_another_scripts_run_is_one_line(tmp_path):
    done = run_script("train_fixmatch.py", *TINY, "--total-steps", "2", "--eval-every", "1", "--stop-at", "1",
                      "--runs-dir", tmp_path, "--run-name", "fix")  # fmt: skip
    assert done.returncode == 0, done.stderr
    before = sorted(os.listdir(tmp_path / "fix"))
    result = refuse_here("train_freematch.py", "--resume", tmp_path / "fix")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert sorted(os.listdir(tmp_path / "fix")) == before


def test_help_names_usbs_configurations(capsys):
    with pytest.raises(SystemExit):
        fm.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "config/classic_cv/freematch" in out and "digits" in out


# ------------------------------------------------------------------------------------------- USB's network, transcribed
class UsbBasicBlock(torch.nn.Module):
    """semilearn/nets/wrn/wrn.py:30-56 (and wrn_var.py's identical copy), as written there."""

    def __init__(self, in_planes, out_planes, stride, activate_before_residual=False):
        super().__init__()
        nn = torch.nn
        self.bn1 = nn.BatchNorm2d(in_planes, momentum=0.001)
        self.relu1 = nn.LeakyReLU(negative_slope=0.1, inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes, momentum=0.001)
        self.relu2 = nn.LeakyReLU(negative_slope=0.1, inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            (not self.equalInOut)
            and nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
            or None
        )
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        if not self.equalInOut and self.activate_before_residual:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class UsbWideResNet(torch.nn.Module):
    """wrn.py:76-139 (3 blocks) and wrn_var.py's WideResNetVar (4 blocks), as written there."""

    def __init__(self, first_stride, num_classes, depth=28, widen_factor=2, blocks=3):
        super().__init__()
        nn = torch.nn
        channels = [16] + [16 * widen_factor * 2**s for s in range(blocks)]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=True)
        stages = []
        for b in range(blocks):
            units = [
                UsbBasicBlock(channels[b] if i == 0 else channels[b + 1], channels[b + 1],
                              (first_stride if b == 0 else 2) if i == 0 else 1, activate_before_residual=b == 0)
                for i in range(n)
            ]  # fmt: skip
            stages.append(nn.Sequential(*units))
        self.blocks = nn.Sequential(*stages)
        self.bn1 = nn.BatchNorm2d(channels[-1], momentum=0.001, eps=0.001)
        self.relu = nn.LeakyReLU(negative_slope=0.1, inplace=False)
        self.classifier = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.blocks(self.conv1(x))))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize("stages,first_stride,size", [(3, 1, 32), (4, 2, 48)])
def test_the_usb_layout_computes_usbs_network(stages, first_stride, size):
    """Our weights loaded into USB's WRN (wrn_28_2; wrn_var_37_2 for STL-10: 4 stages, first stride 2) give the same
    logits, in training mode (batch statistics) and in evaluation mode: the same wiring, BN eps and strides."""
    ours = wrn.WideResNet(10, 10, 2, 3, num_stages=stages, layout="usb", first_stride=first_stride)
    theirs = UsbWideResNet(first_stride, 10, depth=10, widen_factor=2, blocks=stages)
    a, b = ours.state_dict(), theirs.state_dict()
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]  # registration order matches
    theirs.load_state_dict(dict(zip(b, a.values())))
    x = torch.randn(6, 3, size, size)
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    assert [m.eps for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)][:2] == [1e-5, 1e-5]
    oliver = wrn.WideResNet(10, 10, 2, 3, num_stages=stages)  # the default layout differs: conv1 sees BN-lReLU(x)
    oliver.load_state_dict({k: v for k, v in a.items() if k != "stem.bias"}, strict=False)
    assert not torch.allclose(oliver.eval()(x), ours.eval()(x), atol=1e-3)


def test_the_fairness_term_takes_the_thresholds_updated_with_this_batch():
    logits_weak, logits_strong = torch.randn(16, 4) * 3, torch.randn(16, 4) * 3
    s = state(0.2, [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])
    out = fm.freematch_losses(torch.randn(2, 4), torch.tensor([0, 1]), logits_weak, logits_strong, s, 0.5, False)
    loss_fair, mask, new = out[2], out[5], out[6]
    assert float(loss_fair) == pytest.approx(
        float(fm.fairness_loss(mask, logits_strong, new["p_model"], new["label_hist"]))
    )
    assert float(loss_fair) != pytest.approx(
        float(fm.fairness_loss(mask, logits_strong, s["p_model"], s["label_hist"]))
    )


def test_svhn_is_train_plus_extra_with_labels_from_both_and_stl10_strides_first(monkeypatch):
    args = fm.parse_args(["--dataset", "svhn"])
    assert args.svhn_extra is True and fm.parse_args(["--dataset", "cifar10"]).svhn_extra is False
    assert fm.parse_args(["--dataset", "stl10"]).first_stride == 2 and args.first_stride == 1
    seen = {}

    def loader(name, data_dir, download, device, svhn_extra=False):
        seen["extra"] = svhn_extra
        raise common.DataError("stop here")

    monkeypatch.setattr(common, "load_dataset", loader)
    for flags, extra in ((["--dataset", "svhn"], True), (["--dataset", "svhn", "--no-svhn-extra"], False)):
        monkeypatch.setattr(sys, "argv", ["train_freematch.py", *flags, "--no-cuda"])
        with pytest.raises(SystemExit):
            fm.main()
        assert seen["extra"] is extra


def test_a_stop_between_evaluations_only_saves_and_the_legs_equal_one_run(tmp_path):
    argv = [*TINY, "--total-steps", "6", "--eval-every", "2", "--runs-dir", tmp_path]
    assert run_script("train_freematch.py", *argv, "--run-name", "whole").returncode == 0
    first = run_script("train_freematch.py", *argv, "--run-name", "legs", "--stop-at", "3")
    assert first.returncode == 0 and "eval step 3" not in first.stdout, first.stdout
    assert run_script("train_freematch.py", "--resume", tmp_path / "legs").returncode == 0
    a, b = (json.load(open(tmp_path / name / "summary.json")) for name in ("whole", "legs"))
    assert (a["best_test_error"], a["median_test_error"]) == (b["best_test_error"], b["median_test_error"])
    assert read_scalars(tmp_path / "whole")["eval/test_error"] == read_scalars(tmp_path / "legs")["eval/test_error"]
