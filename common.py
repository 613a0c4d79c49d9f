"""Data for every image script: loading, the labeled / unlabeled / validation split, preprocessing and batched
augmentation on the device. Nothing here is an algorithm; everything here is shared.

Images are held on the device as uint8 tensors (N, C, H, W) for their whole life. A training batch is gathered by
index, normalised (GCN + ZCA for CIFAR, [-1, 1] otherwise, as Oliver et al.'s build_tfrecords.py) and augmented on the device with
per-sample randomness drawn from the global torch RNG, so a seeded run is reproducible and resumable.
"""
import argparse
import contextlib
import gzip
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DataError(Exception):
    """A user-facing data problem (missing files, impossible split): printed as one line, exit 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, '<prog>: error: <message>' on stderr and exit 2, without the usage block
    (the full usage is one --help away), and whose --help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message, code=1):
    """Print one clear line on stderr and exit non-zero (bad input never produces a traceback). Under torchrun every
    rank meets the same error; only rank 0 prints it."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{os.path.basename(sys.argv[0]) or 'error'}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# Per-data-set facts: number of classes, preprocessing, Protocol A augmentation, default split sizes.
#   num_valid: held out of train for model selection (NS3L paper: CIFAR 5,000, SVHN 7,325).
#   num_labeled: the paper's setting (Table 1; STL-10 Table 5); small sets get a CPU-scale default.
DATASETS = {
    "cifar10": dict(num_classes=10, preprocess="zca", flip=True, shift=2, noise=0.15, num_valid=5000, num_labeled=4000),
    "cifar100": dict(num_classes=100, preprocess="zca", flip=True, shift=2, noise=0.15, num_valid=5000, num_labeled=10000),
    "svhn": dict(num_classes=10, preprocess="scale", flip=False, shift=2, noise=0.0, num_valid=7325, num_labeled=1000),
    "stl10": dict(num_classes=10, preprocess="scale", flip=True, shift=2, noise=0.0, num_valid=1000, num_labeled=1000),
    "fashion_mnist": dict(num_classes=10, preprocess="scale", flip=True, shift=2, noise=0.0, num_valid=5000, num_labeled=1000),
    "mnist": dict(num_classes=10, preprocess="scale", flip=False, shift=2, noise=0.0, num_valid=5000, num_labeled=100),
    "digits": dict(num_classes=10, preprocess="scale", flip=False, shift=1, noise=0.0, num_valid=200, num_labeled=100),
    "synthetic": dict(num_classes=10, preprocess="scale", flip=True, shift=2, noise=0.0, num_valid=50, num_labeled=40),
    "npz": dict(num_classes=None, preprocess="scale", flip=False, shift=2, noise=0.0, num_valid=1000, num_labeled=1000),
}
DATASET_NAMES = [name for name in DATASETS if name != "npz"]


def dataset_key(name):
    """The DATASETS key for a --dataset value (a path to an .npz file maps to 'npz')."""
    if name.endswith(".npz"):
        return "npz"
    if name not in DATASETS or name == "npz":
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASET_NAMES)} or a path to an .npz file")
    return name


@dataclass
class Dataset:
    name: str  # the data set's key in DATASETS ('npz' for a user's file)
    x_train: torch.Tensor  # uint8 (N, C, H, W) on the device; rows >= num_labelable are unlabeled-only images
    y_train: torch.Tensor  # int64 (N,); -1 where no label exists (STL-10 unlabeled split)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    num_labelable: int  # rows [0, num_labelable) may be validation or labeled; the rest is unlabeled-only

    @property
    def channels(self):
        return self.x_train.shape[1]

    @property
    def image_size(self):
        return self.x_train.shape[2]


# ---------------------------------------------------------------------------------------------------------- loading
def _nchw(images):
    """uint8 array of (N, H, W), (N, H, W, C) or (N, C, H, W) -> contiguous uint8 (N, C, H, W) tensor."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in (1, 3), got {images.shape}")
    return torch.from_numpy(np.require(images, requirements=["C", "W"]))


def _to_uint8(images):
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    images = images.astype(np.float64)
    if images.max() <= 1.0:  # floats in [0, 1]
        images = images * 255.0
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def read_idx(path):
    """Read an MNIST-style idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _load_idx_folder(folder):
    """Fashion-MNIST / MNIST from a folder of the four standard idx files (e.g. Debian's dataset-fashion-mnist)."""
    def pick(stem):
        for name in (stem + ".gz", stem):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise DataError(f"{os.path.join(folder, stem)}[.gz] not found")
    return (read_idx(pick("train-images-idx3-ubyte")), read_idx(pick("train-labels-idx1-ubyte")),
            read_idx(pick("t10k-images-idx3-ubyte")), read_idx(pick("t10k-labels-idx1-ubyte")))


