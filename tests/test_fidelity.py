"""The defaults and code paths that decide whether a run is comparable with the NS3L paper's tables: VAT's loss
direction, the supervised batch, the disjoint split, the authors' extra pass, the bf16 / channels_last paths (run on
the CPU here, with an explicit --bf16 --channels-last), fp32 evaluation, deterministic mode and MixMatch's defaults.

The end-to-end checks run each script's main() in-process with a spy on WideResNet.forward that records every forward
pass (training or eval mode, batch size, input, autocast state, output dtype, memory format)."""

import json
import os
import statistics
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bookkeeping  # noqa: E402
import common  # noqa: E402
import train_mixmatch  # noqa: E402
import train_pi  # noqa: E402
import train_supervised  # noqa: E402
import train_vat  # noqa: E402
import wrn  # noqa: E402

TINY = [
    "--dataset",
    "synthetic",
    "--depth",
    "10",
    "--width",
    "1",
    "--bn-momentum",
    "0.1",
    "--no-cuda",
    "--log-every",
    "1",
]


@pytest.fixture
def spy(monkeypatch):
    """Every WideResNet forward pass of the run, in order."""
    records, forward = [], wrn.WideResNet.forward

    def recording_forward(self, x):
        out = forward(self, x)
        records.append(
            dict(
                training=self.training,
                batch=len(x),
                input=x.detach().float().clone(),
                autocast=torch.is_autocast_enabled("cpu"),
                out_dtype=out.dtype,
                channels_last=x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                bn_update=all(m.update_stats for m in self.modules() if isinstance(m, wrn.BatchNorm2d)),
            )
        )
        return out

    monkeypatch.setattr(wrn.WideResNet, "forward", recording_forward)
    yield records
    torch.use_deterministic_algorithms(False)  # main() sets it for --torch-deterministic; keep other tests unaffected


def run_main(module, monkeypatch, tmp_path, *argv, name="run"):
    monkeypatch.setattr(sys, "argv", [module.__file__, *TINY, "--runs-dir", str(tmp_path), "--run-name", name, *argv])
    module.main()
    run_dir = tmp_path / name
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    with open(run_dir / "split.json") as f:
        split = json.load(f)
    return summary, split


# ------------------------------------------------------------------------------------------------ VAT direction
def test_vat_loss_is_olivers_kl_by_default_and_miyatos_with_the_flag():
    torch.manual_seed(0)
    model = wrn.WideResNet(10, depth=10, width=1, bn_momentum=0.1).train()
    x = torch.randn(6, 3, 8, 8)
    logits = model(x)
    results = {}
    for direction in ("oliver", "miyato"):
        torch.manual_seed(1)  # the same random d, so both searches find the same r_adv
        kl, logits_adv, r_adv = train_vat.vat_loss(model, x, logits, eps=2.0, direction=direction)
        p, q = torch.softmax(logits.detach(), 1), torch.softmax(logits_adv.detach(), 1)  # p(x), p(x + r_adv)
        by_hand = (q * (q.log() - p.log())).sum(1) if direction == "oliver" else (p * (p.log() - q.log())).sum(1)
        torch.testing.assert_close(kl.detach(), by_hand, rtol=1e-4, atol=1e-6)
        results[direction] = kl.detach()
    assert not torch.allclose(results["oliver"], results["miyato"], rtol=1e-3)  # the two directions are different
    for direction in ("oliver", "miyato"):  # p(x) is a constant target either way
        clean = model(x)
        clean.retain_grad()
        train_vat.vat_loss(model, x, clean, eps=2.0, direction=direction)[0].mean().backward()
        assert clean.grad is None and model.fc.weight.grad.abs().sum() > 0
        model.zero_grad()
    assert train_vat.parse_args([]).vat_kl == "oliver"
    assert train_vat.parse_args(["--vat-kl", "miyato"]).vat_kl == "miyato"


def test_vat_gradient_flows_through_both_sides_of_the_perturbed_distribution():
    """KL(q || p) with q = p(x + r_adv): d/dz_q of sum q (log q - log p) is q * (log q - log p - KL), by hand."""
    torch.manual_seed(0)
    clean = torch.randn(3, 5)
    perturbed = torch.randn(3, 5, requires_grad=True)
    train_vat.kl_divergence(perturbed, clean).sum().backward()
    q, p = torch.softmax(perturbed.detach(), 1), torch.softmax(clean, 1)
    kl = (q * (q.log() - p.log())).sum(1, keepdim=True)
    torch.testing.assert_close(perturbed.grad, q * (q.log() - p.log() - kl), rtol=1e-4, atol=1e-6)


