"""train_fmnist_ablation.py: the Debian idx loader on generated files, each negative-selection rule on hand-built
cases, the NS3L loss, an end-to-end run of every rule on a few steps, a run killed with SIGKILL and resumed, and bad
inputs."""

import gzip
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, read_scalars, refuse_here, run_script

import common
import train_fmnist_ablation as fm

SCRIPT = "train_fmnist_ablation.py"


# ------------------------------------------------------------------------------------------------ generated idx data
def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def learnable_images(n, rng, num_classes=10):
    """28x28 uint8 images: one coarse random prototype per class plus noise, labels cycling through the classes."""
    prototypes = np.random.RandomState(7).uniform(0, 255, (num_classes, 7, 7)).repeat(4, axis=1).repeat(4, axis=2)
    labels = np.arange(n) % num_classes
    images = np.clip(prototypes[labels] + rng.normal(0, 30, (n, 28, 28)), 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def debian_folder(tmp_path_factory):
    """A folder laid out like Debian's dataset-fashion-mnist (four gzipped idx files) holding a small task."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.RandomState(0)
    x_train, y_train = learnable_images(400, rng)
    x_test, y_test = learnable_images(100, rng)
    for name, array in (
        ("train-images-idx3-ubyte", x_train),
        ("train-labels-idx1-ubyte", y_train),
        ("t10k-images-idx3-ubyte", x_test),
        ("t10k-labels-idx1-ubyte", y_test),
    ):
        write_idx(str(folder / (name + ".gz")), array)
    return str(folder), (x_train, y_train, x_test, y_test)


def test_debian_idx_loader_on_generated_files(debian_folder, tmp_path, monkeypatch):
    folder, (x_train, y_train, x_test, y_test) = debian_folder
    assert np.array_equal(common.read_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")), y_test)
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", folder)
    data = common.load_dataset("fashion_mnist", str(tmp_path / "no_torchvision_copy"))  # -> the Debian layout
    assert data.x_train.shape == (400, 1, 28, 28) and data.x_train.dtype == torch.uint8
    assert np.array_equal(data.x_train[:, 0].numpy(), x_train) and np.array_equal(data.y_test.numpy(), y_test)
    write_idx(str(tmp_path / "bad-labels"), np.arange(5))
    with open(tmp_path / "bad-labels", "r+b") as f:
        f.truncate(10)  # header says 5 values, 2 left
    with pytest.raises(common.DataError, match="truncated"):
        common.read_idx(str(tmp_path / "bad-labels"))


# ------------------------------------------------------------------------------------------------- negative rules
def test_class_distances_on_hand_placed_points():
    labeled = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0], [100.0, 100.0], [0.0, -2.0]])
    labeled_y = torch.tensor([0, 1, 2, 2, 0])
    unlabeled = torch.tensor([[1.0, 0.0], [9.0, 1.0], [0.0, 4.0]])
    distances = fm.class_distances(unlabeled, labeled, labeled_y, num_classes=4, chunk=2)  # 2 blocks
    expected = torch.tensor(
        [
            [1.0, 9.0, math.sqrt(26.0), math.inf],
            [math.sqrt(82.0), math.sqrt(2.0), math.sqrt(97.0), math.inf],
            [4.0, math.sqrt(116.0), 1.0, math.inf],
        ]
    )
    assert torch.allclose(distances, expected, atol=1e-4)
    assert distances.argsort(1)[:, 0].tolist() == [0, 1, 2]  # class of the nearest labeled neighbour


RANK = torch.tensor(
    [
        [3, 7, 0, 9, 1, 2, 4, 5, 6, 8],  # classes by distance of their nearest labeled example
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    ]
).repeat(2000, 1)


def chosen_counts(negatives):
    return negatives.view(-1, 2, negatives.shape[1]).sum(0)  # (2, K): how often each class was picked, per row type


@pytest.mark.parametrize("num_negatives", [1, 3])
def test_nn_exclude_never_picks_the_nearest_class(num_negatives):
    negatives = fm.select_negatives("nn-exclude", num_negatives, 10, class_rank=RANK)
    assert (negatives.sum(1) == num_negatives).all()
    counts = chosen_counts(negatives)
    assert counts[0, 3] == 0 and counts[1, 0] == 0  # the nearest class
    assert (counts[0, [0, 1, 2, 4, 5, 6, 7, 8, 9]] > 0).all()  # every other class can be drawn


def test_nn_exclude_4_never_picks_the_4_nearest_classes():
    negatives = fm.select_negatives("nn-exclude-4", 1, 10, class_rank=RANK)
    assert (negatives.sum(1) == 1).all()
    counts = chosen_counts(negatives)
    assert counts[0, [3, 7, 0, 9]].sum() == 0 and counts[1, :4].sum() == 0
    assert (counts[0, [1, 2, 4, 5, 6, 8]] > 0).all() and (counts[1, 4:] > 0).all()
    frequencies = counts[0, [1, 2, 4, 5, 6, 8]].float() / counts[0].sum()
    assert (frequencies - 1 / 6).abs().max() < 0.05  # uniform over the 6 allowed classes


@pytest.mark.parametrize("num_negatives, expected", [(1, [[8], [9]]), (2, [[6, 8], [8, 9]])])
def test_nn_furthest_picks_the_furthest_classes(num_negatives, expected):
    negatives = fm.select_negatives("nn-furthest", num_negatives, 10, class_rank=RANK[:2])
    assert [row.nonzero().squeeze(1).tolist() for row in negatives] == expected


@pytest.mark.parametrize("num_negatives", [1, 3, 9])
def test_oracle_never_picks_the_true_class(num_negatives):
    hidden = torch.arange(4000) % 10
    negatives = fm.select_negatives("oracle", num_negatives, 10, hidden_labels=hidden)
    assert (negatives.sum(1) == num_negatives).all()
    assert not negatives.gather(1, hidden[:, None]).any()
    wrong_class_counts = negatives.sum(0)
    assert (wrong_class_counts > 0).all()


@pytest.mark.parametrize("num_negatives", [1, 3])
def test_uniform_can_pick_the_true_class_at_rate_p_over_k(num_negatives):
    hidden = torch.arange(20000) % 10
    negatives = fm.select_negatives("uniform", num_negatives, 10, hidden_labels=hidden)
    assert (negatives.sum(1) == num_negatives).all()
    hit_rate = negatives.gather(1, hidden[:, None]).float().mean().item()
    assert abs(hit_rate - num_negatives / 10) < 0.02
    assert ((negatives.sum(0).float() / negatives.sum()) - 0.1).abs().max() < 0.01


def test_threshold_marks_classes_below_t():
    probs = torch.tensor([[0.90, 0.02, 0.08], [0.04, 0.5, 0.46]])
    negatives = fm.select_negatives("threshold", 1, 3, logits=probs.log(), threshold=0.05)
    assert negatives.tolist() == [[False, True, False], [True, False, False]]


def test_ns3l_loss_hand_values_and_gradient():
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log().requires_grad_()
    negatives = torch.tensor([[False, True, False], [True, False, True]])
    loss = fm.ns3l_loss(logits, negatives)
    assert loss.item() == pytest.approx(-(math.log(0.7) + math.log(0.6)) / 2, rel=1e-5)
    loss.backward()
    assert logits.grad[0, 1] > 0 and logits.grad[0, 0] < 0  # pushes negatives down, the rest up
    assert fm.ns3l_loss(logits, torch.zeros_like(negatives)).item() == 0.0
    assert fm.ns3l_loss(logits, torch.ones_like(negatives)).item() == pytest.approx(-math.log(1e-8), rel=1e-5)


def test_max_negatives_pools():
    assert [
        fm.max_negatives(rule, 10) for rule in ("uniform", "oracle", "nn-exclude", "nn-exclude-4", "nn-furthest")
    ] == [10, 9, 9, 6, 10]


# ---------------------------------------------------------------------------------------------------- end to end
TINY = [
    "--num-labeled",
    "40",
    "--total-steps",
    "6",
    "--log-every",
    "3",
    "--eval-every",
    "3",
    "--batch-size",
    "20",
    "--unlabeled-batch-size",
    "100",
    "--hidden",
    "16",
    "--no-cuda",
    "--torch-deterministic",
]


def run_in_process(monkeypatch, runs_dir, *argv):
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, argv)])
    fm.main()
    with open(os.path.join(runs_dir, "run", "summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "rule, flags",
    [
        ("supervised", []),
        ("uniform", ["--num-negatives", "3"]),
        ("nn-exclude", []),
        ("nn-exclude-4", []),
        ("nn-furthest", []),
        ("threshold", ["--threshold", "0.05"]),
        ("oracle", ["--num-negatives", "3"]),
    ],
)
def test_every_rule_end_to_end_on_generated_debian_files(rule, flags, debian_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", debian_folder[0])
    runs = str(tmp_path / "runs")
    summary = run_in_process(
        monkeypatch,
        runs,
        "--dataset",
        "fashion_mnist",
        "--data-dir",
        str(tmp_path / "none"),
        "--negatives",
        rule,
        *flags,
        *TINY,
        "--runs-dir",
        runs,
        "--run-name",
        "run",
    )
    assert summary["steps"] == 6 and summary["negatives"] == rule
    assert 0.0 <= summary["final_test_error"] <= 100.0
    split = json.load(open(os.path.join(runs, "run", "split.json")))
    assert len(split["labeled"]) == 40 and len(split["unlabeled"]) == 360  # labeled images not in the stream
    tags = read_scalars(os.path.join(runs, "run"))
    assert {"losses/supervised", "losses/total", "eval/test_error", "charts/SPS"} <= set(tags)
    assert all(math.isfinite(v) for values in tags.values() for _, v in values)
    if rule == "supervised":
        assert summary["wrong_negative_share"] is None and "losses/ns3l" not in tags
        return
    assert "losses/ns3l" in tags and "charts/wrong_negative_share" in tags
    share = summary["wrong_negative_share"]
    if rule == "oracle":
        assert share == 0.0 and summary["negatives_per_sample"] == 3
    elif rule == "uniform":
        assert summary["negatives_per_sample"] == 3 and 3.0 < share < 20.0  # 10% expected, 1,800 draws
    elif rule.startswith("nn-"):
        assert summary["nn_preprocess_seconds"] > 0 and summary["negatives_per_sample"] == 1
        assert summary["nn_1nn_accuracy"] > 90.0  # the generated classes are well separated in pixel space
        assert share < 5.0
    else:  # threshold: a fresh network predicts ~0.1 everywhere, so few negatives below T = 0.05 early on
        assert summary["negatives_per_sample"] < 9


def test_rows_of_a_seed_see_the_same_labeled_batches_and_report_the_mean_of_the_last_epochs(
    debian_folder, tmp_path, monkeypatch
):
    """A row that draws unlabeled batches and random negatives but gives them no weight trains exactly as supervised:
    the labeled batches, unlabeled batches and negatives are separate streams (with one global RNG the labeled order
    of the second epoch on would differ). The reported number is the mean test error at the last --mean-of epochs."""
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", debian_folder[0])
    runs = str(tmp_path / "runs")
    summaries, curves = {}, {}
    for rule in ("supervised", "uniform"):
        base = ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "none"), *TINY, "--mean-of", "2"]
        summaries[rule] = run_in_process(
            monkeypatch, runs, *base, "--negatives", rule, "--ns3l-weight", "0", "--runs-dir", runs, "--run-name", "run"
        )
        curves[rule] = read_scalars(os.path.join(runs, "run"))
        os.rename(os.path.join(runs, "run"), os.path.join(runs, rule))
    assert curves["supervised"]["losses/supervised"] == curves["uniform"]["losses/supervised"]
    assert curves["supervised"]["eval/test_error"] == curves["uniform"]["eval/test_error"]
    assert summaries["uniform"]["wrong_negative_share"] > 0  # it did draw negatives
    # TINY: 40 labeled / batch 20 = 2 steps per epoch, 6 steps, --eval-every 3: evaluations at 3, 4 (epoch 2), 6
    tests = dict(curves["uniform"]["eval/test_error"])
    assert sorted(tests) == [3, 4, 6]
    summary = summaries["uniform"]
    assert summary["mean_of"] == 2 and summary["reported_metric"] == "mean_last_test_error"
    assert summary["mean_last_test_error"] == pytest.approx((tests[4] + tests[6]) / 2)
    assert summary["final_test_error"] == pytest.approx(tests[6])


def test_a_run_extended_by_resume_averages_only_its_new_last_epochs(debian_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", debian_folder[0])
    runs = str(tmp_path / "runs")
    base = ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "none"), *TINY, "--mean-of", "2"]
    first = run_in_process(monkeypatch, runs, *base, "--negatives", "uniform", "--runs-dir", runs, "--run-name", "run")
    assert first["steps"] == 6 and first["mean_of"] == 2  # epochs 2 and 3 (steps 4, 6)
    longer = run_in_process(monkeypatch, runs, "--resume", os.path.join(runs, "run"), "--total-steps", "10")
    tests = dict(read_scalars(os.path.join(runs, "run"))["eval/test_error"])
    assert longer["steps"] == 10 and longer["mean_of"] == 2  # epochs 4 and 5 (steps 8, 10), not step 4 or 6
    assert longer["mean_last_test_error"] == pytest.approx((tests[8] + tests[10]) / 2)


def test_epoch_unit_labeled_by_default_unlabeled_as_a_flag(debian_folder, tmp_path, monkeypatch):
    """'50 epochs' is undefined in the paper: passes over the labeled set (default) or over the unlabeled images."""
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", debian_folder[0])
    assert fm.parse_args([]).epoch_unit == "labeled"
    flags = [
        "--dataset",
        "fashion_mnist",
        "--data-dir",
        str(tmp_path / "none"),
        "--num-labeled",
        "40",
        "--batch-size",
        "20",
        "--unlabeled-batch-size",
        "100",
        "--hidden",
        "16",
        "--no-cuda",
        "--epochs",
        "1",
        "--log-every",
        "1",
    ]
    for unit, steps in (("labeled", 2), ("unlabeled", 4)):  # 40 / 20 labeled; 360 unlabeled / 100 -> 4
        runs = str(tmp_path / unit)
        summary = run_in_process(
            monkeypatch, runs, *flags, "--epoch-unit", unit, "--runs-dir", runs, "--run-name", "run"
        )
        assert summary["steps"] == steps and summary["epochs"] == 1


def test_subprocess_run_writes_the_run_directory(tmp_path):
    rng = np.random.RandomState(1)
    x_train, y_train = learnable_images(200, rng)
    x_test, y_test = learnable_images(50, rng)
    npz = str(tmp_path / "tiny.npz")
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    result = run_script(
        SCRIPT,
        "--dataset",
        npz,
        "--negatives",
        "nn-exclude-4",
        *TINY,
        "--runs-dir",
        tmp_path / "runs",
        "--run-name",
        "r",
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "nearest-neighbour preprocessing" in result.stdout and "done: nn-exclude-4" in result.stdout
    run_dir = tmp_path / "runs" / "r"
    assert {"args.json", "split.json", "summary.json"} <= set(os.listdir(run_dir))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["args"]["negatives"] == "nn-exclude-4" and summary["steps_per_second"] > 0


def assert_identical(a, b, where="checkpoint"):
    """Nested dicts / lists of tensors and numbers: equal bit for bit (same dtype, same values, NaN == NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: dtype / shape"
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), f"{where} differs"
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def test_run_killed_with_sigkill_resumes_bit_identical_to_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """One command run through, and the same command killed with SIGKILL between two checkpoints (a real subprocess,
    after it logged step 10 of 150; checkpoints every epoch = 3 steps) and continued with --resume: the final weights,
    Adam state, samplers, every RNG, the running sums and counters, the evaluation record, summary.json and every
    TensorBoard scalar (SPS and timings aside) are equal bit for bit. Deterministic kernels and OMP_NUM_THREADS=1 in
    both. nn-exclude draws its negatives from their own generator at every step, so a stream left unrestored changes
    the weights; --mean-of 48 puts the kill inside the averaged last epochs, so their record must survive too. A
    resume of the finished run is refused in one line, and a new run of the same name points to --resume."""
    rng = np.random.RandomState(2)
    x_train, y_train = learnable_images(200, rng)
    x_test, y_test = learnable_images(50, rng)
    npz = str(tmp_path / "tiny.npz")
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    runs = tmp_path / "runs"
    command = [
        *("--dataset", npz, "--negatives", "nn-exclude", "--num-negatives", "2", "--num-labeled", "60"),
        *("--num-valid", "20", "--batch-size", "20", "--unlabeled-batch-size", "50", "--hidden", "16"),
        *("--total-steps", "150", "--log-every", "2", "--eval-every", "4", "--no-cuda", "--torch-deterministic"),
        *("--mean-of", "48", "--runs-dir", str(runs)),
    ]
    whole = run_script(SCRIPT, *command, "--run-name", "whole", cwd=str(tmp_path))
    assert whole.returncode == 0, whole.stderr

    # The same command, killed once it has logged step 10: its last checkpoint is at step 9 (or a later epoch end).
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")  # as run_script
    with open(tmp_path / "killed.err", "w") as err:
        killed = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, SCRIPT), *command, "--run-name", "legs"],
            cwd=str(tmp_path),
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        for line in killed.stdout:
            if line.startswith("step 10/150"):
                killed.send_signal(signal.SIGKILL)
                break
        killed.stdout.close()
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.err").read_text()
    legs = runs / "legs"
    stopped = torch.load(legs / "checkpoint.pt", weights_only=True)
    assert 9 <= stopped["step"] < 150 and stopped["step"] % 3 == 0 and not (legs / "summary.json").exists()

    resumed = run_script(SCRIPT, "--resume", legs, cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {legs} at step {stopped['step']}" in resumed.stdout

    # Weights, optimiser, samplers, RNG, sums, counters and the evaluation record of the final checkpoints.
    a = torch.load(runs / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(legs / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 150 and a["timed_steps"] == b["timed_steps"] == 150
    timing = ("args", "train_time", "nn_seconds")  # args differ in --run-name / --resume only (below)
    assert_identical({k: v for k, v in a.items() if k not in timing}, {k: v for k, v in b.items() if k not in timing})
    assert a["best_valid"] is not None and a["test_error"] == a["test_error"]  # the record was really kept

    # summary.json, timings aside; the resumed run keeps its own arguments.
    summaries = [json.load(open(runs / name / "summary.json")) for name in ("whole", "legs")]
    for summary in summaries:
        assert summary["steps"] == 150 and summary["steps_per_second"] > 0 and summary["nn_preprocess_seconds"] > 0
        for key in ("steps_per_second", "train_seconds", "compile_seconds", "nn_preprocess_seconds"):
            summary.pop(key)
    assert summaries[0]["args"].pop("run_name") == "whole" and summaries[0]["args"].pop("resume") is None
    assert summaries[1]["args"].pop("run_name") == "legs" and summaries[1]["args"].pop("resume") == str(legs)
    assert summaries[0] == summaries[1]

    # Every TensorBoard point, the killed leg's events after its checkpoint purged (the resumed leg wrote them again).
    scalars = [read_scalars(runs / name) for name in ("whole", "legs")]
    for tags in scalars:
        tags.pop("charts/SPS")
        assert len(tags.pop("charts/nn_preprocess_seconds")) == 1
    assert scalars[0].keys() == scalars[1].keys() and "eval/valid_error" in scalars[0]
    for tag in scalars[0]:
        assert scalars[0][tag] == scalars[1][tag], tag
    assert [step for step, _ in scalars[1]["losses/total"]] == list(range(2, 151, 2))

    # A finished run is refused in one line and left untouched; its name is taken and points to --resume.
    before = (legs / "summary.json").read_bytes()
    again = run_script(SCRIPT, "--resume", legs, cwd=str(tmp_path))
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
    assert "already finished 150 steps" in again.stderr and (legs / "summary.json").read_bytes() == before
    monkeypatch.setattr(sys, "argv", [SCRIPT, *command, "--run-name", "legs"])
    with pytest.raises(SystemExit) as exit_info:
        fm.main()
    assert exit_info.value.code == 1 and f"continue it with --resume {legs}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--threshold", "1.5"], 2, "--threshold must be in (0, 1)"),
        (["--negatives", "random"], 2, "invalid choice"),
        (["--num-negatives", "0"], 2, "--num-negatives must be >= 1"),
        (["--epochs", "0"], 2, "--epochs must be >= 1"),
        (["--lr", "-1"], 2, "--lr must be > 0"),
        (["--dataset", "imagenet"], 2, "unknown data set"),
        (["--dataset", "missing.npz"], 1, "missing.npz does not exist"),
        (["--negatives", "oracle", "--num-negatives", "10"], 1, "at most 9"),
        (["--negatives", "nn-exclude-4", "--num-negatives", "7"], 1, "at most 6"),
        (["--num-labeled", "5000"], 1, "exceed the"),
    ],
)
def test_bad_inputs_one_line_nonzero_nothing_written(argv, code, message, debian_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", debian_folder[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            SCRIPT,
            "--data-dir",
            str(tmp_path / "none"),
            "--no-cuda",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--num-labeled",
            "40",
            *argv,
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        fm.main()
    assert exit_info.value.code == code
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert message in err_lines[-1] and "Traceback" not in "\n".join(err_lines)
    if code == 1:
        assert len(err_lines) == 1
    assert os.listdir(tmp_path) == []  # no run directory, no file


def test_bad_input_from_the_command_line_and_existing_run_untouched(tmp_path):
    result = refuse_here(SCRIPT, "--threshold", "0", "--runs-dir", tmp_path / "runs")
    assert result.returncode == 2 and "--threshold must be in (0, 1)" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "summary.json").write_text("{}")
    result = refuse_here(
        SCRIPT,
        *["--dataset", "digits", "--num-labeled", "20", "--run-name", "taken", "--runs-dir", tmp_path / "runs"],
        *["--total-steps", "1", "--no-cuda"],
    )
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "already exists" in result.stderr
    assert os.listdir(tmp_path / "runs" / "taken") == ["summary.json"]
    assert (tmp_path / "runs" / "taken" / "summary.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------------------ runner
def test_runner_table_has_every_paper_row_and_aggregates_seeds(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fmnist_table", os.path.join(os.path.dirname(fm.__file__), "benchmark", "fmnist_table.py")
    )
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    assert [row[1] for row in runner.ROWS] == [
        "supervised",
        "uniform-1",
        "uniform-3",
        "nn-exclude-1",
        "nn-exclude-4-1",
        "nn-furthest-1",
        "threshold-0.03",
        "threshold-0.05",
        "oracle-1",
        "oracle-3",
    ]
    for seed, error in ((1, 15.0), (2, 17.0)):
        run_dir = tmp_path / f"oracle-3__seed{seed}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "mean_last_test_error": error,
                    "final_test_error": error + 1.0,
                    "mean_of": 10,
                    "wrong_negative_share": 0.0,
                    "negatives_per_sample": 3.0,
                    "nn_preprocess_seconds": None,
                    "epochs": 20,
                    "steps": 800,
                    "args": {"batch_size": 50, "unlabeled_batch_size": 50, "lr": 1e-3, "ns3l_weight": 1.0},
                }
            )
        )
    text = runner.table(type("Args", (), {"runs_dir": str(tmp_path), "seeds": [1, 2, 3]})())
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 15.20 ± 0.66 | 16.00 ± 1.41 | 17.00 ± 1.41 | 2 | 3.00 | 0.00 ± 0.00 |" in rows["Oracle - 3"]
    assert "| 17.25 ± 0.22 | - | - | 0 |" in rows["Supervised"]
    assert "20 epochs = 800 steps" in text and "ends of its last 10 epochs" in text
    # the ordering claims: paired differences on the same seed, mean ± standard error, checked by hand
    for stem, errors in (
        ("supervised", (16.0, 17.0, 16.5)),
        ("uniform-1", (17.0, 17.5, 18.5)),
        ("oracle-1", (15.5, 16.0, 16.0)),
    ):
        for seed, error in zip((1, 2, 3), errors):
            (tmp_path / f"{stem}__seed{seed}").mkdir()
            (tmp_path / f"{stem}__seed{seed}" / "summary.json").write_text(json.dumps({"mean_last_test_error": error}))
    text = runner.claims(type("Args", (), {"runs_dir": str(tmp_path), "seeds": [1, 2, 3]})())
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ") and " − " in line}
    # uniform-1 - supervised = +1.0, +0.5, +2.0: mean 1.1667, std 0.7638, s.e. 0.4410, 2.6 s.e. in the claimed direction
    assert lines["Uniform - 1 − Supervised"].endswith("| +1.17 ± 0.44 | +2.6 | yes |")
    # oracle-3 (seeds 1, 2 only) against the best other row by mean, oracle-1: -0.5, +1.0 -> mean +0.25, s.e. 0.75
    assert lines["Oracle - 3 − Oracle - 1"].endswith("| +0.25 ± 0.75 | -0.3 | no, within noise |")
    assert "Threshold" not in text  # rows without runs are left out
    # a row without a reference (only oracle-3 has runs) is left out instead of failing; equal runs are "within noise"
    only = tmp_path / "only"
    for seed, error in ((1, 15.0), (2, 16.0)):
        (only / f"oracle-3__seed{seed}").mkdir(parents=True)
        (only / f"oracle-3__seed{seed}" / "summary.json").write_text(json.dumps({"mean_last_test_error": error}))
    assert " − " not in runner.claims(type("Args", (), {"runs_dir": str(only), "seeds": [1, 2]})())
    for seed in (1, 2):
        (only / f"oracle-1__seed{seed}").mkdir()
        (only / f"oracle-1__seed{seed}" / "summary.json").write_text(
            json.dumps({"mean_last_test_error": 15.0 + seed - 1})
        )
    assert "| +0.00 ± 0.00 | +0.0 | no, within noise |" in runner.claims(
        type("Args", (), {"runs_dir": str(only), "seeds": [1, 2]})()
    )
    # a run written before the mean of the last epochs existed is not mixed into a table: one line, exit
    (only / "oracle-1__seed1" / "summary.json").write_text(json.dumps({"final_test_error": 15.0}))
    with pytest.raises(SystemExit, match="oracle-1__seed1.*no mean_last_test_error"):
        runner.claims(type("Args", (), {"runs_dir": str(only), "seeds": [1, 2]})())
