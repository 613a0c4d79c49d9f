"""torch.compile (--compile) against eager: every kind of pass the scripts run (BatchNorm-updating training pass, the
passes that leave BN statistics alone, VAT's gradient with respect to the input, MixMatch's interleaved chunks) gives
the eager losses, gradients and BN statistics on a fixed batch; checkpoints hold the uncompiled module's weights;
compiled runs (MixMatch, FixMatch) finish end to end on the CPU and resume exactly. Also the TrainClock behind SPS
and ETA."""

import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import bookkeeping
import common
import train_mixmatch
import train_pi
import train_vat
import wrn

# fp32 everywhere; the compiled kernels sum in another order, so agreement is to rounding, not bitwise.
TOL = dict(rtol=1e-4, atol=1e-5)


def pair(seed=0, conv_bias=False):
    """An eager WRN-10-1 and a compiled copy with identical weights (as bookkeeping.compile_model builds it)."""
    torch.manual_seed(seed)
    eager = wrn.WideResNet(10, 10, 1, 3, conv_bias=conv_bias, bn_momentum=0.1)
    compiled_model = copy.deepcopy(eager)
    net = bookkeeping.compile_model(compiled_model, argparse.Namespace(compile=True), torch.device("cpu"))
    return eager, compiled_model, net


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **(tol or TOL), msg=lambda m, key=key: f"{key}: {m}")


def test_compile_model_is_opt_in_on_cpu_and_shares_weights():
    model = wrn.WideResNet(10, 10, 1, 3)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bookkeeping.compile_model(model, argparse.Namespace(compile=None), cpu) is model  # default off on the CPU
    assert bookkeeping.compile_model(model, argparse.Namespace(compile=False), cuda) is model
    net = bookkeeping.compile_model(model, argparse.Namespace(compile=True), cpu)
    assert net is not model and net._orig_mod is model
    assert [p.data_ptr() for p in net.parameters()] == [p.data_ptr() for p in model.parameters()]
    assert list(model.state_dict()) == list(wrn.WideResNet(10, 10, 1, 3).state_dict())  # no "_orig_mod." prefix


def test_compiled_training_and_frozen_bn_passes_match_eager():
    """Supervised / NS3L / Pi: the BN-updating pass with its backward, then a no_bn_update pass (Pi's target, the
    NS3L extra pass) that must leave the running statistics where the first pass put them."""
    eager, compiled_model, net = pair()
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    losses = []
    for module in (eager, net):
        logits = module(x)
        negatives = train_vat.ns3l_negatives(logits[8:], 0.04)
        target = train_pi.target_pass(module, x.flip(3))
        loss = (
            F.cross_entropy(logits[:8], y[:8])
            + train_vat.ns3l_loss(logits[8:], negatives)
            + 10 * train_pi.consistency_loss(logits[8:], target[8:])
        )
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    assert_same(grads(eager), grads(compiled_model), rtol=1e-3, atol=1e-5)
    assert_same(buffers(eager), buffers(compiled_model))
    assert int(compiled_model.bn.num_batches_tracked) == 1  # the target pass did not count


