"""Data for every image script: loading, the labeled / unlabeled / validation split, preprocessing and batched
augmentation on the device. Nothing here is an algorithm, and nothing here keeps a run's books (bookkeeping.py does).

Images are held on the device as uint8 tensors (N, C, H, W) for their whole life. A training batch is gathered by
index, normalised (GCN + ZCA for CIFAR, [-1, 1] otherwise, as Oliver et al.'s build_tfrecords.py) and augmented on the
device with per-sample randomness drawn from the global torch RNG, so a seeded run is reproducible and resumable.
"""

import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DataError(Exception):
    """A user-facing data problem (missing files, impossible split): printed as one line, exit 1."""


# Per-data-set facts: number of classes, preprocessing and Protocol A's augmentation (Oliver et al.'s per-data-set
# input pipeline). The split sizes and every other default of a run are the training script's (its DEFAULTS table).
DATASETS = {
    "cifar10": dict(num_classes=10, preprocess="zca", flip=True, shift=2, noise=0.15),
    "cifar100": dict(num_classes=100, preprocess="zca", flip=True, shift=2, noise=0.15),
    "svhn": dict(num_classes=10, preprocess="scale", flip=False, shift=2, noise=0.0),
    "stl10": dict(num_classes=10, preprocess="scale", flip=True, shift=2, noise=0.0),
    "fashion_mnist": dict(num_classes=10, preprocess="scale", flip=True, shift=2, noise=0.0),
    "mnist": dict(num_classes=10, preprocess="scale", flip=False, shift=2, noise=0.0),
    "digits": dict(num_classes=10, preprocess="scale", flip=False, shift=1, noise=0.0),
    "synthetic": dict(num_classes=10, preprocess="scale", flip=True, shift=2, noise=0.0),
    "npz": dict(num_classes=None, preprocess="scale", flip=False, shift=2, noise=0.0),
}
DATASET_NAMES = [name for name in DATASETS if name != "npz"]


def dataset_key(name):
    """The DATASETS key for a --dataset value (a path to an .npz file maps to 'npz')."""
    if name.endswith(".npz"):
        return "npz"
    if name not in DATASETS or name == "npz":
        raise DataError(
            f"unknown data set {name!r}: choose one of {', '.join(DATASET_NAMES)} or a path to an .npz file"
        )
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
    source: str = ""  # what messages call the data: --dataset's value (an .npz's path)

    @property
    def channels(self):
        return self.x_train.shape[1]

    @property
    def image_size(self):
        return self.x_train.shape[2]


# ---------------------------------------------------------------------------------------------------------- loading
# Every loader's arrays pass validate_arrays before a script writes anything: the one place that decides what data is
# accepted. Each refusal is a DataError of one line naming the file (or data set), the array and what is wrong.
IMAGE_RULE = "images must be uint8 or finite floats in [0, 1]"
LABEL_RULE = "labels must be whole numbers >= 0, one per image"


def _examples(values, count=3):
    """Up to ``count`` distinct values of an array, for a message ('-1, -2, 7')."""
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in np.unique(values)[:count].tolist())