def _torchvision(name, data_dir, download):
    """CIFAR-10/100, SVHN (+extra), STL-10, MNIST, Fashion-MNIST through torchvision, as numpy arrays."""
    import torchvision.datasets as tvd

    def get(cls, **kwargs):
        try:
            return cls(data_dir, download=download, **kwargs)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise DataError(f"{name} not found (or corrupted) under {data_dir!r}: pass --download on a machine with "
                            f"internet, or --data-dir pointing to the torchvision layout ({error})") from None

    extra_x = extra_y = None
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        train, test = get(cls, train=True), get(cls, train=False)
        return train.data, np.array(train.targets), test.data, np.array(test.targets), None, None
    if name in ("svhn", "svhn_extra"):
        train, test = get(tvd.SVHN, split="train"), get(tvd.SVHN, split="test")
        if name == "svhn_extra":
            extra = get(tvd.SVHN, split="extra")
            extra_x, extra_y = extra.data, np.array(extra.labels)
        return train.data, np.array(train.labels), test.data, np.array(test.labels), extra_x, extra_y
    if name == "stl10":
        train, test = get(tvd.STL10, split="train"), get(tvd.STL10, split="test")
        unlabeled = get(tvd.STL10, split="unlabeled")
        return (train.data, np.array(train.labels), test.data, np.array(test.labels),
                unlabeled.data, np.full(len(unlabeled.data), -1))
    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    train, test = get(cls, train=True), get(cls, train=False)
    return train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy(), None, None