def test_bf16_vat_search_target_is_recomputed_in_fp32_on_the_same_augmented_tensor(monkeypatch):
    torch.manual_seed(0)
    model = wrn.WideResNet(10, depth=10, width=1, bn_momentum=0.1).train()
    x = torch.randn(6, 3, 8, 8)

    def augment(t):  # fresh noise on every call: a second call never reproduces the first view
        return t + 0.5 * torch.randn_like(t)

    clean_input = augment(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(clean_input)
    assert logits.dtype == torch.bfloat16
    calls, forward = [], wrn.WideResNet.forward
    monkeypatch.setattr(
        wrn.WideResNet,
        "forward",
        lambda self, t: calls.append((t.detach().clone(), torch.is_autocast_enabled("cpu"))) or forward(self, t),
    )
    train_vat.vat_loss(
        model,
        x,
        logits.float(),
        eps=2.0,
        autocast=torch.autocast("cpu", dtype=torch.bfloat16),
        augment=augment,
        clean_input=clean_input,
    )
    target_input, target_autocast = calls[0]
    assert torch.equal(target_input, clean_input) and not target_autocast  # same view, fp32
    assert not calls[1][1] and calls[2][1]  # the search pass is fp32; the loss's perturbed pass runs under bf16
    assert not torch.equal(calls[1][0], clean_input)


def test_exact_fp32_switches_autocast_and_tf32_off_and_restores_them():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"  # as a user who allows TF32 everywhere
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with bookkeeping.exact_fp32("cuda"), bookkeeping.exact_fp32("cpu"):
                assert not torch.is_autocast_enabled("cpu")
                assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
            assert torch.is_autocast_enabled("cpu")
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with pytest.raises(ZeroDivisionError):  # restored on the way out of an exception too
            with bookkeeping.exact_fp32("cuda"):
                1 / 0
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_no_bf16_on_cuda_means_exact_fp32_for_the_run(monkeypatch):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: ("autocast", a, k))  # no CUDA here: only the decision
    try:
        args = train_vat.parse_args(["--no-bf16"])
        amp, memory_format = bookkeeping.precision(args, torch.device("cuda"))
        assert amp[2]["enabled"] is False and memory_format == torch.channels_last
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        matmul.fp32_precision, conv.fp32_precision = before
        amp, _ = bookkeeping.precision(train_vat.parse_args([]), torch.device("cuda"))
        assert amp[2]["enabled"] is True and (matmul.fp32_precision, conv.fp32_precision) == before
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


# ------------------------------------------------------------------------------------- supervised batch, split
def test_supervised_baseline_trains_on_100_labeled_images_per_step(monkeypatch, tmp_path, spy):
    assert train_supervised.parse_args([]).batch_size == 100
    for flag in ("--ns3l", "--pseudo-label", "--entmin"):
        assert train_supervised.parse_args([flag]).batch_size == 50
    assert train_supervised.parse_args(["--batch-size", "64"]).batch_size == 64
    summary, _ = run_main(
        train_supervised,
        monkeypatch,
        tmp_path,
        "--total-steps",
        "2",
        "--eval-every",
        "2",
        "--num-labeled",
        "100",
        "--num-valid",
        "50",
    )
    training = [r["batch"] for r in spy if r["training"]]
    assert training == [100, 100] and summary["args"]["batch_size"] == 100


def test_default_split_is_disjoint_and_the_flag_restores_olivers_overlap(monkeypatch, tmp_path, spy):
    for module in (train_supervised, train_vat, train_pi, train_mixmatch):
        assert module.parse_args([]).include_labeled is False, module.__name__
    _, split = run_main(train_vat, monkeypatch, tmp_path, "--total-steps", "1", "--eval-every", "1", name="disjoint")
    assert split["labeled_in_unlabeled"] is False and not set(split["labeled"]) & set(split["unlabeled"])
    _, split = run_main(
        train_vat, monkeypatch, tmp_path, "--total-steps", "1", "--eval-every", "1", "--include-labeled", name="overlap"
    )
    assert split["labeled_in_unlabeled"] is True and set(split["labeled"]) <= set(split["unlabeled"])
    assert not set(split["valid"]) & set(split["unlabeled"])