def check_images(images, source, name):
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C in (1, 3), or the same of finite floats in [0, 1] (scaled to
    0..255 and rounded) -> contiguous uint8 (N, C, H, W) numpy array of square images with N >= 1. Anything else (other
    dtypes, NaN / inf, floats outside [0, 1], other shapes, no images, non-square images) raises DataError."""
    images = np.asarray(images)
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise DataError(f"{source}: {name} has dtype {images.dtype}; {IMAGE_RULE}")
    layout = "(N, H, W), (N, H, W, C) or (N, C, H, W) with C in (1, 3)"
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{source}: {name} has shape {np.shape(images)}; images must be {layout}")
    if len(images) == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise DataError(f"{source}: {name} holds no images (shape {images.shape}, N x C x H x W)")
    if images.shape[2] != images.shape[3]:
        raise DataError(
            f"{source}: {name} images are {images.shape[2]}x{images.shape[3]} pixels; images must be square (the "
            f"scripts size their augmentation and networks by one side)"
        )
    if images.dtype.kind == "f":
        non_finite = images.size - int(np.count_nonzero(np.isfinite(images)))
        if non_finite:
            raise DataError(f"{source}: {name} has {non_finite} NaN/inf values; {IMAGE_RULE}")
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 1:
            raise DataError(f"{source}: {name} has values in [{low:g}, {high:g}]; {IMAGE_RULE}")
        images = np.rint(images.astype(np.float64) * 255.0).astype(np.uint8)
    return np.require(images, requirements=["C", "W"])


def check_features(features, source, name):
    """Real numbers (N, ...) with N >= 1 -> float32 (N, K), every value finite as float32 (train_xc.py's data)."""
    features = np.asarray(features)
    if features.dtype.kind not in "biuf":
        raise DataError(f"{source}: {name} has dtype {features.dtype}; features must be finite real numbers")
    if features.ndim == 0 or len(features) == 0:
        raise DataError(f"{source}: {name} holds no points (shape {features.shape}); features must be (N, K)")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        features = features.reshape(len(features), -1).astype(np.float32)
    if features.shape[1] == 0:
        raise DataError(f"{source}: {name} has no features (shape {features.shape})")
    non_finite = features.size - int(np.count_nonzero(np.isfinite(features)))
    if non_finite:
        raise DataError(
            f"{source}: {name} has {non_finite} NaN/inf values (or beyond float32's range); features must be finite "
            f"real numbers"
        )
    return features


def check_labels(labels, source, name, count, of="images"):
    """Class labels -> int64 (N,): one-dimensional, ``count`` of them, whole numbers >= 0 (integers, or floats with
    whole values). Anything else raises DataError."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iuf":
        raise DataError(f"{source}: {name} has dtype {labels.dtype}; {LABEL_RULE}")
    if labels.ndim != 1:
        raise DataError(f"{source}: {name} has shape {labels.shape}; labels must be one-dimensional (N,)")
    if len(labels) != count:
        raise DataError(f"{source}: {name} has {len(labels)} labels for {count} {of}")
    if labels.dtype.kind == "f":
        fractional = ~np.isfinite(labels) | (labels != np.floor(labels)) | (np.abs(labels) >= 2**62)
        if fractional.any():
            raise DataError(
                f"{source}: {name} has {int(fractional.sum())} values that are not whole numbers "
                f"({_examples(labels[fractional])}); {LABEL_RULE}"
            )
    negative = labels < 0
    if negative.any():
        raise DataError(
            f"{source}: {name} has {int(negative.sum())} negative values ({_examples(labels[negative])}); {LABEL_RULE}"
        )
    huge = labels > 2**31 - 1  # e.g. uint64 2^64 - 1, which int64 would turn into -1
    if huge.any():
        raise DataError(f"{source}: {name} has {int(huge.sum())} values above 2^31 - 1 ({_examples(labels[huge])})")
    return labels.astype(np.int64)


def validate_arrays(source, x_train, y_train, x_test, y_test, num_classes=None, features=False):
    """The gate every loader's arrays pass (the image loaders through load_dataset, train_xc.py's .npz and text files):
    returns (x_train, y_train, x_test, y_test) as numpy arrays, images uint8 (N, C, H, W) (check_images) or, with
    ``features``, float32 (N, K) (check_features), labels int64 (check_labels), or raises a one-line DataError naming
    ``source``, the array and the problem. Training labels need two classes at least. Images: labels are below
    ``num_classes`` (a named data set), or for an .npz every class 0..C-1 has training images (C = the largest label
    + 1: a class without images is one the split cannot label), and the test set holds no class the training set
    lacks. Features (extreme classification): label ids may skip, and held-out points of labels never seen in training
    are the script's to drop (the paper does)."""
    check = check_features if features else check_images
    x_train, x_test = check(x_train, source, "x_train"), check(x_test, source, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        what = "features per point" if features else "images"
        raise DataError(
            f"{source}: x_train {what} {x_train.shape[1:]} and x_test {what} {x_test.shape[1:]} differ in shape"
        )
    of = "points" if features else "images"
    y_train = check_labels(y_train, source, "y_train", len(x_train), f"{of} in x_train")
    y_test = check_labels(y_test, source, "y_test", len(x_test), f"{of} in x_test")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise DataError(f"{source}: y_train has a single class ({classes[0]}); a classifier needs at least two")
    if not features:
        if num_classes is not None and max(classes[-1], y_test.max()) >= num_classes:
            raise DataError(
                f"{source}: a label is {max(classes[-1], y_test.max())}, but the data set has {num_classes} classes"
            )
        if num_classes is None and len(classes) < classes[-1] + 1:  # an .npz: C = the largest label + 1
            num_classes = int(classes[-1]) + 1
            missing = np.setdiff1d(np.arange(min(num_classes, len(classes) + 1)), classes)[0]
            raise DataError(
                f"{source}: y_train has no image of class {missing} (labels must be 0..C-1 with every class in "
                f"training; C = {num_classes})"
            )
        unseen = np.setdiff1d(y_test, classes)
        if len(unseen):
            raise DataError(
                f"{source}: y_test has {len(unseen)} labels the training set never has ({_examples(unseen)})"
            )
    return x_train, y_train, x_test, y_test


def require_image_size(data, minimum, why):
    """DataError unless the data set's (square) images are at least ``minimum`` pixels a side; ``why``: the part of
    the script's pipeline that needs them (named in the message)."""
    if data.image_size < minimum:
        raise DataError(
            f"{data.source}: images are {data.image_size}x{data.image_size} pixels; {why} needs at least "
            f"{minimum}x{minimum}"
        )


def read_idx(path):
    """Read an MNIST-style idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
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

    return (
        read_idx(pick("train-images-idx3-ubyte")),
        read_idx(pick("train-labels-idx1-ubyte")),
        read_idx(pick("t10k-images-idx3-ubyte")),
        read_idx(pick("t10k-labels-idx1-ubyte")),
    )


def _torchvision(name, data_dir, download):
    """CIFAR-10/100, SVHN (+extra), STL-10, MNIST, Fashion-MNIST through torchvision, as numpy arrays."""
    import torchvision.datasets as tvd

    def get(cls, **kwargs):
        try:
            return cls(data_dir, download=download, **kwargs)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise DataError(
                f"{name} not found (or corrupted) under {data_dir!r}: pass --download on a machine with "
                f"internet, or --data-dir pointing to the torchvision layout ({error})"
            ) from None

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
        return (
            train.data,
            np.array(train.labels),
            test.data,
            np.array(test.labels),
            unlabeled.data,
            np.full(len(unlabeled.data), -1),
        )
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


def read_npz(path):
    """x_train, y_train, x_test, y_test of an .npz file; DataError (one line) for anything numpy cannot read as one."""
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    try:
        f = np.load(path)  # allow_pickle stays False: an object array is refused, never unpickled
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds one array (.npy), not an .npz archive of x_train, y_train, x_test, y_test")
        with f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    except DataError:
        raise
    except (Exception, MemoryError) as error:  # whatever numpy raises on a file it cannot read: one line
        raise DataError(
            f"{path} is not a readable .npz file ({str(error).splitlines()[0] if str(error) else error!r})"
        ) from None


def load_dataset(name, data_dir="data", download=False, device="cpu", svhn_extra=False):
    """Load a data set as uint8 NCHW tensors on ``device``; raise DataError with a one-line message if it is missing or
    its arrays break a rule of validate_arrays."""
    key = dataset_key(name)
    extra_x = extra_y = None
    if key == "npz":
        x_train, y_train, x_test, y_test = read_npz(name)
    elif key == "digits":
        x_train, y_train, x_test, y_test = _digits()
    elif key == "synthetic":
        x_train, y_train, x_test, y_test = _synthetic()
    elif (
        key == "fashion_mnist"
        and not download
        and not os.path.isdir(os.path.join(data_dir, "FashionMNIST"))
        and os.path.isdir(DEBIAN_FASHION_MNIST)
    ):
        x_train, y_train, x_test, y_test = _load_idx_folder(DEBIAN_FASHION_MNIST)
    else:
        tv_name = "svhn_extra" if (key == "svhn" and svhn_extra) else key
        x_train, y_train, x_test, y_test, extra_x, extra_y = _torchvision(tv_name, data_dir, download)
    x_train, y_train, x_test, y_test = validate_arrays(
        name, x_train, y_train, x_test, y_test, DATASETS[key]["num_classes"]
    )
    num_classes = DATASETS[key]["num_classes"] or int(y_train.max()) + 1
    num_labelable = len(x_train)
    if extra_x is not None:  # SVHN's extra split (labels 0..9) or STL-10's unlabeled split (labels -1)
        extra_x = check_images(extra_x, name, "the unlabeled / extra images")
        if extra_x.shape[1:] != x_train.shape[1:]:
            raise DataError(f"{name}: the unlabeled / extra images {extra_x.shape[1:]} differ from x_train's")
        if key == "stl10":  # no labels: -1 marks them
            extra_y = np.asarray(extra_y, dtype=np.int64)
        else:
            extra_y = check_labels(extra_y, name, "the extra labels", len(extra_x), "extra images")
            if extra_y.max() >= num_classes:
                raise DataError(
                    f"{name}: an extra label is {extra_y.max()}, but the data set has {num_classes} classes"
                )
        x_train, y_train = np.concatenate([x_train, extra_x]), np.concatenate([y_train, extra_y])

    def tensor(array):
        return torch.from_numpy(array).to(device)

    return Dataset(
        key, tensor(x_train), tensor(y_train), tensor(x_test), tensor(y_test), num_classes, num_labelable, name
    )


# ------------------------------------------------------------------------------ extreme classification text files
# train_xc.py's data. Every reader keeps each point's smallest label id (the authors' "first label",
# binarize-labels.py:29 of mandt-lab/adversarial-negative-sampling) and marks points without a label with -1.
# Problems raise DataError with one line that names the file and the line.


def _xc_header(handle, path, names):
    line = handle.readline()
    tokens = line.split()
    if len(tokens) != len(names) or not all(token.isascii() and token.isdigit() for token in tokens):
        raise DataError(
            f"{path}: line 1 must be '{' '.join(names)}' ({len(names)} whole numbers), got {line.strip()[:60]!r}"
        )
    sizes = [int(token) for token in tokens]
    if "K" in names and sizes[0] * sizes[names.index("K")] > 2**36:  # float32: 256 GiB
        raise DataError(
            f"{path}: line 1 asks for a {sizes[0]} x {sizes[names.index('K')]} dense feature matrix (over 256 GiB)"
        )
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
            with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
                row[index] = value
            if not np.isfinite(row[index]):  # nan, inf, or beyond float32's range
                raise DataError(
                    f"{path}: line {lineno}: {what} {index} has the value {value:g}; features must be finite"
                )
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
                    raise DataError(
                        f"{path}: line {lineno}: labels must be 'l1,l2,...', got {tokens[0][:40]!r}"
                    ) from None
                if ids and not all(0 <= i < num_labels for i in ids):
                    raise DataError(
                        f"{path}: line {lineno}: a label id is outside 0..{num_labels - 1} (line 1's header)"
                    )
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
                with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
                    values = np.array(tokens, dtype=np.float32)
            except ValueError:
                raise DataError(f"{path}: line {lineno}: not {num_features} numbers") from None
            if len(values) != num_features:
                raise DataError(f"{path}: line {lineno}: {len(values)} numbers, line 1 says K = {num_features}")
            if not np.isfinite(values).all():  # nan, inf, or beyond float32's range
                column = int(np.flatnonzero(~np.isfinite(values))[0])
                raise DataError(
                    f"{path}: line {lineno}: value {column + 1} is {tokens[column][:40]!r}, not finite; features "
                    f"must be finite"
                )
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
# ------------------------------------------------------------------------------ train_xc.py's data sets
AUTHORS_SPLIT_SEED = 36528475  # binarize-labels.py:68 (their validation / test split of the held-out points)


def reindex_by_frequency(y_train, y_heldout):
    """Label ids sorted by descending training frequency (ties by id); held-out points whose label never occurs in
    training are dropped (Bamler & Mandt 2020, 'Extreme Classification via Adversarial Softmax
    Approximation', ICLR, experiments section). Returns new y_train, new y_heldout, mask of kept held-out points, C."""
    ids, counts = np.unique(y_train, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    mapping = {int(label): new for new, label in enumerate(ids[order])}
    keep = np.array([int(label) in mapping for label in y_heldout], dtype=bool)
    new_train = np.array([mapping[int(label)] for label in y_train], dtype=np.int64)
    new_heldout = np.array([mapping[int(label)] for label in y_heldout[keep]], dtype=np.int64)
    return new_train, new_heldout, keep, len(ids)


class PlantedHierarchy:
    """Synthetic labels with a planted hierarchy (this project's CPU-sized check of the paper's claim): C labels on the
    leaves of a complete binary tree of depth D = ceil(log2 C), randomly permuted; class mean mu_y = sum_{l=1..D} r^l
    g_(ancestor at depth l), g ~ N(0, I_K), r = 0.4^(1/D); x ~ N(mu_y, I); prior pi_y proportional to (y + 1)^-0.5. The
    Bayes posterior is linear with w*_y = mu_y, b*_y = log pi_y - |mu_y|^2 / 2, the ceiling on reachable
    log-likelihood."""

    def __init__(self, num_classes, num_features, generator):
        depth = max(1, math.ceil(math.log2(num_classes)))
        ratio = 0.4 ** (1.0 / depth)
        leaves = torch.arange(2**depth)
        means = torch.zeros(2**depth, num_features)
        for level in range(1, depth + 1):
            offsets = torch.randn(2**level, num_features, generator=generator)
            means += ratio**level * offsets[leaves >> (depth - level)]
        self.means = means[torch.randperm(2**depth, generator=generator)[:num_classes]]
        prior = (torch.arange(num_classes, dtype=torch.float64) + 1.0) ** -0.5
        self.log_prior = (prior / prior.sum()).log().float()
        self.cdf = (prior / prior.sum()).cumsum(0).float()

    def to(self, device):
        self.means, self.log_prior, self.cdf = self.means.to(device), self.log_prior.to(device), self.cdf.to(device)
        return self

    def sample(self, num_points, generator=None):
        uniform = torch.rand(num_points, device=self.cdf.device, generator=generator)
        labels = torch.searchsorted(self.cdf, uniform).clamp_max(len(self.cdf) - 1)
        noise = torch.randn(num_points, self.means.shape[1], device=self.cdf.device, generator=generator)
        return self.means[labels] + noise, labels

    def bayes_scores(self, x):
        return x @ self.means.T + self.log_prior - 0.5 * (self.means**2).sum(1)


def xc_heldout_split(num_points, data_seed):
    """The authors' split of the held-out points (those whose label occurs in training) into validation and test
    (binarize-labels.py:68-72): a np.random.RandomState(36528475) permutation, the first round(0.2 n) for
    validation. --data-seed shifts the seed; 0 gives the authors' split."""
    order = np.random.RandomState(AUTHORS_SPLIT_SEED + data_seed).permutation(num_points)
    num_valid = min(max(1, round(0.2 * num_points)), num_points - 1)
    return order[:num_valid], order[num_valid:]


def read_xc_file_pair(features_path, labels_path):
    """(features, labels) of one split, from one XC-repository file or a feature file + label file."""
    if labels_path is None:
        features, labels, _ = read_xc_repository(features_path)
    else:
        features = read_xc_features(features_path)
        labels, _ = read_xc_labels(labels_path)
        if len(labels) != len(features):
            raise DataError(f"{labels_path}: {len(labels)} points, but {features_path} has {len(features)}")
    keep = labels >= 0  # points without a label are dropped (the authors' files have none)
    return features[keep], labels[keep]


def load_xc_dataset(dataset, labels, test_data, test_labels, data_seed, eval_size, test_size, num_classes=None,
                    num_features=None, planted_train_size=None):  # fmt: skip
    """train_xc.py's data: (name, x_train, y_train, {"valid": (x, y), "test": (x, y)}, num_classes, planted or None) on
    the CPU, from 'planted' (PlantedHierarchy with num_classes, num_features), an .npz or XC text files (one file per
    split, or a feature file + label file; labels reindexed by training frequency, held-out points split by
    xc_heldout_split). For planted, (x_train, y_train) is the fixed sample the tree and label counts are fitted on.
    Raises DataError with one line."""
    generator = torch.Generator().manual_seed(data_seed)
    if dataset == "planted":
        planted = PlantedHierarchy(num_classes, num_features, generator)
        x_train, y_train = planted.sample(planted_train_size or 16 * num_classes, generator)
        heldout = {split: planted.sample(eval_size, generator) for split in ("valid", "test")}
        return "planted", x_train, y_train, heldout, num_classes, planted
    path = Path(dataset)
    for name, value in (
        ("--dataset", dataset),
        ("--labels", labels),
        ("--test-data", test_data),
        ("--test-labels", test_labels),
    ):
        if value is not None and not Path(value).is_file():
            raise DataError(f"{name} {value}: file not found (--dataset takes 'planted', an .npz, or XC text files)")
    if path.suffix == ".npz":
        x_train, y_train, x_test, y_test = read_npz(str(path))
    else:
        if test_data is None:
            raise DataError("a text-format --dataset needs --test-data (the held-out file in the same format)")
        if (labels is None) != (test_labels is None):
            raise DataError("--labels and --test-labels go together (feature file + label file for each split)")
        try:
            x_train, y_train = read_xc_file_pair(dataset, labels)
            x_test, y_test = read_xc_file_pair(test_data, test_labels)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text file") from None
        if x_test.shape[1] != x_train.shape[1]:
            raise DataError(
                f"{test_data}: K = {x_test.shape[1]} differs from the training file's K = {x_train.shape[1]}"
            )
    # the rules every loader's arrays follow (validate_arrays): finite features, whole labels >= 0, ...
    x_train, y_train, x_test, y_test = validate_arrays(path, x_train, y_train, x_test, y_test, features=True)
    y_train, y_test, keep, num_classes = reindex_by_frequency(y_train, y_test)
    x_test = x_test[keep]
    if num_classes < 2 or len(y_test) < 2:
        raise DataError(f"{path}: need at least 2 labels and 2 held-out points with labels seen in training")
    valid, test = xc_heldout_split(len(y_test), data_seed)

    def to_tensor(idx):
        return torch.as_tensor(x_test[idx], dtype=torch.float32), torch.as_tensor(y_test[idx])

    # The authors evaluate the whole test split and subsample only validation (their evaluation scripts).
    heldout = {"valid": to_tensor(valid[:eval_size]), "test": to_tensor(test[:test_size])}
    return (
        path.stem,
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(y_train),
        heldout,
        num_classes,
        None,
    )


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
        raise DataError(
            f"need num_valid >= 0 and at least one label per class ({num_classes}), got "
            f"num_valid={num_valid}, num_labeled={num_labeled}"
        )
    if num_valid + num_labeled > num_labelable:
        raise DataError(
            f"num_labeled ({num_labeled}) + num_valid ({num_valid}) exceed the {num_labelable} labeled training images"
        )
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
            raise DataError(
                f"class {c} has {len(candidates)} training images outside validation, "
                f"{int(per_class[c])} labels requested"
            )
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
    permutation each epoch, batches straddle epoch boundaries. The permutations come from the global torch RNG, or
    from ``generator`` (a torch.Generator on the indices' device) so that other random draws do not move them.
    state_dict() makes resume exact (it holds the generator's state too)."""

    def __init__(self, indices, batch_size, generator=None):
        if len(indices) == 0:
            raise DataError("cannot sample batches from an empty index set")
        self.indices, self.batch_size, self.generator = indices, batch_size, generator
        self.order = indices[:0]
        self.position = 0

    def __next__(self):
        while len(self.order) - self.position < self.batch_size:
            perm = torch.randperm(len(self.indices), device=self.indices.device, generator=self.generator)
            self.order = torch.cat([self.order[self.position :], self.indices[perm]])
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def __iter__(self):
        return self

    def state_dict(self):
        state = {"order": self.order.cpu(), "position": self.position}
        return state | ({"generator": self.generator.get_state()} if self.generator is not None else {})

    def load_state_dict(self, state):
        self.order, self.position = state["order"].to(self.indices.device), int(state["position"])
        if self.generator is not None:
            restore_generator(self.generator, state.get("generator"), "the batch order")


def restore_generator(generator, state, what):
    """Set ``generator`` to a saved state. A state from another device type (a run resumed with --cuda / --no-cuda
    changed) or none at all (a checkpoint from before the stream existed) cannot be restored: the generator keeps its
    fresh seed and one line says the run continues on a new random stream, not bit for bit."""
    if state is not None and state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return True
    print(f"note: {what} continues on a fresh random stream (the checkpoint has none for this device)", flush=True)
    return False


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
    eigenvalues, eigenvectors = torch.linalg.eigh(
        covariance + identity_scale * torch.eye(len(covariance), dtype=torch.float64, device=flat.device)
    )
    matrix = eigenvectors @ torch.diag(1.0 / torch.sqrt(eigenvalues.clamp_min(0) + eps)) @ eigenvectors.T
    return mean.float(), matrix.float()


class Normalizer:
    """uint8 batch -> float batch. 'zca': GCN (scale 55) + ZCA fit once on all training images (Oliver et al.
    lib/dataset_utils.py:409-472, CIFAR); 'scale': x / 127.5 - 1, i.e. [-1, 1] (SVHN and everything else, and all of
    Protocol B)."""

    def __init__(self, kind, fit_images=None, chunk=5000):
        self.kind = kind
        if kind == "zca":
            fit = torch.cat(
                [
                    global_contrast_normalize(fit_images[i : i + chunk].double())
                    for i in range(0, len(fit_images), chunk)
                ]
            )
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


def pad_images(images, size):
    """uint8 (N, C, H, W) padded with black (0) evenly to size x size, as FixMatch's record_parse_mnist pads 28 -> 32
    (train_fixmatch.py and train_freematch.py, --pad-to); images already that large are returned as they are."""
    _, _, h, w = images.shape
    if size <= max(h, w):
        return images
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def augmentation_defaults(dataset_name):
    """Protocol A augmentation of a data set: (flip, shift, noise_std)."""
    info = DATASETS[dataset_key(dataset_name)]
    return info["flip"], info["shift"], info["noise"]


# ------------------------------------------------------------------------------ RandAugment (FixMatch's strong view)
# FixMatch (RA) as the official code runs it: ablation/ab_fixmatch_ra.py:157 sets --augment d.d.rac, i.e. the weak
# flip + shift and then libml/augment.py:209-224 AugmentPoolRAMC (nops=2, magnitude=10; libml/augment.py:388-391):
# two ops drawn with replacement from the 14 of RANDOM_POLICY_OPS (libml/augment.py:37-41), each applied with
# probability 0.5 at a level drawn from 1..9 (np.random.randint(1, 10), libml/augment.py:198), then Cutout of 16 px
# at 32 px (third_party/auto_augment/augmentations.py:102, size=16). The ops act on the 8-bit image (pil_wrap,
# :152); their strengths are the level mapped by float_parameter / int_parameter (:124-149, PARAMETER_MAX 10).
RANDAUGMENT_OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "color", "contrast", "brightness", "sharpness",
    "shear_x", "translate_x", "translate_y", "posterize", "shear_y",
)  # fmt: skip
AFFINE_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Out-of-image pixels of the affine ops and Cutout: mid-grey, about 0 in [-1, 1]. Officially they are exactly 0 in
# [-1, 1] (transparent in pil_unwrap, :158-165; Cutout multiplies by 0), except that a colour op after an affine op
# flattens the transparent pixels to black there (convert('RGB')); 128 everywhere here is the small deviation.
FILL = 128


def randaugment_strength(op, level, image_size=32):
    """The strength of ``op`` at integer ``level`` (tensor, 0..10) as the official augmentations.py computes it:
    rotate int(level * 30 / 10) degrees (:256), shear level * 0.3 / 10 (:288), translate int(level * 10 / 10) px at
    32 px and above (:334, whatever the size: 9 px at most on STL-10's 96 px too; scaled down by size / 32 on smaller
    images here, which the official code never sees), solarize threshold 256 - int(level * 256 / 10)
    (:390), posterize to 4 - int(level * 4 / 10) bits (:267), colour / contrast / brightness / sharpness factor
    level * 1.8 / 10 + 0.1 (:420)."""
    level = level.double()
    if op == "rotate":
        return torch.floor(level * 30 / 10)
    if op in ("shear_x", "shear_y"):
        return level * 0.3 / 10
    if op in ("translate_x", "translate_y"):
        return torch.floor(level * 10 / 10) * min(image_size, 32) / 32
    if op == "solarize":
        return 256 - torch.floor(level * 256 / 10)
    if op == "posterize":
        return 4 - torch.floor(level * 4 / 10)
    if op in ("color", "contrast", "brightness", "sharpness"):
        return level * 1.8 / 10 + 0.1
    return torch.zeros_like(level)


def affine_matrices(ops, strengths, signs, height, width):
    """Per-sample 2 x 3 matrices in pixel units mapping an output pixel centre (x + 0.5, y + 0.5) to the input point
    PIL samples for that op: Image.transform's AFFINE data (1, s, 0, 0, 1, 0) for shear_x, (1, 0, 0, s, 1, 0) for
    shear_y, (1, 0, t, 0, 1, 0) / (1, 0, 0, 0, 1, t) for the translations (official :291, :314, :337, :360), and
    Image.rotate's matrix about the centre (w / 2, h / 2) for rotate (counter-clockwise degrees). ``ops``: (N,) indices
    into RANDAUGMENT_OPS, -1 or a non-affine op = identity."""
    n = len(ops)
    m = torch.zeros(n, 2, 3, dtype=torch.float64, device=strengths.device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    value = strengths * signs
    index = {name: RANDAUGMENT_OPS.index(name) for name in AFFINE_OPS}
    is_op = {name: ops == i for name, i in index.items()}
    m[:, 0, 1] = torch.where(is_op["shear_x"], value, 0.0)
    m[:, 1, 0] = torch.where(is_op["shear_y"], value, 0.0)
    m[:, 0, 2] = torch.where(is_op["translate_x"], value, 0.0)
    m[:, 1, 2] = torch.where(is_op["translate_y"], value, 0.0)
    angle = -torch.deg2rad(torch.where(is_op["rotate"], value, 0.0))  # PIL: angle = -math.radians(angle)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    rotation = torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], 1),
                            torch.stack([-sin, cos, cy + sin * cx - cos * cy], 1)], 1)  # fmt: skip
    return torch.where(is_op["rotate"][:, None, None], rotation, m)


def warp_affine(images, matrices, fill=FILL):
    """uint8 (N, C, H, W) -> uint8, each image resampled through its own matrix (affine_matrices) with nearest
    neighbours, as PIL's default resampling; points outside the image take ``fill``. One grid_sample for the batch."""
    n, c, h, w = images.shape
    centre = {"dtype": torch.float64, "device": images.device}
    ys, xs = torch.meshgrid(torch.arange(h, **centre) + 0.5, torch.arange(w, **centre) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, h * w, 3)
    source = points @ matrices.transpose(1, 2)  # (N, H*W, 2): input x, y in pixel units
    col, row = torch.floor(source[..., 0]), torch.floor(source[..., 1])  # PIL's nearest: the pixel holding the point
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    flat = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long()
    out = images.reshape(n, c, h * w).gather(2, flat[:, None, :].expand(n, c, h * w))
    return torch.where(inside[:, None, :], out, torch.full_like(out, fill)).reshape(n, c, h, w)


def _blend(images, degenerate, factor):
    """PIL's ImageEnhance blend, torchvision's arithmetic: degenerate + factor (image - degenerate), clamped, cast
    to uint8 (truncation). ``factor``: (N,) per image."""
    factor = factor.double().view(-1, 1, 1, 1)
    blended = torch.addcmul(images.float() * factor.float(), degenerate, (1.0 - factor).float())
    return blended.clamp(0, 255).to(torch.uint8)


def _grayscale(images):
    """ITU-R 601-2 luma as torchvision computes it for uint8 (floored), (N, 1, H, W) float."""
    if images.shape[1] == 1:
        return images.float()
    r, g, b = images.float().unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).floor().unsqueeze(1)


def colour_op(images, op, strength):
    """One non-affine RandAugment op on every uint8 image, ``strength`` (N,) per image; the same results as
    torchvision.transforms.v2.functional's op (and so PIL's ImageOps / ImageEnhance) on each image alone."""
    import torchvision.transforms.v2.functional as TF

    if op == "autocontrast":
        return TF.autocontrast(images)
    if op == "equalize":
        return TF.equalize(images)
    if op == "solarize":
        return torch.where(images.float() >= strength.view(-1, 1, 1, 1), 255 - images, images)
    if op == "posterize":
        keep = (255 << (8 - strength.long())) & 255  # the top ``bits`` bits
        return images & keep.to(torch.uint8).view(-1, 1, 1, 1)
    if op == "brightness":
        return _blend(images, torch.zeros((), device=images.device), strength)
    if op == "color":
        return images if images.shape[1] == 1 else _blend(images, _grayscale(images), strength)
    if op == "contrast":
        return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), strength)
    if op == "sharpness":
        c = images.shape[1]
        kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device) / 13.0
        blurred = F.conv2d(images.float(), kernel.expand(c, 1, 3, 3), groups=c).round()
        # The border keeps the image (PIL's SMOOTH filter leaves it); inside, torchvision's x + (1 - f)(y - x).
        out = images.float()
        inner = out[..., 1:-1, 1:-1]
        one_minus = (1.0 - strength.double()).float().view(-1, 1, 1, 1)
        out[..., 1:-1, 1:-1] = inner + one_minus * (blurred - inner)
        return out.clamp(0, 255).to(torch.uint8)
    return images