def _digits():
    """scikit-learn's bundled 8x8 digits (1,797 images, 0..16 -> 0..255), fixed 1,300 / 497 train / test split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.RandomState(0).permutation(len(images))  # fixed for every run: the split never moves
    train, test = order[:1300], order[1300:]
    return images[train], digits.target[train], images[test], digits.target[test]


def _synthetic(num_classes=10, per_class=50, test_per_class=20, size=16):
    """A tiny learnable image task for tests: each class is a smooth random prototype plus pixel noise."""
    rng = np.random.RandomState(1234)
    prototypes = rng.uniform(0, 255, size=(num_classes, 3, size // 4, size // 4))
    prototypes = prototypes.repeat(4, axis=2).repeat(4, axis=3)

    def draw(n):
        labels = np.repeat(np.arange(num_classes), n)
        images = prototypes[labels] + rng.normal(0, 40, size=(len(labels), 3, size, size))
        return np.clip(images, 0, 255).astype(np.uint8), labels
    x_train, y_train = draw(per_class)
    x_test, y_test = draw(test_per_class)
    return x_train, y_train, x_test, y_test


def _npz(path):
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    try:
        with np.load(path) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path} is not a readable .npz file ({error})") from None


def load_dataset(name, data_dir="data", download=False, device="cpu", svhn_extra=False):
    """Load a data set as uint8 NCHW tensors on ``device``; raise DataError with a one-line message if missing."""
    key = dataset_key(name)
    extra_x = extra_y = None
    if key == "npz":
        x_train, y_train, x_test, y_test = _npz(name)
        x_train, x_test = _to_uint8(x_train), _to_uint8(x_test)
        num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
    elif key == "digits":
        x_train, y_train, x_test, y_test = _digits()
    elif key == "synthetic":
        x_train, y_train, x_test, y_test = _synthetic()
    elif key == "fashion_mnist" and not download and not os.path.isdir(os.path.join(data_dir, "FashionMNIST")) \
            and os.path.isdir(DEBIAN_FASHION_MNIST):
        x_train, y_train, x_test, y_test = _load_idx_folder(DEBIAN_FASHION_MNIST)
    else:
        tv_name = "svhn_extra" if (key == "svhn" and svhn_extra) else key
        x_train, y_train, x_test, y_test, extra_x, extra_y = _torchvision(tv_name, data_dir, download)
    x_train, x_test = _nchw(x_train), _nchw(x_test)
    y_train = torch.as_tensor(np.array(y_train), dtype=torch.int64)
    y_test = torch.as_tensor(np.array(y_test), dtype=torch.int64)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DataError(f"{name}: images and labels differ in length")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{name}: train images {tuple(x_train.shape[1:])} and test images {tuple(x_test.shape[1:])} differ")
    num_labelable = len(x_train)
    if extra_x is not None:
        x_train = torch.cat([x_train, _nchw(extra_x)])
        y_train = torch.cat([y_train, torch.as_tensor(np.asarray(extra_y), dtype=torch.int64)])
    num_classes = DATASETS[key]["num_classes"] or num_classes
    return Dataset(key, x_train.to(device), y_train.to(device),
                   x_test.to(device), y_test.to(device), num_classes, num_labelable)


# ------------------------------------------------------------------------------ extreme classification text files
# train_xc.py's data. Every reader keeps each point's smallest label id (the authors' "first label",
# binarize-labels.py:29 of mandt-lab/adversarial-negative-sampling) and marks points without a label with -1.
# Problems raise DataError with one line that names the file and the line.

def _xc_header(handle, path, names):
    line = handle.readline()
    tokens = line.split()
    if len(tokens) != len(names) or not all(token.isdigit() for token in tokens):
        raise DataError(f"{path}: line 1 must be '{' '.join(names)}' ({len(names)} whole numbers), got {line.strip()[:60]!r}")
    sizes = [int(token) for token in tokens]
    if "K" in names and sizes[0] * sizes[names.index("K")] > 2 ** 36:  # float32: 256 GiB
        raise DataError(f"{path}: line 1 asks for a {sizes[0]} x {sizes[names.index('K')]} dense feature matrix (over 256 GiB)")
    return sizes


def _xc_sparse(tokens, row, path, lineno, size, what):
    """Fill row from 'index:value' tokens; returns the indices."""
    indices = []
    for token in tokens:
        index, sep, value = token.partition(":")
        try:
            index, value = int(index), float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise DataError(f"{path}: line {lineno}: expected '{what}:value', got {token[:40]!r}")
        if not 0 <= index < size:
            raise DataError(f"{path}: line {lineno}: {what} {index} outside 0..{size - 1} (line 1's header)")
        if row is not None:
            row[index] = value
        indices.append(index)
    return indices


def _xc_count(path, lineno, expected):
    if lineno - 1 != expected:
        raise DataError(f"{path}: line 1 says {expected} points but the file has {lineno - 1} data lines")


def read_xc_repository(path):
    """One file of the Extreme Classification Repository's original text format (Bhatia et al.): line 1 'N K C',
    then per point 'l1,l2,... f:v f:v ...' (0-based ids; a point without labels starts with a space).
    Returns (features float32 N x K, labels int64 N, C)."""
    with open(path) as handle:
        num_points, num_features, num_labels = _xc_header(handle, path, ("N", "K", "C"))
        features = np.zeros((num_points, num_features), dtype=np.float32)
        labels = np.full(num_points, -1, dtype=np.int64)
        lineno = 1
        for lineno, line in enumerate(handle, start=2):
            if lineno - 2 >= num_points:
                raise DataError(f"{path}: more than N = {num_points} data lines (line 1's header)")
            tokens = line.rstrip("\n").split(" ")
            if tokens[0] and ":" not in tokens[0]:
                try:
                    ids = [int(token) for token in tokens[0].split(",") if token]
                except ValueError:
                    raise DataError(f"{path}: line {lineno}: labels must be 'l1,l2,...', got {tokens[0][:40]!r}") from None
                if ids and not all(0 <= i < num_labels for i in ids):
                    raise DataError(f"{path}: line {lineno}: a label id is outside 0..{num_labels - 1} (line 1's header)")
                labels[lineno - 2] = min(ids, default=-1)
                tokens = tokens[1:]
            _xc_sparse([t for t in tokens if t], features[lineno - 2], path, lineno, num_features, "feature")
        _xc_count(path, lineno, num_points)
    return features, labels, num_labels


def read_xc_features(path):
    """A feature matrix with header 'N K', then one point per line: K space-separated numbers (the dense XML-CNN
    files the authors read, binarize-features.py:15-19) or sparse 'f:v' tokens (the repository's X_Xf.txt files).
    Returns float32 N x K."""
    with open(path) as handle:
        num_points, num_features = _xc_header(handle, path, ("N", "K"))
        features = np.zeros((num_points, num_features), dtype=np.float32)
        lineno = 1
        for lineno, line in enumerate(handle, start=2):
            if lineno - 2 >= num_points:
                raise DataError(f"{path}: more than N = {num_points} data lines (line 1's header)")
            tokens = line.split()
            if tokens and ":" in tokens[0]:
                _xc_sparse(tokens, features[lineno - 2], path, lineno, num_features, "feature")
                continue
            try:
                values = np.array(tokens, dtype=np.float32)
            except ValueError:
                raise DataError(f"{path}: line {lineno}: not {num_features} numbers") from None
            if len(values) != num_features:
                raise DataError(f"{path}: line {lineno}: {len(values)} numbers, line 1 says K = {num_features}")
            features[lineno - 2] = values
        _xc_count(path, lineno, num_points)
    return features


def read_xc_labels(path):
    """A label matrix with header 'N C', then one point per line: 'l:1 l:1 ...' (the authors' trn_lbl_mat.txt,
    binarize-labels.py:13-29, and the repository's X_Y.txt). Returns (smallest label id per point or -1, C)."""
    with open(path) as handle:
        num_points, num_labels = _xc_header(handle, path, ("N", "C"))
        labels = np.full(num_points, -1, dtype=np.int64)
        lineno = 1
        for lineno, line in enumerate(handle, start=2):
            if lineno - 2 >= num_points:
                raise DataError(f"{path}: more than N = {num_points} data lines (line 1's header)")
            ids = _xc_sparse(line.split(), None, path, lineno, num_labels, "label")
            labels[lineno - 2] = min(ids, default=-1)
        _xc_count(path, lineno, num_points)
    return labels, num_labels


# ------------------------------------------------------------------------------------------------------------ split
@dataclass
class Split:
    labeled: torch.Tensor  # indices into x_train
    unlabeled: torch.Tensor
    valid: torch.Tensor
    labeled_in_unlabeled: bool = False  # True: the labeled images are also in the unlabeled stream (labels dropped)

    def save(self, path):
        record = {k: getattr(self, k).tolist() for k in ("labeled", "unlabeled", "valid")}
        record["labeled_in_unlabeled"] = self.labeled_in_unlabeled
        with open(path, "w") as f:
            json.dump(record, f)


def make_ssl_split(labels, num_classes, num_labeled, num_valid, seed, num_labelable=None, include_labeled=False):
    """Hold out ``num_valid`` images for validation, pick a class-balanced labeled subset of ``num_labeled`` with
    ``seed``, and make the unlabeled stream from the rest of train. By default the labeled and unlabeled sets are
    disjoint, as the NS3L paper counts them (section 4.1: CIFAR-10 4,000 + 41,000) and as the PyTorch port of Oliver et
    al.'s code builds them (perrying/realistic-ssl-evaluation-pytorch build_dataset.py:38-41) and the MixMatch code
    (google-research/mixmatch scripts/create_split.py:111-114). ``include_labeled=True`` puts the labeled images in the
    unlabeled stream too (labels dropped), as Oliver et al.'s TF data provider does (train_model.py:283-285). The
    validation set is drawn with a fixed generator so every seed is selected on the same validation images; the seed
    only moves the labeled subset (5 seeds = 5 splits)."""
    labels = labels.cpu()
    n = len(labels)
    num_labelable = n if num_labelable is None else num_labelable
    if num_valid < 0 or num_labeled < num_classes:
        raise DataError(f"need num_valid >= 0 and at least one label per class ({num_classes}), got "
                        f"num_valid={num_valid}, num_labeled={num_labeled}")
    if num_valid + num_labeled > num_labelable:
        raise DataError(f"num_labeled ({num_labeled}) + num_valid ({num_valid}) exceed the {num_labelable} "
                        f"labeled training images")
    fixed = torch.Generator().manual_seed(0)
    order = torch.randperm(num_labelable, generator=fixed)
    valid, rest = order[:num_valid], order[num_valid:]
    generator = torch.Generator().manual_seed(seed)
    rest = rest[torch.randperm(len(rest), generator=generator)]
    per_class = torch.full((num_classes,), num_labeled // num_classes)
    per_class[torch.randperm(num_classes, generator=generator)[: num_labeled % num_classes]] += 1
    labeled = []
    for c in range(num_classes):
        candidates = rest[labels[rest] == c]
        if len(candidates) < per_class[c]:
            raise DataError(f"class {c} has {len(candidates)} training images outside validation, "
                            f"{int(per_class[c])} labels requested")
        labeled.append(candidates[: per_class[c]])
    labeled = torch.cat(labeled).sort().values
    in_valid = torch.zeros(n, dtype=torch.bool)
    in_valid[valid] = True
    if not include_labeled:
        in_valid[labeled] = True
    unlabeled = (~in_valid).nonzero().squeeze(1)
    return Split(labeled, unlabeled, valid.sort().values, bool(include_labeled))


class BatchSampler:
    """Infinite shuffled batches of indices from an index set, on the device: every index once per epoch, a fresh
    permutation (global torch RNG) each epoch, batches straddle epoch boundaries. state_dict() makes resume exact."""

    def __init__(self, indices, batch_size):
        if len(indices) == 0:
            raise DataError("cannot sample batches from an empty index set")
        self.indices, self.batch_size = indices, batch_size
        self.order = indices[:0]
        self.position = 0

    def __next__(self):
        while len(self.order) - self.position < self.batch_size:
            perm = torch.randperm(len(self.indices), device=self.indices.device)
            self.order = torch.cat([self.order[self.position:], self.indices[perm]])
            self.position = 0
        batch = self.order[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def __iter__(self):
        return self

    def state_dict(self):
        return {"order": self.order.cpu(), "position": self.position}

    def load_state_dict(self, state):
        self.order, self.position = state["order"].to(self.indices.device), int(state["position"])


# ----------------------------------------------------------------------------------------------------- preprocess
def global_contrast_normalize(x, scale=55.0, eps=1e-10):
    """Per image: subtract the mean, scale to L2 norm ``scale`` (Oliver et al. build_tfrecords: multiplier 55)."""
    flat = x.reshape(len(x), -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    norm = flat.norm(dim=1, keepdim=True)
    norm = torch.where(norm < eps, torch.ones_like(norm), norm)
    return (scale * flat / norm).reshape(x.shape)


def fit_zca(images, identity_scale=0.1, eps=1e-10):
    """ZCA whitening fit on float images (N, ...): returns (mean, matrix) so that (x - mean) @ matrix whitens.
    Covariance regularised by ``identity_scale`` * I as in Oliver et al. (0.1)."""
    flat = images.reshape(len(images), -1).double()
    mean = flat.mean(dim=0)
    centred = flat - mean
    covariance = centred.T @ centred / (len(flat) - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance + identity_scale * torch.eye(len(covariance),
                                                                                           dtype=torch.float64, device=flat.device))
    matrix = eigenvectors @ torch.diag(1.0 / torch.sqrt(eigenvalues.clamp_min(0) + eps)) @ eigenvectors.T
    return mean.float(), matrix.float()


class Normalizer:
    """uint8 batch -> float batch. 'zca': GCN (scale 55) + ZCA fit once on all training images (Oliver et al.
    lib/dataset_utils.py:409-472, CIFAR); 'scale': x / 127.5 - 1, i.e. [-1, 1] (SVHN and everything else, and all of Protocol B)."""

    def __init__(self, kind, fit_images=None, chunk=5000):
        self.kind = kind
        if kind == "zca":
            fit = torch.cat([global_contrast_normalize(fit_images[i: i + chunk].double())
                             for i in range(0, len(fit_images), chunk)])
            self.mean, self.matrix = fit_zca(fit)

    def __call__(self, x):
        if self.kind == "zca":
            flat = global_contrast_normalize(x.float()).reshape(len(x), -1)
            return ((flat - self.mean) @ self.matrix).reshape(x.shape)
        return x.float() / 127.5 - 1.0


def make_normalizer(dataset, kind=None):
    """The data set's Protocol A preprocessing (or ``kind`` = 'scale' / 'zca'), fit on the labeled-train images."""
    kind = kind or DATASETS[dataset.name]["preprocess"]
    return Normalizer(kind, dataset.x_train[: dataset.num_labelable] if kind == "zca" else None)


# ---------------------------------------------------------------------------------------------------- augmentation
def reflect_index(index, size):
    """Fold out-of-range indices back inside [0, size) by reflection without repeating the edge (TF / PyTorch
    'REFLECT' padding: -1 -> 1, size -> size - 2); valid for offsets below ``size``."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def augment(x, flip=False, shift=0, noise_std=0.0):
    """Batched augmentation of a float batch (B, C, H, W) on its device, fresh randomness per sample:
    horizontal flip with probability 1/2 -> random translation by -shift..shift px with reflect padding
    (= pad ``shift`` and random crop) -> additive Gaussian noise. Oliver et al.'s order (lib/networks.py:143-152).

    The translation is one gather with reflected source indices rather than F.pad(mode="reflect") + crop: the same
    result, but its backward (VAT differentiates through it) is deterministic on CUDA, where reflection-padding
    backward has no deterministic kernel (torch.use_deterministic_algorithms refuses it)."""
    batch, channels, height, width = x.shape
    if flip:
        mask = torch.rand(batch, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mask, x.flip(3), x)
    if shift > 0:
        offset_y = torch.randint(0, 2 * shift + 1, (batch, 1), device=x.device)
        offset_x = torch.randint(0, 2 * shift + 1, (batch, 1), device=x.device)
        rows = reflect_index(torch.arange(height, device=x.device).view(1, height) + offset_y - shift, height)
        cols = reflect_index(torch.arange(width, device=x.device).view(1, width) + offset_x - shift, width)
        flat_index = (rows[:, :, None] * width + cols[:, None, :]).reshape(batch, 1, height * width)
        x = x.reshape(batch, channels, height * width).gather(2, flat_index.expand(batch, channels, height * width))
        x = x.reshape(batch, channels, height, width)
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    return x


def augmentation_defaults(dataset_name):
    """Protocol A augmentation of a data set: (flip, shift, noise_std)."""
    info = DATASETS[dataset_key(dataset_name)]
    return info["flip"], info["shift"], info["noise"]


# ------------------------------------------------------------------------------------------- run plumbing (shared)
def add_device_args(group, exact_fp32="Evaluation always runs in exact fp32"):
    """The device flags every WRN script shares: --cuda, --torch-deterministic, --bf16, --channels-last, --compile
    (resolved by precision(), compile_model() and seed_everything())."""
    group.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA when available")
    group.add_argument("--torch-deterministic", action=argparse.BooleanOptionalAction, default=False,
                       help="deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, no "
                            "benchmark): bit-reproducible on the same machine and software, slower on GPU")
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast for training forward passes (default: on for CUDA, off on CPU; --bf16 forces "
                            f"it on the CPU too). {exact_fp32}")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last memory format (default: the faster format of the device, FASTER_FORMAT: "
                            "channels_last on CUDA and on the CPU)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model for the training passes (default: on for CUDA, off on the CPU, "
                            "where compiling takes about a minute); the first step, which compiles, is timed apart and "
                            "left out of SPS. Evaluation and checkpoints use the uncompiled module")


# The memory format of a device when --channels-last is not given: the faster one, measured on the training step
# (docs/benchmarks.md, "Memory format"). CPU: the WRN-28-2 forward + backward is 11-17 % faster in channels_last
# (2-core AVX2, oneDNN). CUDA: channels_last is what cuDNN's tensor-core convolutions want under bf16 autocast.
FASTER_FORMAT = {"cuda": True, "cpu": True}


def compile_model(model, args, device):
    """The module the training passes call: torch.compile(model) with --compile (default on CUDA), else the model.

    The compiled module shares its parameters and buffers with ``model``, so the optimiser, the EMA, evaluation
    (which calls ``model`` itself, eagerly) and ``model.state_dict()`` see one set of weights and checkpoints hold
    no compiler wrapper. Every variant of a pass (training mode, BatchNorm updates on or off via wrn.no_bn_update,
    autocast on or off, an input that needs a gradient) is a guard on the compiled code: each gets its own graph
    the first time it runs, i.e. within the first training step. ``dynamic=False``: every batch shape of a run is
    fixed, so static shapes give the fastest kernels."""
    enabled = device.type == "cuda" if args.compile is None else args.compile
    if not enabled:
        return model
    config = torch._dynamo.config  # room for every pass variant x shape (named recompile_limit in newer PyTorch)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 16))
    # Guard on the attributes of the model's modules (wrn.BatchNorm2d.update_stats, training): the default from
    # PyTorch 2.5 on; on 2.4 a flipped module attribute could otherwise go unseen and run the wrong graph.
    if torch.__version__ < "2.5":  # TorchVersion compares as a version; the flag is deprecated (always on) later
        config.inline_inbuilt_nn_modules = True
    return torch.compile(model, dynamic=False)


class TrainClock:
    """Training time and steps per second of a run, across --resume legs.

    ``start()`` / ``pause()`` bracket training (evaluation and checkpoints are outside); ``step()`` counts a timed step,
    except the first step of a leg whose model is compiled: its time (compilation included) is printed once as
    compile_seconds and left out of both the time and the step count, so SPS and ETA are the compiled speed. ``lap()`` gives the steps per second since the previous lap over training time only: its step
    count and its time run over the same steps, also when an evaluation falls inside the interval. CUDA is
    synchronised only at these calls, never per step."""

    def __init__(self, device, seconds=0.0, steps=0):
        self.device, self.seconds, self.steps = device, float(seconds), int(steps)  # totals, checkpointed
        self.compile_seconds = None
        self._lap_seconds, self._lap_steps, self._started = 0.0, 0, None

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self):
        self._started = self._now()

    def pause(self):
        elapsed = self._now() - self._started
        self.seconds += elapsed
        self._lap_seconds += elapsed
        self._started = None

    def step(self, compiled=False):
        """One training step done. ``compiled``: the model is compiled, so the first step of this leg compiled it;
        that step's time is printed once (compile_seconds) and left out of the time and the step count."""
        if compiled and self.compile_seconds is None:
            self.compile_seconds = self._now() - self._started
            print(f"compile: the first step took {self.compile_seconds:.1f} s with compilation (not in SPS)", flush=True)
            self._started = self._now()
            return
        self.steps += 1
        self._lap_steps += 1

    def lap(self):
        """Steps per second since the previous lap (training time only); starts the next lap."""
        now = self._now()
        self._lap_seconds += now - self._started
        self.seconds += now - self._started
        self._started = now
        sps = self._lap_steps / self._lap_seconds if self._lap_steps and self._lap_seconds > 0 else float("nan")
        self._lap_seconds, self._lap_steps = 0.0, 0
        return sps

    def steps_per_second(self):
        return self.steps / self.seconds if self.seconds > 0 and self.steps else None


def create_run_dir(runs_dir, run_name):
    """Make a fresh run directory; an existing one is never reused or overwritten."""
    run_dir = os.path.join(runs_dir, run_name)
    if os.path.exists(run_dir):
        fail(f"run directory {run_dir} already exists: choose another --run-name, or continue it with --resume {run_dir}")
    os.makedirs(run_dir)
    return run_dir


def open_run(args, script, split, checkpoint=None):
    """(run_dir, TensorBoard writer). A new run gets runs/<dataset>__<script>__<seed>__<unix time> (or --run-name),
    its args.json and split.json; a resumed run reopens args.resume and purges the events logged after its
    checkpoint's step (a crashed leg's; those at the step itself were written before the checkpoint was saved)."""
    from torch.utils.tensorboard import SummaryWriter  # here: the data helpers above must not need tensorboard
    if checkpoint is None:
        run_name = args.run_name or f"{os.path.basename(args.dataset)}__{script}__{args.seed}__{int(time.time())}"
        run_dir = create_run_dir(args.runs_dir, run_name)
        write_json(os.path.join(run_dir, "args.json"), vars(args))
        split.save(os.path.join(run_dir, "split.json"))
    else:
        run_dir = args.resume
    writer = SummaryWriter(run_dir, purge_step=None if checkpoint is None else checkpoint["step"] + 1)
    writer.add_text("hyperparameters", hparams_table(args))
    return run_dir, writer


def write_json(path, obj):
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir, script, flag="--resume"):
    """Read RUN_DIR/checkpoint.pt written by ``script``; any problem is one line and exit 1, nothing is touched."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        fail(f"{flag} {run_dir}: no checkpoint.pt in that directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle garbage, wrong types: all mean "corrupt"
        fail(f"{flag} {run_dir}: checkpoint.pt is corrupt or unreadable ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != script or not isinstance(checkpoint.get("args"), dict):
        fail(f"{flag} {run_dir}: checkpoint.pt was not written by {script}")
    return checkpoint


def resume_args(args, checkpoint, argv, overrides=("total_steps", "cuda", "compile"), legacy=True):
    """The resumed run keeps its saved arguments; only the ``overrides`` given on this command line (--total-steps
    to extend a run, the device flags --cuda and --compile) replace them. ``legacy``: give the arguments of a WRN-script run saved before
    the fidelity review their old meaning (legacy_args)."""
    saved = argparse.Namespace(**checkpoint["args"])
    if legacy and "channels_last" not in vars(saved):  # a run started before these flags existed keeps the meaning it had
        legacy = legacy_args(vars(saved))
        for name, value in legacy.items():
            setattr(saved, name, value)
        print(f"--resume {args.resume}: arguments of an older version, kept with their old meaning "
              f"({', '.join(f'{k}={v}' for k, v in sorted(legacy.items()))})")
    if legacy and "compile" not in vars(saved) and saved.channels_last is None:  # before channels_last on the CPU
        saved.channels_last = bool(saved.cuda and torch.cuda.is_available())  # it meant: on for CUDA, off on the CPU
        print(f"--resume {args.resume}: a run from before --compile keeps its memory format "
              f"(channels_last={saved.channels_last})")
    for name, value in vars(args).items():  # flags added later still need a value
        if name not in vars(saved):
            setattr(saved, name, value)
    for name in overrides:
        flags = ["--" + name.replace("_", "-")] + (["--no-" + name] if name in ("cuda", "compile") else [])
        if any(a == flag or a.startswith(flag + "=") for a in argv for flag in flags):
            setattr(saved, name, getattr(args, name))
    saved.resume = args.resume
    if checkpoint["step"] >= saved.total_steps:
        fail(f"--resume {args.resume}: the run already finished {checkpoint['step']} steps; pass --total-steps "
             f"larger than that to extend it")
    return saved


def legacy_args(saved):
    """What the arguments added with the fidelity review meant before they existed: the labeled images were in the
    unlabeled stream unless --exclude-labeled, VAT's loss was KL(p(x) || p(x + r_adv)), and bf16 / channels_last
    applied to CUDA only."""
    legacy = {"channels_last": None}
    if "exclude_labeled" in saved:
        legacy["include_labeled"] = not saved["exclude_labeled"]
    if "vat_eps" in saved:
        legacy["vat_kl"] = "miyato"
    if saved.get("bf16") is True:
        legacy["bf16"] = None
    return legacy


def rng_state():
    """Every RNG a run touches, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed, deterministic):
    """Seed every RNG. ``deterministic``: cuDNN's deterministic kernels with benchmarking off, and
    torch.use_deterministic_algorithms(True), so any op without a deterministic kernel raises instead of silently
    varying (with the cuBLAS workspace setting it needs on CUDA). With it, a run repeats bit for bit on the same
    machine, software and device; without it (the default), cuDNN benchmarks its kernels and runs differ slightly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call (CUDA docs)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def precision(args, device):
    """(autocast context, memory format) of a run. ``--bf16`` left unset means on for CUDA, off for the CPU (bf16 is
    slower than fp32 on CPUs without AVX-512 BF16); ``--channels-last`` left unset takes the device's faster format
    (FASTER_FORMAT). Set explicitly, both apply on either device, so the CPU test suite runs the CUDA code paths.
    ``--no-bf16`` on CUDA means the original code's arithmetic: fp32 with TF32 off for the whole run (PyTorch lets
    cuDNN convolutions use TF32 by default on Ampere / Hopper; TF 1, which the original code ran on, had no TF32)."""
    use_bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    channels_last = FASTER_FORMAT.get(device.type, False) if args.channels_last is None else args.channels_last
    if not use_bf16 and device.type == "cuda":
        set_tf32("ieee", "ieee")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    return autocast, (torch.channels_last if channels_last else torch.contiguous_format)


def set_tf32(matmul, conv):
    """Set the fp32 precision of cuBLAS matmuls and cuDNN convolutions ('ieee' = exact fp32, 'tf32'; 'none' = PyTorch's
    default) and return the previous pair. PyTorch >= 2.9 API (mixing it with reads of the legacy allow_tf32 flags
    raises in PyTorch, so nothing here reads those); older versions use the allow_tf32 flags."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision") and hasattr(getattr(backends.cudnn, "conv", None),
                                                                   "fp32_precision"):
        previous = (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision)
        backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = matmul, conv
        return previous
    previous = tuple("tf32" if flag else "ieee" for flag in (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32))
    backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = matmul == "tf32", conv != "ieee"
    return previous


@contextlib.contextmanager
def exact_fp32(device_type):
    """Plain fp32 arithmetic inside: autocast off, and TF32 off for cuDNN convolutions and cuBLAS matmuls (PyTorch lets
    cuDNN convolutions use TF32 by default on Ampere / Hopper, a 10-bit mantissa). Used for VAT's r search (xi = 1e-6
    vanishes at lower precision) and for evaluation (Oliver et al. and the MixMatch code evaluate in fp32)."""
    previous = set_tf32("ieee", "ieee") if device_type == "cuda" else None  # TF32 is a CUDA matter only
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if previous is not None:
            set_tf32(*previous)


@torch.inference_mode()
def error_rate(model, images, labels, normalize, batch_size=1000, memory_format=torch.contiguous_format):
    """Test error in percent of ``model`` (eval mode, running BN statistics) on uint8 images held on the device, in
    exact fp32 whatever autocast the caller runs under (exact_fp32)."""
    if len(images) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=images.device)
    with exact_fp32(images.device.type):
        for i in range(0, len(images), batch_size):
            x = normalize(images[i: i + batch_size]).contiguous(memory_format=memory_format)
            logits = model(x)
            wrong += (logits.argmax(1) != labels[i: i + batch_size]).sum()
    model.train(was_training)
    return 100.0 * wrong.item() / len(images)


