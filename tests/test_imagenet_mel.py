"""Tests for train_imagenet_mel.py: the losses against loop-based definitions, the labeled-ratio sampler, the split,
DDP gradient equivalence, end-to-end runs (single process and 2-process torchrun on gloo) and bad inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import refuse_here  # noqa: E402

import imagenet_mel_parts as parts  # noqa: E402
import train_imagenet_mel as mel  # noqa: E402

SCRIPT = os.path.join(ROOT, "train_imagenet_mel.py")
TINY_NET = [
    "--crop-size",
    "32",
    "--resize-size",
    "36",
    "--block-config",
    "2,2",
    "--growth-rate",
    "8",
    "--num-init-features",
    "16",
    "--num-workers",
    "0",
]
# One thread per process: the runs are tiny and CI cores are shared.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def make_image_folder(root, classes=4, train_per_class=12, val_per_class=4, size=40, noise=40, patch=0, seed=0):
    """Class = colour of a noisy image: learnable in a few dozen steps. patch > 0: only a patch x patch square at a
    random place has the class colour, on a grey noisy background (harder; crops can cut the square out)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]])
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                if patch:
                    pixels = np.full((size, size, 3), 128.0)
                    top, left = rng.integers(0, size - patch + 1, 2)
                    pixels[top : top + patch, left : left + patch] = colours[c]
                else:
                    pixels = np.tile(colours[c], (size, size, 1)).astype(float)
                pixels = np.clip(pixels + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tiny_imagenet"))


def run_script(args, launcher=(), timeout=120):
    return subprocess.run(
        [sys.executable, *launcher, SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT
    )


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------------------------------------------ losses
def test_mel_matches_loop():
    torch.manual_seed(0)
    logits = torch.randn(7, 5) * 3
    expected = 0.0
    for row in logits:
        probs = torch.exp(row) / torch.exp(row).sum()
        expected += -sum(p * torch.log(p) for p in probs) / len(logits)
    assert torch.allclose(mel.mean_entropy_loss(logits), expected, atol=1e-5)
    assert mel.mean_entropy_loss(torch.tensor([[50.0, 0.0, 0.0]])) < 1e-6  # one-hot prediction: no entropy


def test_nbel_matches_loop_and_authors_variant_differs():
    torch.manual_seed(1)
    logits = torch.randn(6, 4) * 2
    mean_probs = [sum(torch.exp(row[c]) / torch.exp(row).sum() for row in logits) / len(logits) for c in range(4)]
    expected = sum(p * torch.log(p) for p in mean_probs)  # -H(mean of softmaxes), eq. 2
    assert torch.allclose(mel.negative_batch_entropy_loss(logits), expected, atol=1e-5)
    mean_logits = [sum(row[c] for row in logits) / len(logits) for c in range(4)]
    probs = [torch.exp(m) / sum(torch.exp(x) for x in mean_logits) for m in mean_logits]
    authors = sum(p * torch.log(p) for p in probs)
    assert torch.allclose(mel.negative_batch_entropy_loss(logits, on_mean_logits=True), authors, atol=1e-5)
    assert not torch.allclose(expected, authors, atol=1e-3)
    # A batch whose mean prediction is uniform reaches the minimum -log(C).
    balanced = torch.eye(4) * 30
    assert torch.allclose(
        mel.negative_batch_entropy_loss(balanced), torch.tensor(-np.log(4.0), dtype=torch.float32), atol=1e-5
    )


def locality_by_definition(cam):
    """Eq. 3 with explicit groups: sum over k of the Frobenius norm of the first/last k rows/columns."""
    height, width = cam.shape
    total = 0.0
    for k in range(1, height + 1):
        total += torch.linalg.norm(cam[:k, :]) + torch.linalg.norm(cam[height - k :, :])
    for k in range(1, width + 1):
        total += torch.linalg.norm(cam[:, :k]) + torch.linalg.norm(cam[:, width - k :])
    return total


def test_locality_penalty_equals_definition():
    torch.manual_seed(2)
    cams = torch.randn(3, 2, 5, 7)
    cams[0, 0, :2] = 0  # zero rows: the cumulative sums start at 0
    got = mel.locality_penalty(cams)
    assert got.shape == (3, 2)
    for b in range(3):
        for c in range(2):
            assert torch.allclose(got[b, c], locality_by_definition(cams[b, c]), rtol=1e-5), (b, c)
    # At equal energy (Frobenius norm 4), a spread-out map costs more than one active cell.
    spread, point = torch.ones(4, 4), torch.zeros(4, 4)
    point[0, 0] = 4.0
    assert mel.locality_penalty(spread) > mel.locality_penalty(point)


def test_locality_gradient_finite_on_zero_maps():
    cams = torch.zeros(2, 4, 4, requires_grad=True)
    mel.locality_penalty(cams).sum().backward()
    assert torch.isfinite(cams.grad).all()
    cams = torch.zeros(4, 4)
    cams[1, 2] = 3.0
    cams.requires_grad_(True)
    mel.locality_penalty(cams).backward()
    assert torch.isfinite(cams.grad).all() and cams.grad[1, 2] > 0


def test_locality_loss_max_and_prob_weighting():
    torch.manual_seed(3)
    features = torch.rand(4, 6, 3, 3)
    weight = torch.randn(5, 6)
    logits = torch.randn(4, 5, requires_grad=True)
    top = logits.argmax(dim=1)
    expected_max = 0.0
    expected_prob = 0.0
    probs = F.softmax(logits, dim=1)
    for b in range(4):
        for c in range(5):
            cam = sum(weight[c, k] * features[b, k] for k in range(6))  # C_c = sum_k W[c, k] F_k, no bias
            if c == top[b]:
                expected_max += locality_by_definition(cam) / 4
            expected_prob += probs[b, c] * locality_by_definition(cam) / 4
    got_max = mel.locality_loss(features, weight, logits, "max")
    assert torch.allclose(got_max, expected_max, rtol=1e-5)
    got_prob = mel.locality_loss(features, weight, logits, "prob")
    assert torch.allclose(got_prob, expected_prob, rtol=1e-5)
    # The authors' weighting keeps the probabilities' gradient; the note's argmax does not.
    assert torch.autograd.grad(got_prob, logits)[0].abs().sum() > 0
    features.requires_grad_(True)
    grads = torch.autograd.grad(
        mel.locality_loss(features, weight, logits, "max"), [logits, features], allow_unused=True
    )
    assert grads[0] is None and grads[1].abs().sum() > 0


def test_supervised_loss_uses_labeled_rows_only():
    torch.manual_seed(4)
    logits = torch.randn(6, 3)
    targets = torch.tensor([0, -1, 2, -1, 1, -1])
    labeled = targets >= 0
    expected = F.cross_entropy(logits[labeled], targets[labeled])
    assert torch.allclose(mel.supervised_loss(logits, targets, labeled.sum().float()), expected)
    none = mel.supervised_loss(logits, torch.full((6,), -1), torch.tensor(1.0))
    assert none.item() == 0.0


def test_compute_losses_combines_eq4():
    torch.manual_seed(5)
    features, weight = torch.rand(4, 6, 3, 3), torch.randn(5, 6)
    logits, targets = torch.randn(4, 5), torch.tensor([1, -1, 3, -1])
    out = mel.compute_losses(logits, features, weight, targets, 0.5, 2.0, 0.01)
    expected = (
        F.cross_entropy(logits[[0, 2]], targets[[0, 2]])
        + 0.5 * mel.mean_entropy_loss(logits)
        + 2.0 * mel.negative_batch_entropy_loss(logits)
        + 0.01 * mel.locality_loss(features, weight, logits)
    )
    assert torch.allclose(out["total"], expected, atol=1e-6)
    assert mel.compute_losses(logits, features, weight, targets, 0.5, 2.0, 0.0)["locality"].item() == 0.0


# --------------------------------------------------------------------------------------------- sampler, split
def test_sampler_labeled_share():
    labeled, unlabeled = np.arange(50), np.arange(1000, 1500)
    for ratio in (0.25, 0.8):
        sampler = mel.LabeledRatioBatchSampler(labeled, unlabeled, 64, ratio, seed=0)
        batches = [b for b, _ in zip(sampler, range(200))]
        flags = np.array([[is_labeled for _, is_labeled in batch] for batch in batches])
        indices = np.array([[index for index, _ in batch] for batch in batches])
        assert abs(flags.mean() - ratio) < 0.02
        assert np.isin(indices[flags], labeled).all() and np.isin(indices[~flags], unlabeled).all()
    for ratio, share in ((0.0, 0.0), (1.0, 1.0)):
        batch = next(iter(mel.LabeledRatioBatchSampler(labeled, unlabeled, 64, ratio, seed=0)))
        assert np.mean([is_labeled for _, is_labeled in batch]) == share


def test_sampler_ranks_disjoint_and_world_size_independent():
    labeled, unlabeled = np.arange(40), np.arange(100, 400)
    single = mel.LabeledRatioBatchSampler(labeled, unlabeled, 16, 0.5, seed=3)
    ranks = [mel.LabeledRatioBatchSampler(labeled, unlabeled, 16, 0.5, seed=3, rank=r, world_size=2) for r in range(2)]
    steps = 30
    single_batches = [b for b, _ in zip(single, range(steps))]
    rank_batches = [[b for b, _ in zip(s, range(steps))] for s in ranks]
    for step in range(steps):
        first, second = rank_batches[0][step], rank_batches[1][step]
        assert len(first) == len(second) == 8
        assert first != second and first + second == single_batches[step]  # same global batch, split in two
    # Each pass through a pool is a permutation of it, and the ranks' shares of a pass are disjoint.
    for pool, want in ((labeled, True), (unlabeled, False)):
        stream = [
            (index, slot // 8)
            for batch in single_batches
            for slot, (index, is_labeled) in enumerate(batch)
            if is_labeled == want
        ]
        assert len(stream) >= len(labeled)
        for start in range(0, len(stream), len(pool)):
            chunk = stream[start : start + len(pool)]
            indices = [index for index, _ in chunk]
            assert len(set(indices)) == len(indices) and set(indices) <= set(pool)
            if len(chunk) == len(pool):
                assert sorted(indices) == list(pool)
            by_rank = [{index for index, rank in chunk if rank == r} for r in (0, 1)]
            assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    # Different seeds give different schedules; a resumed sampler continues exactly.
    other = next(iter(mel.LabeledRatioBatchSampler(labeled, unlabeled, 16, 0.5, seed=4)))
    assert other != single_batches[0]
    resumed = mel.LabeledRatioBatchSampler(labeled, unlabeled, 16, 0.5, seed=3, start_step=17)
    assert [b for b, _ in zip(resumed, range(5))] == single_batches[17:22]


def test_make_split_balanced_disjoint_and_checked():
    targets = np.repeat(np.arange(4), 25)
    np.random.default_rng(0).shuffle(targets)
    labeled, unlabeled, valid = mel.make_split(targets, 4, 10, 50, 8, seed=1)
    counts = np.bincount(targets[labeled], minlength=4)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1
    assert len(unlabeled) == 50 and len(valid) == 8
    assert not (set(labeled) & set(unlabeled)) and not (set(labeled) & set(valid)) and not (set(valid) & set(unlabeled))
    again = mel.make_split(targets, 4, 10, 50, 8, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((labeled, unlabeled, valid), again))
    assert not np.array_equal(mel.make_split(targets, 4, 10, 50, 8, seed=2)[0], labeled)
    _, rest, _ = mel.make_split(targets, 4, 10, -1, 0, seed=1)
    assert len(rest) == 90
    with pytest.raises(ValueError, match="more than the 100 images"):
        mel.make_split(targets, 4, 101, 0, 0, seed=1)
    with pytest.raises(ValueError, match="class 3, which has only 10 images"):
        mel.make_split(np.repeat(np.arange(4), [30, 30, 30, 10]), 4, 60, 0, 0, seed=1)
    with pytest.raises(ValueError, match="more than"):
        mel.make_split(targets, 4, 10, 91, 0, seed=1)


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--labeled-ratio", "1.5"], "--labeled-ratio must be in [0, 1]"),
        (["--labeled-ratio", "-0.1"], "--labeled-ratio must be in [0, 1]"),
        (["--num-labeled", "0"], "--labeled-ratio > 0 needs --num-labeled > 0"),
        (["--block-config", "2,x"], "--block-config"),
        (["--resize-size", "16", "--crop-size", "32"], "--resize-size"),
        (["--loc-weight", "nan"], "--loc-weight"),
    ],
)
def test_bad_flags_rejected(flags, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        mel.parse_args(["--data-dir", "x", *flags])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_authors_augmentation_is_the_default_and_random_resized_crop_a_flag():
    """Authors' dataLoader.py:29-31: Resize(256) + RandomCrop(224) + flip; torchvision v2 ToImage + ToDtype(scale)."""
    from PIL import Image
    from torchvision.transforms import v2

    args = mel.parse_args(["--data-dir", "x"])
    assert args.augmentation == "authors" and args.torch_deterministic is False  # fast by default, as the authors
    authors = parts.train_transform("authors", 224, 256)
    kinds = [type(t) for t in authors.transforms]
    assert kinds[:3] == [v2.Resize, v2.RandomCrop, v2.RandomHorizontalFlip] and v2.ToImage in kinds
    assert any(isinstance(t, v2.ToDtype) and t.scale for t in authors.transforms)
    assert type(parts.train_transform("random-resized-crop", 224, 256).transforms[0]) is v2.RandomResizedCrop
    image = Image.fromarray(np.full((300, 400, 3), 255, dtype=np.uint8))
    for transform in (authors, parts.eval_transform(224, 256)):
        out = transform(image)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        torch.testing.assert_close(
            out[:, 0, 0], (1 - torch.tensor(parts.IMAGENET_MEAN)) / torch.tensor(parts.IMAGENET_STD)
        )
    # Resize(256) keeps the aspect: the short side becomes 256, so a 224 crop of a 300x400 image never rescales more
    assert authors.transforms[0].size == [256] or authors.transforms[0].size == 256


def test_bad_data_rejected_before_writing(image_folder, tmp_path):
    runs = tmp_path / "runs"
    missing = refuse_here("train_imagenet_mel.py", "--data-dir", tmp_path / "nowhere", "--runs-dir", runs, *TINY_NET)
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [
        f"train_imagenet_mel.py: error: {tmp_path / 'nowhere' / 'train'} is not a directory "
        "(--data-dir needs ImageNet-style train/ and val/ folders)"
    ]
    too_many = refuse_here(
        "train_imagenet_mel.py",
        *["--data-dir", image_folder, "--num-labeled", "49", "--num-unlabeled", "0", "--labeled-ratio", "1"],
        *["--runs-dir", runs, *TINY_NET],
    )
    assert too_many.returncode != 0
    assert too_many.stderr.strip().splitlines() == [
        "train_imagenet_mel.py: error: --num-labeled 49 is more than the 48 images in train/"
    ]
    assert not runs.exists()


# ------------------------------------------------------------------------------------------ DDP gradient maths
def _ddp_worker(rank, world_size, port, inputs, out_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = _TinyCAMNet()
    model.load_state_dict(inputs["state"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    share = len(inputs["images"]) // world_size
    rows = slice(rank * share, (rank + 1) * share)
    logits, features = ddp(inputs["images"][rows])
    losses = mel.compute_losses(
        logits, features, model.classifier.weight, inputs["targets"][rows], 0.5, 2.0, 0.1, "prob", False, world_size
    )
    losses["total"].backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, out_path)
    dist.destroy_process_group()


class _TinyCAMNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = torch.nn.Linear(6, 5)

    def forward(self, x):
        features = F.relu(self.conv(x))
        return self.classifier(features.mean(dim=(2, 3))), features


def test_ddp_gradient_equals_single_process_global_batch(tmp_path):
    """2 gloo ranks on halves of a batch (uneven labeled counts) give the gradient of eq. 4 on the whole batch:
    fails if NBEL is computed per rank or CE is normalised per rank."""
    import socket

    torch.manual_seed(6)
    model = _TinyCAMNet()
    images = torch.randn(8, 3, 5, 5)
    targets = torch.tensor([0, 3, -1, 1, -1, -1, -1, 2])  # rank 0: 3 labeled rows, rank 1: 1
    losses = mel.compute_losses(*model(images), model.classifier.weight, targets, 0.5, 2.0, 0.1, "prob", False, 1)
    losses["total"].backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(2, port, {"state": model.state_dict(), "images": images, "targets": targets}, out_path),
        nprocs=2,
    )
    ddp_grads = torch.load(out_path, weights_only=True)
    for name, p in model.named_parameters():
        assert torch.allclose(ddp_grads[name], p.grad, atol=1e-6, rtol=1e-5), name


# ---------------------------------------------------------------------------------------------- end-to-end
def test_end_to_end_single_process_resume_and_no_overwrite(image_folder, tmp_path):
    runs = tmp_path / "runs"
    common = [
        "--data-dir",
        image_folder,
        "--num-labeled",
        "16",
        "--num-unlabeled",
        "-1",
        "--num-valid",
        "8",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--log-every",
        "5",
        "--eval-every",
        "10",
        "--runs-dir",
        str(runs),
        "--run-name",
        "tiny",
        *TINY_NET,
    ]
    result = run_script([*common, "--total-steps", "20"])
    assert result.returncode == 0, result.stderr
    run_dir = runs / "tiny"
    assert {"args.json", "split.npz", "checkpoint.pt", "summary.json"} <= set(os.listdir(run_dir))
    split = np.load(run_dir / "split.npz")
    assert len(split["labeled"]) == 16 and len(split["valid"]) == 8 and len(split["unlabeled"]) == 48 - 16 - 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["steps_per_second"] > 0 and summary["world_size"] == 1
    for key in (
        "final_test_error",
        "final_test_top5_error",
        "final_valid_error",
        "best_valid_error",
        "test_error_at_best_valid",
    ):
        assert 0 <= summary[key] <= 100, key
    # Colour classes are learnt in 20 steps from 16 labels (chance: 75% error); broken labels would not be.
    assert summary["final_test_error"] <= 25.0
    scalars = read_scalars(str(run_dir))
    for tag in (
        "losses/total",
        "losses/cross_entropy",
        "losses/mel",
        "losses/nbel",
        "losses/locality",
        "charts/SPS",
        "charts/learning_rate",
        "charts/labeled_share",
        "eval/top1_error",
        "eval/top5_error",
        "eval/loss",
        "eval/valid_top1_error",
    ):
        assert tag in scalars and all(np.isfinite(scalars[tag])), tag
    assert len(scalars["eval/top1_error"]) == 2 and len(scalars["losses/total"]) == 4
    assert all(v <= 0 for v in scalars["losses/nbel"]) and all(v > 0 for v in scalars["losses/locality"])
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 20

    # The same run name again: refused, nothing overwritten.
    before = (run_dir / "summary.json").read_text()
    again = refuse_here("train_imagenet_mel.py", *[*common, "--total-steps", "20"])
    assert again.returncode != 0 and "exists" in again.stderr
    assert (run_dir / "summary.json").read_text() == before

    # Resume continues from step 20 to 25 in the same directory; changed settings are refused.
    resumed = run_script([*common, "--total-steps", "25", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at step 20" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 25 and summary["steps_this_run"] == 5
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 25
    changed = refuse_here(
        "train_imagenet_mel.py", *[*common, "--total-steps", "30", "--mel-weight", "0.5", "--resume", str(run_dir)]
    )
    assert changed.returncode != 0 and "mel_weight" in changed.stderr


def refused(argv, capsys):
    """(exit code, stderr) of main(argv) in this process: the refusals happen before any training, so they need no
    subprocess of their own."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        mel.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_init_from_another_run_loads_its_weights(image_folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    common = [
        "--data-dir",
        image_folder,
        "--num-labeled",
        "16",
        "--num-unlabeled",
        "-1",
        "--batch-size",
        "16",
        "--eval-every",
        "4",
        "--runs-dir",
        str(runs),
        *TINY_NET,
    ]
    first = run_script([*common, "--lr", "0.05", "--total-steps", "4", "--run-name", "mel"])
    assert first.returncode == 0, first.stderr
    # A zero-LR continuation keeps every weight (BN running statistics still move): the weights it saves are the
    # first run's, not a fresh initialisation; its step count and optimizer start fresh.
    warm = run_script(
        [
            *common,
            "--lr",
            "1e-30",
            "--weight-decay",
            "0",
            "--total-steps",
            "2",
            "--run-name",
            "warm",
            "--init-from",
            str(runs / "mel"),
        ]
    )
    assert warm.returncode == 0, warm.stderr
    assert "initialised the model from" in warm.stdout
    source = torch.load(runs / "mel" / "checkpoint.pt", weights_only=True)
    target = torch.load(runs / "warm" / "checkpoint.pt", weights_only=True)
    warm_summary = json.loads((runs / "warm" / "summary.json").read_text())
    assert target["step"] == 2 and warm_summary["steps"] == 2 and warm_summary["steps_this_run"] == 2
    weights = [k for k in source["model"] if k.endswith(".weight")]
    assert weights and all(torch.equal(source["model"][k], target["model"][k]) for k in weights)
    # (the authors' main.py recipe end to end: slots with replacement, probability-weighted CAMs, NBEL on mean logits)
    cold = run_script(
        [
            *common,
            "--lr",
            "1e-30",
            "--weight-decay",
            "0",
            "--total-steps",
            "2",
            "--run-name",
            "cold",
            "--recipe",
            "code",
        ]
    )
    assert not torch.equal(
        torch.load(runs / "cold" / "checkpoint.pt", weights_only=True)["model"]["classifier.weight"],
        source["model"]["classifier.weight"],
    )
    assert cold.returncode == 0
    # --resume continues the run from its own checkpoint; --init-from is ignored there.
    resumed = run_script(
        [
            *common,
            "--lr",
            "1e-30",
            "--weight-decay",
            "0",
            "--total-steps",
            "3",
            "--run-name",
            "warm",
            "--resume",
            str(runs / "warm"),
            "--init-from",
            str(tmp_path / "nowhere"),
        ]
    )
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr
    # Refusals, each one line with a non-zero exit and no run directory: another network (width, number of
    # classes), labels that would leak (another seed labels other images), a run not finished or being extended,
    # a missing or corrupt checkpoint.
    three_classes = make_image_folder(tmp_path / "three", classes=3)
    (runs / "broken").mkdir()
    (runs / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (runs / "broken" / "summary.json").write_text("{}")
    for name, steps in (("going", None), ("extending", 9)):
        (runs / name).mkdir()
        (runs / name / "checkpoint.pt").write_bytes((runs / "mel" / "checkpoint.pt").read_bytes())
        if steps:
            (runs / name / "summary.json").write_text(json.dumps({"steps": steps}))
    for source_dir, extra, message in (
        (runs / "mel", ["--growth-rate", "4"], "another network"),
        (runs / "mel", ["--data-dir", three_classes], "classifier.bias: (4,) there, (3,) here"),
        (runs / "mel", ["--seed", "2"], "their labels would leak"),
        (runs / "going", [], "has not finished"),
        (runs / "extending", [], "not the finished model"),
        (tmp_path / "nowhere", [], "no such run directory"),
        (runs / "broken", [], "corrupt or unreadable"),
    ):
        code, err = refused(
            [*common, "--total-steps", "2", "--run-name", "bad", "--init-from", str(source_dir), *extra], capsys
        )
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (runs / "bad").exists()
    code, err = refused([*common, "--total-steps", "2", "--resume", str(runs / "broken")], capsys)
    assert code != 0 and "corrupt or unreadable" in err
    assert (runs / "broken" / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing on disk touched


def test_torchrun_two_processes_gloo_identical_weights(image_folder, tmp_path):
    runs = tmp_path / "runs"
    result = run_script(
        [
            "--data-dir",
            image_folder,
            "--num-labeled",
            "16",
            "--num-unlabeled",
            "-1",
            "--batch-size",
            "16",
            "--lr",
            "0.05",
            "--total-steps",
            "12",
            "--log-every",
            "4",
            "--eval-every",
            "6",
            "--runs-dir",
            str(runs),
            "--run-name",
            "ddp",
            "--no-cuda",
            *TINY_NET,
        ],
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = runs / "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["max_param_diff_across_ranks"] == 0.0  # every parameter and BN buffer bitwise equal on both ranks
    assert 0 <= summary["final_test_error"] <= 100 and summary["num_test"] == 16
    assert os.listdir(runs) == ["ddp"]  # rank 1 wrote nothing of its own
    scalars = read_scalars(str(run_dir))
    assert len(scalars["losses/total"]) == 3 and all(np.isfinite(scalars["losses/total"]))
    # All ranks' labeled slots are counted: the logged share is the global batch's.
    assert all(0 < v < 1 for v in scalars["charts/labeled_share"])


def test_recipes_fill_the_flags_not_given():
    """--recipe paper (default): the run behind the authors' table (final report, experiments.tex at 07a3918);
    --recipe code: their main.py defaults. A flag on the command line wins over either."""
    paper = mel.parse_args(["--data-dir", "x"])
    assert (
        paper.arch,
        paper.batch_size,
        paper.epochs,
        paper.lr_step_epochs,
        paper.num_labeled,
        paper.num_unlabeled,
        paper.labeled_ratio,
        paper.mel_weight,
        paper.pool_sampling,
        paper.loc_weighting,
        paper.nbel_on_mean_logits,
    ) == ("densenet161", 52, 130, 20, 64000, 192000, 0.8, 0.8, "with", "prob", True)
    code = mel.parse_args(["--data-dir", "x", "--recipe", "code"])
    assert (
        code.arch,
        code.batch_size,
        code.epochs,
        code.lr_step_epochs,
        code.num_labeled,
        code.num_unlabeled,
        code.labeled_ratio,
        code.mel_weight,
        code.pool_sampling,
        code.loc_weighting,
        code.nbel_on_mean_logits,
    ) == ("densenet161", 140, 130, 30, 50000, 150000, 0.25, 1.0, "with", "prob", True)
    assert (code.nbel_weight, code.loc_weight, code.lr, paper.nbel_weight, paper.loc_weight) == (
        2.0,
        0.01,
        0.1,
        2.0,
        0.01,
    )
    mixed = mel.parse_args(
        [
            "--data-dir",
            "x",
            "--recipe",
            "code",
            "--batch-size",
            "8",
            "--no-nbel-on-mean-logits",
            "--pool-sampling",
            "without",
            "--loc-weighting",
            "max",
        ]
    )
    assert (
        mixed.batch_size,
        mixed.nbel_on_mean_logits,
        mixed.pool_sampling,
        mixed.loc_weighting,
        mixed.labeled_ratio,
    ) == (8, False, "without", "max", 0.25)


def test_sampler_with_replacement_is_seeded_by_step_and_draws_from_the_right_pool():
    labeled, unlabeled = np.arange(0, 6), np.arange(100, 400)
    sampler = mel.LabeledRatioBatchSampler(labeled, unlabeled, 32, 0.5, seed=5, replacement=True)
    batches = [b for _, b in zip(range(40), sampler.global_batches())]
    for indices, mask in batches:
        assert np.isin(indices[mask], labeled).all() and np.isin(indices[~mask], unlabeled).all()
    drawn = np.concatenate([indices[mask] for indices, mask in batches])
    assert len(drawn) > 6 * 10 and set(drawn.tolist()) == set(labeled.tolist())  # 6 images, drawn again and again
    assert any(len(set(i[m].tolist())) < m.sum() for i, m in batches)  # repeats inside one batch: with replacement
    resumed = mel.LabeledRatioBatchSampler(labeled, unlabeled, 32, 0.5, seed=5, start_step=17, replacement=True)
    first = next(resumed.global_batches())
    assert np.array_equal(first[0], batches[17][0]) and np.array_equal(first[1], batches[17][1])
    other = next(mel.LabeledRatioBatchSampler(labeled, unlabeled, 32, 0.5, seed=6, replacement=True).global_batches())
    assert not np.array_equal(other[0], batches[0][0])