def rand_augment(images, num_ops=2, magnitude=10, probability=0.5, cutout=None, generator=None):
    """FixMatch's RandAugment + Cutout on a uint8 batch (N, C, H, W) on its device, every image its own draw: for each
    of ``num_ops`` slots an op from RANDAUGMENT_OPS, applied with ``probability``, at a level in 1..magnitude - 1 with a
    random sign for rotate / shear / translate; then a ``cutout`` x ``cutout`` square (default half the image side, the
    official 16 px at 32 px) of FILL at a uniform centre, clipped at the border. Per slot the affine ops are one
    grid (warp_affine) and each colour op one broadcast pass over the batch, selected per image: no per-image Python
    and no device synchronisation."""
    n, _, h, w = images.shape
    device = images.device

    def draw(high, low=0):
        return torch.randint(low, high, (n,), device=device, generator=generator)

    for _ in range(num_ops):
        ops = draw(len(RANDAUGMENT_OPS))
        applied = torch.rand(n, device=device, generator=generator) < probability
        ops = torch.where(applied, ops, -1)
        level = draw(magnitude, low=1)
        signs = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0).double()
        strength = {op: randaugment_strength(op, level, h) for op in RANDAUGMENT_OPS}
        affine_strength = torch.zeros(n, dtype=torch.float64, device=device)
        for op in AFFINE_OPS:
            affine_strength = torch.where(ops == RANDAUGMENT_OPS.index(op), strength[op], affine_strength)
        images = warp_affine(images, affine_matrices(ops, affine_strength, signs, h, w))
        for i, op in enumerate(RANDAUGMENT_OPS):
            if op not in AFFINE_OPS and op != "identity":
                images = torch.where((ops == i).view(-1, 1, 1, 1), colour_op(images, op, strength[op]), images)
    size = max(1, h // 2) if cutout is None else cutout
    if size > 0:
        cy, cx = draw(h)[:, None], draw(w)[:, None]
        rows, cols = torch.arange(h, device=device)[None, :], torch.arange(w, device=device)[None, :]
        in_rows = (rows >= cy - size // 2) & (rows < cy + size // 2)
        in_cols = (cols >= cx - size // 2) & (cols < cx + size // 2)
        box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        images = torch.where(box, torch.full_like(images, FILL), images)
    return images


# ---------------------------------------------------------------------------------- RandAugment as USB runs it
# FreeMatch's published numbers come from USB (microsoft/Semi-supervised-learning), whose strong view is its own
# RandAugment (semilearn/datasets/augmentation/randaugment.py:184-202, RandAugment(3, 5) in
# semilearn/datasets/cv_datasets/cifar.py:55): three ops drawn with replacement from the same 14 (augment_list,
# :145-162), every one applied, each at a magnitude drawn uniformly from its range (:198; the m = 5 is unused), then
# Cutout of a side drawn uniformly from [0, 0.5] x the image side (:200-201), filled with (125, 123, 114). The affine
# ops leave PIL's default black outside the image.
USB_RANGES = {
    "brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95), "sharpness": (0.05, 0.95),
    "posterize": (4, 8), "rotate": (-30, 30), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "solarize": (0, 256),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}  # fmt: skip
USB_CUTOUT_FILL = (125, 123, 114)


def usb_strength(op, value, image_size):
    """USB's magnitude ``value`` (drawn in USB_RANGES[op]) as the strength colour_op / affine_matrices take: Posterize
    keeps int(v) bits (at least 1, :47-50), a translation moves v x the image side in px (:80-85), the others use v
    as it is (factor, degrees, shear, solarize threshold)."""
    if op == "posterize":
        return torch.floor(value).clamp_min(1)
    if op in ("translate_x", "translate_y"):
        return value * image_size
    return value


def usb_cutout_box(v, x0, y0, h, w):
    """The (N, 1, H, W) mask of CutoutAbs (:124-142) for side ``v`` px and centre draws x0, y0 in (1, w] / (1, h]
    (np.random.uniform(w) draws between w and its default high 1): the corner int(max(0, x0 - v / 2)), the far corner
    min(w, corner + v), PIL's rectangle filling both corners' pixels. A side of 0 draws nothing (:117-118)."""
    left, top = torch.floor((x0 - v / 2).clamp_min(0)), torch.floor((y0 - v / 2).clamp_min(0))
    right, bottom = torch.minimum(left + v, torch.full_like(v, w)), torch.minimum(top + v, torch.full_like(v, h))
    cols = torch.arange(w, device=v.device, dtype=v.dtype)[None, :]
    rows = torch.arange(h, device=v.device, dtype=v.dtype)[None, :]
    in_cols = (cols >= left[:, None]) & (cols <= right[:, None])
    in_rows = (rows >= top[:, None]) & (rows <= bottom[:, None])
    return ((in_rows[:, :, None] & in_cols[:, None, :]) & (v > 0)[:, None, None])[:, None]


def usb_rand_augment(images, num_ops=3, generator=None):
    """USB's RandAugment + Cutout on a uint8 batch (N, C, H, W), every image its own draw, batched as rand_augment:
    ``num_ops`` ops drawn with replacement, each always applied at a uniform magnitude in its range, then a Cutout of
    side uniform in [0, 0.5] x the side. Grey images take the fill's first value."""
    n, c, h, w = images.shape
    device = images.device

    def uniform():
        return torch.rand(n, device=device, generator=generator, dtype=torch.float64)

    for _ in range(num_ops):
        ops = torch.randint(0, len(RANDAUGMENT_OPS), (n,), device=device, generator=generator)
        u = uniform()
        strength = {
            op: usb_strength(op, low + (high - low) * u, w if op == "translate_x" else h)
            for op, (low, high) in USB_RANGES.items()
        }
        affine_strength = torch.zeros(n, dtype=torch.float64, device=device)
        for op in AFFINE_OPS:
            affine_strength = torch.where(ops == RANDAUGMENT_OPS.index(op), strength[op], affine_strength)
        images = warp_affine(images, affine_matrices(ops, affine_strength, torch.ones_like(u), h, w), fill=0)
        for i, op in enumerate(RANDAUGMENT_OPS):
            if op not in AFFINE_OPS and op != "identity":
                images = torch.where((ops == i).view(-1, 1, 1, 1), colour_op(images, op, strength.get(op, u)), images)
    v = uniform() * 0.5 * w  # Cutout(img, v): v x img.size[0] px
    x0, y0 = 1 + (w - 1) * uniform(), 1 + (h - 1) * uniform()
    fill = torch.tensor(USB_CUTOUT_FILL[:c] if c == 3 else USB_CUTOUT_FILL[:1] * c, device=device, dtype=torch.uint8)
    return torch.where(usb_cutout_box(v, x0, y0, h, w), fill.view(1, c, 1, 1).expand_as(images), images)