def test_compiled_vat_perturbation_matches_eager():
    """VAT's r search differentiates the network with respect to its input under no_bn_update and exact fp32; the
    compiled gradient points the same way (the direction, not the 1e-6 scale, is what enters r_adv). As in the
    scripts, every pass draws its own augmentation (the same draws here for both), so p(x) and p(x + d) differ at
    first order; with no augmentation at all they would differ only by the xi = 1e-6 probe, below the rounding
    difference between two compiled graphs."""
    eager, compiled_model, net = pair(seed=2)
    torch.manual_seed(3)
    x = torch.randn(16, 3, 16, 16)
    results = []
    for module in (eager, net):
        logits = module(x)
        torch.manual_seed(4)  # the same random probe d for both
        kl, logits_adv, r_adv = train_vat.vat_loss(
            module, x, logits, eps=6.0, augment=lambda t: common.augment(t, flip=True, shift=2)
        )
        (logits.logsumexp(1).mean() + kl.mean()).backward()
        results.append((kl.detach(), r_adv))
    (kl_e, r_e), (kl_c, r_c) = results
    cosine = F.cosine_similarity(r_e.flatten(1), r_c.flatten(1), dim=1)
    assert cosine.min() > 0.999, cosine
    torch.testing.assert_close(r_e.flatten(1).norm(dim=1), torch.full((16,), 6.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(kl_e, kl_c, rtol=2e-2, atol=1e-4)
    assert_same(buffers(eager), buffers(compiled_model))  # only the clean pass updated BN
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in compiled_model.parameters())


def test_compiled_mixmatch_step_matches_eager():
    """Label guess over K views and the interleaved chunks (only the first updates BN), losses, backward, then the
    post-step decay and EMA on the uncompiled module."""
    eager, compiled_model, net = pair(seed=5, conv_bias=True)
    torch.manual_seed(6)
    x, views = torch.randn(8, 3, 16, 16), [torch.randn(8, 3, 16, 16) for _ in range(2)]
    y = torch.randint(0, 10, (8,))
    out = []
    for module, model in ((eager, eager), (net, compiled_model)):
        ema = copy.deepcopy(model).requires_grad_(False)
        guessed = train_mixmatch.guess_labels(module, views, 0.5)
        targets = torch.cat([F.one_hot(y, 10).float(), guessed, guessed])
        torch.manual_seed(7)
        inputs, mixed_targets, _, _ = train_mixmatch.mixup(torch.cat([x] + views), targets, 0.75)
        logits = torch.cat(train_mixmatch.interleaved_forward(module, list(inputs.split(8))))
        loss_xe, loss_l2u = train_mixmatch.mixmatch_losses(logits[:8], mixed_targets[:8], logits[8:], mixed_targets[8:])
        loss = loss_xe + 75 * loss_l2u + train_mixmatch.ns3l_loss(logits, mixed_targets < 0.05)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * p.grad)
        train_mixmatch.decoupled_weight_decay_(model, 0.02 * 0.002)
        train_mixmatch.ema_update_(ema, model, 0.999)
        out.append((loss.detach(), guessed, ema.state_dict()))
    torch.testing.assert_close(out[0][0], out[1][0], **TOL)
    torch.testing.assert_close(out[0][1], out[1][1], **TOL)
    assert_same(grads(eager), grads(compiled_model), rtol=1e-3, atol=1e-5)
    assert_same(out[0][2], out[1][2])
    assert int(compiled_model.bn.num_batches_tracked) == 1  # one BN-updating chunk


# ------------------------------------------------------------------------------------------------------ TrainClock
class FakeTime:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_train_clock_sps_is_steps_over_training_time_across_evaluations(monkeypatch):
    """1 s per step, a 100 s evaluation after steps 3 and 6, logs after steps 5 and 10: SPS is 1.0 at both logs.
    The scripts' old loop restarted the interval's timer at an evaluation but not its step count, and logged 2.5 at
    step 5 (5 steps over the 2 s since the evaluation)."""
    fake = FakeTime()
    monkeypatch.setattr(bookkeeping.time, "perf_counter", fake)
    clock = bookkeeping.TrainClock(torch.device("cpu"))
    clock.start()
    logged = []
    for done in range(1, 11):
        fake.now += 1.0
        clock.step()
        if done % 5 == 0:
            logged.append(clock.lap())
        if done % 3 == 0:
            clock.pause()
            fake.now += 100.0
            clock.start()
    assert logged == [1.0, 1.0]
    assert clock.seconds == 10.0 and clock.steps == 10 and clock.steps_per_second() == 1.0


def test_train_clock_leaves_the_compiling_step_out(monkeypatch, capsys):
    fake = FakeTime()
    monkeypatch.setattr(bookkeeping.time, "perf_counter", fake)
    clock = bookkeeping.TrainClock(torch.device("cpu"), seconds=4.0, steps=8)  # a resumed leg: 8 steps in 4 s so far
    clock.start()
    fake.now += 30.0  # the compiling step
    clock.step(compiled=True)
    for _ in range(4):
        fake.now += 0.5
        clock.step(compiled=True)
    assert clock.lap() == 2.0
    assert clock.compile_seconds == 30.0 and clock.seconds == 6.0 and clock.steps == 12
    assert capsys.readouterr().out.count("compile:") == 1