def log_interval(writer, sums, step, steps_in_interval, sps, lr, ramp, total_steps):
    """Protocol A logging: the interval means of the summed scalars, learning rate, ramp and SPS (``sps``: training
    steps per second from TrainClock.lap) to TensorBoard, and one printed line with the ETA."""
    means = dict(zip(sums, (torch.stack(list(sums.values())) / steps_in_interval).tolist()))  # one device sync
    for name, mean in means.items():
        writer.add_scalar(name, mean, step)
    writer.add_scalar("charts/learning_rate", lr, step)
    writer.add_scalar("charts/unlabeled_weight_ramp", ramp, step)
    if sps == sps:  # nan when the interval held only the compiling step
        writer.add_scalar("charts/SPS", sps, step)
    eta = (total_steps - step) / sps if sps > 0 else float("nan")
    print(f"step {step}/{total_steps} loss {means['losses/total']:.4f} "
          f"lr {lr:.2e} SPS {sps:.1f} ETA {eta / 60:.1f} min", flush=True)


def evaluate_and_log(writer, step, model, data, split, normalize, memory_format, best_valid, test_at_best):
    """Protocol A evaluation (fp32, error_rate): validation and test error, the test error at the best validation error
    so far (the reported number; the first evaluation always sets it), three eval/ scalars and one printed line.
    Returns (valid_error, test_error, best_valid, test_at_best)."""
    valid = split.valid.to(data.x_train.device)
    valid_error = error_rate(model, data.x_train[valid], data.y_train[valid], normalize, memory_format=memory_format)
    test_error = error_rate(model, data.x_test, data.y_test, normalize, memory_format=memory_format)
    if valid_error < best_valid or best_valid != best_valid:
        best_valid, test_at_best = valid_error, test_error
    writer.add_scalar("eval/valid_error", valid_error, step)
    writer.add_scalar("eval/test_error", test_error, step)
    writer.add_scalar("eval/test_error_at_best_valid", test_at_best, step)
    print(f"eval step {step}: valid error {valid_error:.2f}% test error {test_error:.2f}% "
          f"(test at best valid {test_at_best:.2f}%)", flush=True)
    return valid_error, test_error, best_valid, test_at_best


def finish_run(writer, run_dir, args, steps_run, clock, valid_error, test_error, best_valid, test_at_best):
    """Protocol A end of run: summary.json (STYLE.md keys; steps_per_second over training time only, from the
    TrainClock), the hparams entry in TensorBoard, one printed line."""
    summary = {"steps": args.total_steps, "steps_per_second": clock.steps_per_second(),
               "compile_seconds": clock.compile_seconds, "final_valid_error": valid_error,
               "final_test_error": test_error, "best_valid_error": best_valid, "test_error_at_best_valid": test_at_best,
               "train_seconds": clock.seconds, "args": vars(args)}
    write_json(os.path.join(run_dir, "summary.json"), summary)
    writer.add_hparams({k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
                       {"hparam/test_error_at_best_valid": test_at_best, "hparam/best_valid_error": best_valid},
                       run_name=".")
    writer.close()
    print(f"done: {steps_run} steps, test error at best valid {test_at_best:.2f}% (best valid {best_valid:.2f}%), "
          f"final test {test_error:.2f}%, {summary['steps_per_second'] or 0:.1f} steps/s -> {run_dir}")
    return summary


def hparams_table(args):
    """Markdown table of the arguments for TensorBoard's text tab."""
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in sorted(vars(args).items()))