# --------------------------------------------------------------------------------------------- NS3L extra pass
def test_ns3l_extra_pass_sees_a_fresh_augmentation_and_changes_the_run(monkeypatch, tmp_path, spy):
    flags = ["--ns3l", "--total-steps", "3", "--eval-every", "3", "--rampup-steps", "0", "--seed", "4"]
    run_main(train_supervised, monkeypatch, tmp_path, *flags, name="plain")
    assert len([r for r in spy if r["training"]]) == 3
    spy.clear()
    views, augment = [], common.augment
    monkeypatch.setattr(
        common, "augment", lambda x, *a, **k: views.append((x.clone(), augment(x, *a, **k))) or views[-1][1]
    )
    run_main(train_supervised, monkeypatch, tmp_path, *flags, "--ns3l-extra-pass", name="extra")
    passes = [r for r in spy if r["training"]]
    assert len(passes) == 6 and [r["bn_update"] for r in passes[:2]] == [True, False]
    (images, clean), (images_again, again) = views[0], views[1]
    assert torch.equal(images, images_again)  # the extra pass augments the same normalised images ...
    assert not torch.equal(clean, again)  # ... afresh (a pass on the same tensor would repeat the training logits)
    assert torch.equal(passes[0]["input"], clean) and torch.equal(passes[1]["input"], again)
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "extra" / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # same seed, another result


