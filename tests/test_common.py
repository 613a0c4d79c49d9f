"""The data layer: loaders (torchvision layouts generated here, idx files, npz, digits), splits, preprocessing,
augmentation and the batch sampler."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch

import bookkeeping
import common


# ------------------------------------------------------------------------------------------------------- loaders
def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def make_idx_folder(folder, n_train=30, n_test=10, gz=True):
    rng = np.random.RandomState(0)
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(os.path.join(folder, name + ext), array)
    return arrays


def test_idx_reader_and_folder_loader(tmp_path):
    arrays = make_idx_folder(str(tmp_path))
    x_train, y_train, x_test, y_test = common._load_idx_folder(str(tmp_path))
    assert np.array_equal(x_train, arrays["train-images-idx3-ubyte"])
    assert np.array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])
    with open(tmp_path / "bad", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # says 9 values, holds 3
    with pytest.raises(common.DataError, match="truncated"):
        common.read_idx(str(tmp_path / "bad"))


def test_fashion_mnist_through_torchvision_layout(tmp_path):
    # torchvision's FashionMNIST reads the unzipped idx files under <root>/FashionMNIST/raw.
    arrays = make_idx_folder(str(tmp_path / "FashionMNIST" / "raw"), gz=False)
    data = common.load_dataset("fashion_mnist", str(tmp_path))
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_train.dtype == torch.uint8
    assert np.array_equal(data.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert data.num_classes == 10 and data.num_labelable == 30


@pytest.mark.skipif(not os.path.isdir(common.DEBIAN_FASHION_MNIST), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    data = common.load_dataset("fashion_mnist", str(tmp_path))  # no torchvision copy there -> the Debian files
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert data.x_train.float().mean().item() == pytest.approx(72.94, abs=0.01)  # the official train-set mean


def test_cifar10_through_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    batches = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batches[name] = {"data": rng.randint(0, 256, (4, 3072)).astype(np.uint8), "labels": list(range(4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)  # generated files have other md5s
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    data = common.load_dataset("cifar10", str(tmp_path))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    # pickled rows are CHW-flattened: channel 0 of image 0 is the first 1024 bytes
    assert np.array_equal(data.x_train[0, 0].numpy().ravel(), batches["data_batch_1"]["data"][0, :1024])
    assert data.num_classes == 10


def test_svhn_and_stl10_through_torchvision_layout(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd

    rng = np.random.RandomState(0)
    for split, n in (("train", 6), ("test", 3), ("extra", 5)):
        # SVHN .mat: X is (32, 32, 3, N), labels 1..10 with 10 meaning digit 0
        scipy.io.savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8), "y": (np.arange(n) % 10 + 1)[:, None]},
        )
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    data = common.load_dataset("svhn", str(tmp_path))
    assert data.x_train.shape == (6, 3, 32, 32) and data.y_train.tolist() == [1, 2, 3, 4, 5, 6]
    extra = common.load_dataset("svhn", str(tmp_path), svhn_extra=True)
    assert extra.x_train.shape[0] == 11 and extra.num_labelable == 6

    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    for name, n in (("train_X.bin", 4), ("test_X.bin", 2), ("unlabeled_X.bin", 3)):
        rng.randint(0, 256, n * 3 * 96 * 96).astype(np.uint8).tofile(stl / name)
    for name, n in (("train_y.bin", 4), ("test_y.bin", 2)):
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(stl / name)
    (stl / "class_names.txt").write_text("\n".join(str(i) for i in range(10)))
    (stl / "fold_indices.txt").write_text("0 1\n")
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)
    data = common.load_dataset("stl10", str(tmp_path))
    assert data.x_train.shape == (7, 3, 96, 96) and data.num_labelable == 4
    assert data.y_train[4:].tolist() == [-1, -1, -1]  # the unlabeled split has no labels


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(common.DataError, match="--download"):
        common.load_dataset("cifar10", str(tmp_path))
    with pytest.raises(common.DataError, match="unknown data set"):
        common.load_dataset("imagenet", str(tmp_path))
    with pytest.raises(common.DataError, match="does not exist"):
        common.load_dataset(str(tmp_path / "nope.npz"))


def test_npz_and_digits(tmp_path):
    rng = np.random.RandomState(0)
    path = str(tmp_path / "mine.npz")
    np.savez(
        path,
        x_train=rng.rand(12, 10, 10, 3),
        y_train=np.arange(12) % 3,
        x_test=rng.rand(5, 10, 10, 3),
        y_test=np.arange(5) % 3,
    )
    data = common.load_dataset(path)
    assert data.x_train.shape == (12, 3, 10, 10) and data.x_train.dtype == torch.uint8 and data.num_classes == 3
    assert data.name == "npz"
    np.savez(str(tmp_path / "bad.npz"), x_train=np.zeros((2, 4, 4)))
    with pytest.raises(common.DataError, match="lacks"):
        common.load_dataset(str(tmp_path / "bad.npz"))
    digits = common.load_dataset("digits")
    assert digits.x_train.shape == (1300, 1, 8, 8) and digits.x_test.shape == (497, 1, 8, 8)
    assert digits.x_train.max() == 255


# --------------------------------------------------------------------------------------------------------- split
def test_split_sizes_balance_disjointness_and_seed():
    labels = torch.arange(1000) % 10
    split = common.make_ssl_split(labels, 10, num_labeled=100, num_valid=200, seed=3)
    labeled, unlabeled, valid = (set(s.tolist()) for s in (split.labeled, split.unlabeled, split.valid))
    assert len(labeled) == 100 and len(valid) == 200 and len(unlabeled) == 700  # disjoint by default (NS3L counts)
    assert torch.bincount(labels[split.labeled], minlength=10).tolist() == [10] * 10
    assert not (valid & labeled) and not (valid & unlabeled) and not (labeled & unlabeled)
    assert split.labeled_in_unlabeled is False
    assert torch.equal(common.make_ssl_split(labels, 10, 100, 200, seed=3).labeled, split.labeled)
    other = common.make_ssl_split(labels, 10, 100, 200, seed=4)
    assert not torch.equal(other.labeled, split.labeled) and torch.equal(other.valid, split.valid)
    included = common.make_ssl_split(labels, 10, 100, 200, seed=3, include_labeled=True)  # Oliver et al.'s TF stream
    assert len(included.unlabeled) == 800 and labeled <= set(included.unlabeled.tolist())
    assert included.labeled_in_unlabeled is True and torch.equal(included.labeled, split.labeled)
    uneven = common.make_ssl_split(labels, 10, 105, 0, seed=0)
    assert sorted(torch.bincount(labels[uneven.labeled]).tolist()) == [10] * 5 + [11] * 5


def test_split_with_unlabeled_only_rows_and_errors():
    labels = torch.cat([torch.arange(100) % 10, torch.full((50,), -1)])
    split = common.make_ssl_split(labels, 10, 20, 10, seed=0, num_labelable=100)
    assert split.valid.max() < 100 and split.labeled.max() < 100 and len(split.unlabeled) == 120
    with pytest.raises(common.DataError, match="exceed"):
        common.make_ssl_split(labels, 10, 95, 10, seed=0, num_labelable=100)
    with pytest.raises(common.DataError, match="class 9"):
        common.make_ssl_split(torch.cat([torch.arange(90) % 9, torch.tensor([9])]), 10, 20, 0, seed=0)


def test_batch_sampler_epochs_and_state():
    torch.manual_seed(0)
    indices = torch.arange(10, 20)
    sampler = common.BatchSampler(indices, 4)
    first = torch.cat([next(sampler) for _ in range(5)])  # 20 indices = exactly two epochs
    assert sorted(first[:10].tolist()) == list(range(10, 20)) and sorted(first[10:].tolist()) == list(range(10, 20))
    state, rng = sampler.state_dict(), torch.get_rng_state()
    ahead = [next(sampler) for _ in range(3)]
    resumed = common.BatchSampler(indices, 4)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [next(resumed) for _ in range(3)]))


def test_batch_sampler_with_its_own_generator_ignores_global_draws_and_resumes(capsys):
    indices = torch.arange(10, 20)

    def batches(global_draws):
        sampler = common.BatchSampler(indices, 4, generator=torch.Generator().manual_seed(7))
        out = []
        for _ in range(6):
            torch.rand(global_draws)  # another stream's draws in between (a row's negatives)
            out.append(next(sampler))
        return torch.cat(out), sampler

    quiet, _ = batches(0)
    busy, sampler = batches(1000)
    assert torch.equal(quiet, busy)
    global_order = common.BatchSampler(indices, 4)  # the global RNG stream does move with other draws
    torch.manual_seed(0)
    a = torch.cat([next(global_order) for _ in range(6)])
    global_order = common.BatchSampler(indices, 4)
    torch.manual_seed(0)
    torch.rand(1000)
    assert not torch.equal(a, torch.cat([next(global_order) for _ in range(6)]))
    state = sampler.state_dict()  # the generator's state travels with the checkpoint
    ahead = [next(sampler) for _ in range(4)]
    resumed = common.BatchSampler(indices, 4, generator=torch.Generator().manual_seed(123))
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(ahead, [next(resumed) for _ in range(4)]))
    # a checkpoint without the stream (older, or another device's state): a fresh stream and one line that says so
    fresh = common.BatchSampler(indices, 4, generator=torch.Generator().manual_seed(123))
    fresh.load_state_dict({"order": state["order"], "position": state["position"], "generator": torch.zeros(16)})
    assert "the batch order continues on a fresh random stream" in capsys.readouterr().out
    assert torch.equal(next(fresh), ahead[0])  # the saved order of this epoch is kept; only later epochs differ


# -------------------------------------------------------------------------------------------------- preprocessing
def test_zca_whitens_its_fit_data():
    torch.manual_seed(0)
    mixing = torch.randn(12, 12)
    data = (torch.randn(4000, 12) @ mixing).double()
    mean, matrix = common.fit_zca(data, identity_scale=0.0)
    white = (data.float() - mean) @ matrix
    covariance = torch.cov(white.T.double())
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(matrix, matrix.T, atol=1e-5)  # ZCA (not PCA) whitening is symmetric
    # Oliver et al.'s 0.1 * I regulariser shrinks each eigen-direction by S / (S + 0.1)
    mean, matrix = common.fit_zca(data, identity_scale=0.1)
    eig = torch.linalg.eigvalsh(torch.cov(data.T))
    got = torch.linalg.eigvalsh(torch.cov(((data.float() - mean) @ matrix).T.double()))
    assert torch.allclose(got, (eig / (eig + 0.1)).sort().values, atol=1e-3)


def test_gcn_and_normalizers():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    gcn = common.global_contrast_normalize(x.double())
    assert torch.allclose(gcn.reshape(6, -1).norm(dim=1), torch.full((6,), 55.0, dtype=torch.float64))
    assert torch.allclose(gcn.reshape(6, -1).mean(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-9)
    scaled = common.Normalizer("scale")(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    assert scaled.flatten().tolist() == [-1.0, 1.0]
    zca = common.Normalizer("zca", torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8))
    assert zca(x).shape == x.shape and zca(x).dtype == torch.float32


# --------------------------------------------------------------------------------------------------- augmentation
def test_augment_shapes_ranges_and_per_sample_randomness():
    torch.manual_seed(0)
    base = torch.rand(1, 3, 16, 16) * 2 - 1
    x = base.repeat(64, 1, 1, 1)
    out = common.augment(x, flip=True, shift=2)
    assert out.shape == x.shape and out.min() >= base.min() and out.max() <= base.max()  # flips/shifts move pixels only
    distinct = {tuple(o.flatten()[:40].tolist()) for o in out}
    assert len(distinct) > 20  # 2 x 5 x 5 = 50 possible results, drawn per sample
    assert torch.equal(common.augment(x), x)  # nothing asked, nothing done
    noisy = common.augment(x, noise_std=0.15)
    assert abs((noisy - x).std().item() - 0.15) < 0.01


def test_translation_is_a_reflect_padded_shift():
    torch.manual_seed(1)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = common.augment(x, shift=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        crops = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) for c in crops)


def test_flip_only_where_allowed():
    assert common.augmentation_defaults("cifar10") == (True, 2, 0.15)
    assert common.augmentation_defaults("svhn") == (False, 2, 0.0)
    assert common.augmentation_defaults("digits")[0] is False
    torch.manual_seed(0)
    x = torch.rand(200, 1, 4, 4)
    flipped = common.augment(x, flip=True)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 60 < int(mirrored.sum()) < 140


def test_open_run_new_resumed_and_existing(tmp_path, capsys):
    import argparse

    split = common.make_ssl_split(torch.arange(100) % 10, 10, 20, 10, seed=0)
    args = argparse.Namespace(dataset="digits", seed=3, runs_dir=str(tmp_path), run_name=None, resume=None, lr=0.1)
    run_dir, writer = bookkeeping.open_run(args, "sup", split)
    for step in (5, 7):  # a crashed leg logged step 7 after its checkpoint at step 5
        writer.add_scalar("x", float(step), step)
    writer.close()
    bookkeeping.save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), {"step": 5})  # a run worth keeping
    name = os.path.basename(run_dir)
    assert name.startswith("digits__sup__3__") and os.path.dirname(run_dir) == str(tmp_path)
    assert json.load(open(os.path.join(run_dir, "args.json")))["lr"] == 0.1
    assert os.path.exists(os.path.join(run_dir, "split.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    # A resumed run reopens its own directory and writes nothing new there but events.
    before = sorted(os.listdir(run_dir))
    args.resume = run_dir
    resumed_dir, writer = bookkeeping.open_run(args, "sup", split, {"step": 5})
    writer.add_scalar("x", 6.0, 6)
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(5, 5.0), (6, 6.0)]  # step 7 purged, 5 kept
    assert (
        resumed_dir == run_dir
        and {"args.json", "split.json"} <= set(os.listdir(run_dir))
        and set(before) <= set(os.listdir(run_dir))
    )
    # The same --run-name again: one line, exit 1, the existing run untouched.
    args.resume, args.run_name = None, name
    with pytest.raises(SystemExit) as exit_info:
        bookkeeping.open_run(args, "sup", split)
    assert exit_info.value.code == 1 and "already exists" in capsys.readouterr().err
    assert json.load(open(os.path.join(run_dir, "args.json")))["lr"] == 0.1
    bookkeeping.unlock_run_dir(run_dir)