# ---------------------------------------------------------------------------------------------------- end to end
MM = [
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
    "--eval-every",
    "3",
    "--torch-deterministic",
    "--no-cuda",
    "--bn-momentum",
    "0.1",
    "--ns3l",
    "--compile",
]


@pytest.fixture(scope="module")
def compiled_mixmatch(tmp_path_factory):
    """A compiled MixMatch + NS3L run of 6 steps, and the same run stopped at 3 and resumed (compiled) to 6."""
    runs = tmp_path_factory.mktemp("compiled")
    whole = run_script("train_mixmatch.py", *MM, "--total-steps", "6", "--runs-dir", runs, "--run-name", "whole")
    first = run_script("train_mixmatch.py", *MM, "--total-steps", "3", "--runs-dir", runs, "--run-name", "legs")
    second = run_script("train_mixmatch.py", "--resume", runs / "legs", "--total-steps", "6")
    return runs, whole, first, second


def test_compiled_run_finishes_with_finite_metrics(compiled_mixmatch):
    runs, whole, _, _ = compiled_mixmatch
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert whole.stdout.count("compile: the first step took") == 1
    summary = json.loads((runs / "whole" / "summary.json").read_text())
    assert summary["compile_seconds"] > 0 and summary["steps_per_second"] > 0
    assert math.isfinite(summary["median_last20_test_error"]) and math.isfinite(summary["final_test_error_raw"])
    checkpoint = torch.load(runs / "whole" / "checkpoint.pt", weights_only=True)
    assert checkpoint["timed_steps"] == 5  # 6 steps, the compiling one not timed
    for key in ("model", "ema_model"):
        assert not any(k.startswith("_orig_mod") for k in checkpoint[key])
        assert all(torch.isfinite(v).all() for v in checkpoint[key].values() if v.is_floating_point())