# ------------------------------------------------------------------------- bf16 + channels_last on the CPU
CASES = {
    "supervised": (train_supervised, ["--ns3l", "--ns3l-extra-pass", "--pseudo-label", "--entmin"]),
    "vat": (train_vat, ["--ns3l", "--entmin"]),
    "pi": (train_pi, ["--ns3l"]),
    "mixmatch": (train_mixmatch, ["--ns3l", "--batch-size", "8"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_channels_last_end_to_end_with_fp32_evaluation(name, monkeypatch, tmp_path, spy):
    module, flags = CASES[name]
    summary, split = run_main(
        module,
        monkeypatch,
        tmp_path,
        *flags,
        "--bf16",
        "--channels-last",
        "--total-steps",
        "3",
        "--eval-every",
        "2",
        "--torch-deterministic",
    )
    assert split["labeled_in_unlabeled"] is False and not set(split["labeled"]) & set(split["unlabeled"])
    training = [r for r in spy if r["training"]]
    evaluation = [r for r in spy if not r["training"]]
    assert training and evaluation
    assert all(r["channels_last"] for r in spy)
    bf16 = [r for r in training if r["autocast"]]
    assert bf16 and all(r["out_dtype"] == torch.bfloat16 for r in bf16)
    if name == "vat":  # the r search and its recomputed target are the fp32 training passes
        fp32 = [r for r in training if not r["autocast"]]
        assert fp32 and all(r["out_dtype"] == torch.float32 for r in fp32)
        assert torch.equal(training[1]["input"], training[0]["input"])  # target recomputed on the clean view
    else:
        assert len(bf16) == len(training)
    assert all(not r["autocast"] and r["out_dtype"] == torch.float32 for r in evaluation)
    for key in ("final_test_error", "final_valid_error"):
        assert 0.0 <= summary[key] <= 100.0
    assert summary["args"]["bf16"] is True and summary["args"]["channels_last"] is True


def test_cpu_defaults_are_fp32_in_the_measured_faster_format(monkeypatch, tmp_path, spy):
    """CPU defaults: no autocast, fp32, and the memory format benchmark/speed.py measured faster on the CPU
    (channels_last, docs/benchmarks.md); --no-channels-last gives contiguous tensors."""
    assert bookkeeping.FASTER_FORMAT["cpu"] is True
    run_main(train_pi, monkeypatch, tmp_path, "--total-steps", "1", "--eval-every", "1")
    assert spy and all(not r["autocast"] and r["out_dtype"] == torch.float32 and r["channels_last"] for r in spy)
    spy.clear()
    run_main(train_pi, monkeypatch, tmp_path / "b", "--total-steps", "1", "--eval-every", "1", "--no-channels-last")
    assert spy and all(not r["channels_last"] for r in spy)


def test_torch_deterministic_turns_on_deterministic_algorithms(monkeypatch, tmp_path, spy):
    torch.use_deterministic_algorithms(False)
    run_main(train_pi, monkeypatch, tmp_path, "--total-steps", "1", "--eval-every", "1", "--torch-deterministic")
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    bookkeeping.seed_everything(0, False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_reflect_translation_equals_reflect_padding_and_crop_for_every_offset():
    """The gather-based translation (deterministic backward on CUDA) is exactly F.pad(mode="reflect") + crop."""
    import torch.nn.functional as F

    for height, width, shift in ((8, 8, 2), (5, 7, 4), (32, 32, 4), (6, 4, 3)):
        x = torch.randn(2, 3, height, width)
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        for dy in range(2 * shift + 1):
            for dx in range(2 * shift + 1):
                rows = common.reflect_index(torch.arange(height) + dy - shift, height)
                cols = common.reflect_index(torch.arange(width) + dx - shift, width)
                assert torch.equal(x[:, :, rows][:, :, :, cols], padded[:, :, dy : dy + height, dx : dx + width])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reflection-padding backward raises only on CUDA")
def test_augment_backward_runs_under_deterministic_algorithms_on_cuda():
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(4, 3, 8, 8, device="cuda", requires_grad=True)
        common.augment(x, flip=True, shift=2, noise_std=0.1).square().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_run_of_the_previous_version_resumes_with_its_old_meaning(monkeypatch, tmp_path, spy, capsys):
    run_main(train_vat, monkeypatch, tmp_path, "--total-steps", "2", "--eval-every", "2", name="old")
    path = tmp_path / "old" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    for name in ("vat_kl", "include_labeled", "channels_last"):  # what the previous version's args lacked
        del checkpoint["args"][name]
    checkpoint["args"].update(exclude_labeled=False, bf16=True)
    torch.save(checkpoint, path)
    monkeypatch.setattr(sys, "argv", [train_vat.__file__, "--resume", str(tmp_path / "old"), "--total-steps", "3"])
    train_vat.main()
    assert "older version" in capsys.readouterr().out
    with open(tmp_path / "old" / "summary.json") as f:
        resumed = json.load(f)["args"]
    assert (resumed["vat_kl"], resumed["include_labeled"], resumed["bf16"]) == ("miyato", True, None)
    assert not any(r["autocast"] for r in spy)  # bf16 meant "on CUDA" then: this CPU run stays fp32


# ------------------------------------------------------------------------------------------ MixMatch defaults
def test_mixmatch_defaults_resolved_from_the_data_set():
    cifar10, svhn, stl10, cifar100 = (
        train_mixmatch.parse_args(["--dataset", d]) for d in ("cifar10", "svhn", "stl10", "cifar100")
    )
    assert cifar10.total_steps == svhn.total_steps == 300 * 1024  # NS3L paper: 300 epochs of 64 kimg
    assert stl10.total_steps == cifar100.total_steps == 1 << 20
    assert train_mixmatch.parse_args(["--total-steps", "1048576"]).total_steps == 1 << 20
    assert (cifar10.num_valid, svhn.num_valid, stl10.num_valid) == (5000, 7325, 500)
    assert cifar10.threshold == pytest.approx(0.05) and cifar100.threshold == pytest.approx(0.005)
    assert (cifar10.alpha, svhn.alpha) == (0.75, 0.75)
    extra = train_mixmatch.parse_args(["--dataset", "svhn", "--svhn-extra"])
    assert (extra.alpha, extra.lambda_u) == (0.25, 250.0)


def test_mixmatch_median_uses_grid_evaluations_only():
    evaluations = [(2, 10.0), (4, 20.0), (5, 90.0), (6, 30.0), (8, 40.0)]
    assert train_mixmatch.grid_test_errors(evaluations, 2, 8) == [10.0, 20.0, 30.0, 40.0]
    assert train_mixmatch.grid_test_errors(evaluations[:3], 2, 5) == [10.0, 20.0, 90.0]


def test_mixmatch_extended_run_drops_the_old_final_evaluation(monkeypatch, tmp_path, spy):
    calls = []  # every evaluation gets its own error, so the median shows which evaluations entered it
    monkeypatch.setattr(bookkeeping, "error_rate", lambda *a, **k: calls.append(1) or float(len(calls)) ** 2)
    flags = ["--batch-size", "8", "--eval-every", "2"]
    run_main(train_mixmatch, monkeypatch, tmp_path, *flags, "--total-steps", "5", name="extended")
    monkeypatch.setattr(
        sys,
        "argv",
        [train_mixmatch.__file__, "--resume", str(tmp_path / "extended"), "--total-steps", "8", "--no-cuda"],
    )
    train_mixmatch.main()
    with open(tmp_path / "extended" / "summary.json") as f:
        summary = json.load(f)
    evaluations = torch.load(tmp_path / "extended" / "checkpoint.pt", weights_only=True)["evaluations"]
    assert [step for step, _ in evaluations] == [2, 4, 5, 6, 8]
    errors = [error for _, error in evaluations]
    assert len(set(errors)) == 5
    grid = [error for step, error in evaluations if step != 5]
    assert summary["median_last20_test_error"] == pytest.approx(statistics.median(grid))
    assert summary["median_last20_test_error"] != pytest.approx(statistics.median(errors))


def test_mixmatch_svhn_extra_draws_labels_from_train_and_extra(monkeypatch, tmp_path, spy):
    """Official runs/table7.sh: the labeled (and validation) images may come from the extra images too."""
    load = common.load_dataset

    def svhn_with_extra(*args, **kwargs):  # synthetic images standing in for SVHN: rows >= 200 play 'extra'
        data = load("synthetic", device=kwargs.get("device", "cpu"))
        data.name, data.num_labelable = "svhn", 200
        return data

    monkeypatch.setattr(common, "load_dataset", svhn_with_extra)
    argv = [
        "--dataset",
        "svhn",
        "--batch-size",
        "8",
        "--total-steps",
        "1",
        "--eval-every",
        "1",
        "--num-labeled",
        "250",
        "--num-valid",
        "100",
    ]
    _, split = run_main(train_mixmatch, monkeypatch, tmp_path, *argv, "--svhn-extra", name="extra")
    assert max(split["labeled"] + split["valid"]) >= 200 and len(split["labeled"]) == 250
    with pytest.raises(SystemExit):  # without --svhn-extra only the 200 train rows can be labeled: too few
        run_main(train_mixmatch, monkeypatch, tmp_path, *argv, name="plain")


def test_mixmatch_threshold_of_an_npz_follows_its_classes(monkeypatch, tmp_path, spy):
    rng = np.random.RandomState(0)
    path = tmp_path / "five.npz"
    np.savez(
        path,
        x_train=rng.randint(0, 255, (60, 8, 8), dtype=np.uint8),
        y_train=np.arange(60) % 5,
        x_test=rng.randint(0, 255, (20, 8, 8), dtype=np.uint8),
        y_test=np.arange(20) % 5,
    )
    assert train_mixmatch.parse_args(["--dataset", str(path)]).threshold is None  # classes unknown before loading
    summary, _ = run_main(
        train_mixmatch,
        monkeypatch,
        tmp_path,
        "--dataset",
        str(path),
        "--batch-size",
        "8",
        "--num-labeled",
        "10",
        "--num-valid",
        "10",
        "--total-steps",
        "1",
        "--eval-every",
        "1",
    )
    assert summary["args"]["threshold"] == pytest.approx(0.1)  # 0.5 / 5 classes


def test_protocol_a_validation_sizes():
    """NS3L paper 4.1: CIFAR 45,000 / 5,000 and SVHN 65,932 / 7,325 (Oliver et al.'s code holds out 7,326)."""
    for module in (train_supervised, train_vat, train_pi, train_mixmatch):
        valid = {d: module.parse_args(["--dataset", d]).num_valid for d in ("cifar10", "svhn", "cifar100")}
        assert valid == {"cifar10": 5000, "svhn": 7325, "cifar100": 5000}, module.__name__


def test_fidelity_doc_points_at_the_lines_it_names():
    """Every project reference in docs/fidelity.md, [file:line](../file#Lline) `text`, names a line holding that text,
    so the table cannot drift from the code silently; every test it names exists."""
    import re

    with open(os.path.join(ROOT, "docs", "fidelity.md")) as f:
        doc = f.read()
    references = re.findall(r"\[([\w.]+):(\d+)\]\(\.\./([\w.]+)#L(\d+)\) `([^`]+)`", doc)
    assert len(references) > 40
    for name, line, target, anchor_line, text in references:
        assert name == target and line == anchor_line
        with open(os.path.join(ROOT, name)) as f:
            lines = f.read().splitlines()
        assert text in lines[int(line) - 1], (name, line, text)
    tests = re.findall(r"`(tests/[\w.]+)::(\w+)`", doc)
    assert len(tests) > 30
    for path, test in tests:
        with open(os.path.join(ROOT, path)) as f:
            assert f"def {test}(" in f.read(), (path, test)