def test_compiled_resume_is_exact(compiled_mixmatch):
    runs, whole, first, second = compiled_mixmatch
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-1500:], second.stderr[-1500:])
    assert second.stdout.count("compile: the first step took") == 1  # the resumed leg compiles again
    a = torch.load(runs / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(runs / "legs" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema_model"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["evaluations"] == b["evaluations"]


def test_compiled_fixmatch_stops_and_resumes_exactly(tmp_path):
    """train_fixmatch.py --compile --ns3l: one compiled graph for the joint pass of [labeled; weak; strong]; a run left
    at step 2 with --stop-at and resumed (compiled again) equals the uninterrupted run bit for bit."""
    fm = [
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
        "--eval-every",
        "2",
        "--total-steps",
        "4",
        "--torch-deterministic",
        "--no-cuda",
        "--bn-momentum",
        "0.1",
        "--ns3l",
        "--compile",
        "--runs-dir",
        tmp_path,
    ]
    whole = run_script("train_fixmatch.py", *fm, "--run-name", "whole")
    first = run_script("train_fixmatch.py", *fm, "--run-name", "legs", "--stop-at", "2")
    second = run_script("train_fixmatch.py", "--resume", tmp_path / "legs")
    for result in (whole, first, second):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count("compile: the first step took") == 1
    assert "stopped at step 2 of 4" in first.stdout
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["compile_seconds"] > 0 and math.isfinite(summary["median_test_error"])
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "legs" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema_model"):
        assert not any(k.startswith("_orig_mod") for k in a[key])
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_resume_can_switch_compile_off(tmp_path):
    """--compile is a device flag: a resumed run may drop it (and the legs still agree to rounding)."""
    common_args = [
        "--dataset",
        "synthetic",
        "--depth",
        "10",
        "--width",
        "1",
        "--batch-size",
        "8",
        "--unlabeled-batch-size",
        "8",
        "--bn-momentum",
        "0.1",
        "--no-cuda",
        "--log-every",
        "2",
        "--eval-every",
        "2",
        "--ns3l",
    ]
    first = run_script(
        "train_supervised.py",
        *common_args,
        "--compile",
        "--total-steps",
        "2",
        "--runs-dir",
        tmp_path,
        "--run-name",
        "r",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_script("train_supervised.py", "--resume", tmp_path / "r", "--total-steps", "4", "--no-compile")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "compile:" not in second.stdout
    args = json.loads((tmp_path / "r" / "summary.json").read_text())["args"]
    assert args["compile"] is False


# ------------------------------------------------------------------------------------------- train_imagenet_mel.py
def test_compiled_densenet_cam_losses_match_eager():
    """The ImageNet script's one pass (logits and the feature map for the CAMs) and eq. 4's losses, compiled."""
    import train_imagenet_mel as mel

    args = argparse.Namespace(arch="densenet121", growth_rate=8, block_config="2,2", num_init_features=16)
    torch.manual_seed(0)
    eager = mel.build_model(args, 4)
    compiled_model = copy.deepcopy(eager)
    net = bookkeeping.compile_model(compiled_model, argparse.Namespace(compile=True), torch.device("cpu"))
    x, targets = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, -1, -1, -1, -1])
    totals = []
    for module, model in ((eager, eager), (net, compiled_model)):
        logits, features = module(x)
        losses = mel.compute_losses(logits, features, model.classifier.weight, targets, 0.8, 2.0, 0.01, "prob", True, 1)
        losses["total"].backward()
        totals.append({k: v.detach() for k, v in losses.items()})
    assert_same(totals[0], totals[1])
    assert_same(grads(eager), grads(compiled_model), rtol=1e-3, atol=1e-5)
    assert_same(buffers(eager), buffers(compiled_model))


def test_compiled_imagenet_run_end_to_end(tmp_path):
    from test_imagenet_mel import TINY_NET, make_image_folder

    folder = make_image_folder(tmp_path / "images")
    result = run_script(
        "train_imagenet_mel.py",
        "--data-dir",
        folder,
        "--num-labeled",
        "16",
        "--num-unlabeled",
        "-1",
        "--batch-size",
        "8",
        "--total-steps",
        "3",
        "--eval-every",
        "3",
        "--log-every",
        "1",
        "--runs-dir",
        tmp_path / "runs",
        "--run-name",
        "c",
        "--compile",
        "--no-cuda",
        *TINY_NET,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("compile: the first step took") == 1
    summary = json.loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert summary["compile_seconds"] > 0 and summary["steps_per_second"] > 0
    assert math.isfinite(summary["final_test_error"]) and math.isfinite(summary["final_test_loss"])
    assert not any(
        k.startswith("_orig_mod")
        for k in torch.load(tmp_path / "runs" / "c" / "checkpoint.pt", weights_only=True)["model"]
    )


def test_a_lap_holding_only_the_compiling_step_has_no_sps(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(bookkeeping.time, "perf_counter", fake)
    clock = bookkeeping.TrainClock(torch.device("cpu"))
    clock.start()
    fake.now += 20.0
    clock.step(compiled=True)
    assert math.isnan(clock.lap())  # not 0.0: nothing was timed in this lap
    fake.now += 1.0
    clock.step(compiled=True)
    assert clock.lap() == 1.0


def test_a_run_saved_before_compile_existed_keeps_its_memory_format(capsys):
    """Before this change an unset --channels-last meant channels_last on CUDA only; such a run resumed on the CPU
    stays contiguous (bit-exact resume), while a run saved now keeps the new default."""
    import train_pi

    saved = vars(train_pi.parse_args(["--dataset", "synthetic", "--no-cuda"]))
    old = {k: v for k, v in saved.items() if k != "compile"}
    checkpoint = {"args": old, "step": 5}
    args = train_pi.parse_args(["--dataset", "synthetic", "--resume", "somewhere"])
    resumed = bookkeeping.resume_args(args, checkpoint, ["--resume", "somewhere"])
    assert resumed.channels_last is False and "keeps its memory format" in capsys.readouterr().out
    resumed = bookkeeping.resume_args(args, {"args": saved, "step": 5}, ["--resume", "somewhere"])
    assert resumed.channels_last is None
