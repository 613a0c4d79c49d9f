"""Bad data is refused up front: one line on stderr ('<script>: error: <message>'), exit 1, no traceback, and nothing
on disk changes (no run directory, the data untouched), for every training script. The rules are common.py's
validate_arrays (images, labels, features), the per-script minimum image size (common.require_image_size) and, for
train_imagenet_mel.py, --crop-size and unreadable image files."""

import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bookkeeping  # noqa: E402
import common  # noqa: E402
import train_fixmatch  # noqa: E402
import train_fmnist_ablation  # noqa: E402
import train_imagenet_mel  # noqa: E402
import train_mixmatch  # noqa: E402
import train_pi  # noqa: E402
import train_supervised  # noqa: E402
import train_vat  # noqa: E402
import train_xc  # noqa: E402

IMAGE_SCRIPTS = {
    "train_supervised.py": train_supervised,
    "train_vat.py": train_vat,
    "train_pi.py": train_pi,
    "train_mixmatch.py": train_mixmatch,
    "train_fixmatch.py": train_fixmatch,
    "train_fmnist_ablation.py": train_fmnist_ablation,
}
# The smallest image side each script's pipeline handles (None: no minimum beyond 1 x 1).
MIN_SIDE = {
    "train_supervised.py": 3,  # augment's translation by up to 2 px with reflect padding (an .npz's shift)
    "train_vat.py": 3,
    "train_pi.py": 3,
    "train_mixmatch.py": 2,  # its translation by max(1, round(side / 8)) >= 1 px
    "train_fixmatch.py": 3,  # RandAugment's unpadded 3 x 3 sharpness filter
    "train_fmnist_ablation.py": None,  # no augmentation; its strided convolutions are padded
}


# ------------------------------------------------------------------------------------------------------- data
def good_arrays(n_train=60, n_test=12, side=8, classes=3):
    rng = np.random.RandomState(0)
    return {
        "x_train": rng.randint(0, 256, (n_train, side, side), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.randint(0, 256, (n_test, side, side), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


def with_float_images(arrays, low=0.0, high=1.0):
    rng = np.random.RandomState(1)
    out = dict(arrays)
    for key in ("x_train", "x_test"):
        out[key] = rng.uniform(low, high, arrays[key].shape)
    return out


def edit(arrays, **changes):
    out = dict(arrays)
    out.update(changes)
    return out


def poke(array, index, value, dtype=None):
    array = np.array(array, dtype=dtype or np.asarray(array).dtype)
    array.flat[index] = value
    return array


def _float_with(value, where="x_train", index=5):
    arrays = with_float_images(good_arrays())
    arrays[where] = poke(arrays[where], index, value)
    return arrays


# (case id, arrays, the words the one-line message must hold). Each is refused by every image script.
IMAGE_CASES = [
    ("nan-pixel", lambda: _float_with(np.nan), "x_train has 1 NaN/inf values; images must be uint8 or finite floats"),
    ("inf-pixel-test", lambda: _float_with(np.inf, "x_test"), "x_test has 1 NaN/inf values"),
    ("minus-one-to-one", lambda: with_float_images(good_arrays(), -1.0, 1.0), "x_train has values in [-0.9"),
    ("floats-0-255", lambda: with_float_images(good_arrays(), 0.0, 255.0), "images must be uint8 or finite floats"),
    (
        "complex",
        lambda: edit(good_arrays(), x_train=good_arrays()["x_train"].astype(np.complex128)),
        "x_train has dtype complex128",
    ),
    ("int64-images", lambda: edit(good_arrays(), x_test=good_arrays()["x_test"].astype(np.int64)), "dtype int64"),
    ("two-channels", lambda: edit(good_arrays(), x_train=np.zeros((60, 8, 8, 2), np.uint8)), "has shape (60, 8, 8, 2)"),
    ("no-images", lambda: edit(good_arrays(), x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0)), "no images"),
    ("not-square", lambda: edit(good_arrays(), x_train=np.zeros((60, 8, 6), np.uint8)), "must be square"),
    ("negative-label", lambda: edit(good_arrays(), y_train=poke(good_arrays()["y_train"], 3, -1)), "negative values"),
    (
        "fractional-label",
        lambda: edit(good_arrays(), y_train=poke(good_arrays()["y_train"], 3, 1.5, np.float64)),
        "not whole numbers (1.5)",
    ),
    ("nan-label", lambda: edit(good_arrays(), y_test=poke(good_arrays()["y_test"], 0, np.nan, float)), "(nan)"),
    ("labels-n-by-1", lambda: edit(good_arrays(), y_train=good_arrays()["y_train"][:, None]), "shape (60, 1)"),
    (
        "string-labels",
        lambda: edit(good_arrays(), y_train=good_arrays()["y_train"].astype(str)),
        "y_train has dtype <U",
    ),
    ("single-class", lambda: edit(good_arrays(), y_train=np.zeros(60, int), y_test=np.zeros(12, int)), "single class"),
    ("unseen-test-label", lambda: edit(good_arrays(), y_test=poke(good_arrays()["y_test"], 0, 3)), "never has (3)"),
    ("class-gap", lambda: edit(good_arrays(), y_train=np.arange(60) % 3 * 2), "no image of class 1"),
    (
        "huge-label",
        lambda: edit(good_arrays(), y_train=poke(good_arrays()["y_train"], 0, 10**15)),
        "values above 2^31 - 1",
    ),
    ("short-labels", lambda: edit(good_arrays(), y_train=good_arrays()["y_train"][:-1]), "59 labels for 60 images"),
    ("test-length", lambda: edit(good_arrays(), y_test=good_arrays()["y_test"][:5]), "5 labels for 12 images"),
    ("train-test-shapes", lambda: edit(good_arrays(), x_test=np.zeros((12, 10, 10), np.uint8)), "differ in shape"),
    ("missing-array", lambda: {k: v for k, v in good_arrays().items() if k != "y_test"}, "lacks y_test"),
]


def save_npz(folder, arrays, name="data.npz"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    np.savez(path, **arrays)
    return path


def snapshot(root):
    """Every path under ``root`` with its size and modification time: any write shows."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.stat(path)
            state[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return state


@pytest.fixture
def spy_open_run(monkeypatch):
    """Records whether a script got as far as making its run directory; stops it there (a control run needs no
    training)."""
    calls = []

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        calls.append(args)
        raise Reached

    monkeypatch.setattr(bookkeeping, "open_run", stop)
    monkeypatch.setattr(bookkeeping, "create_run_dir", stop)
    return calls, Reached


def refused(module, script, argv, tmp_path, monkeypatch, capsys, code=1):
    """Run ``module.main()`` as the command line ``script argv`` would; assert the one-line contract and that nothing
    under tmp_path changed; return the message."""
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), err
    assert snapshot(tmp_path) == before
    assert not os.path.exists(tmp_path / "runs")
    return lines[0]


def image_argv(script, path, tmp_path):
    argv = ["--dataset", path, "--runs-dir", tmp_path / "runs", "--no-cuda", "--num-labeled", "9", "--num-valid", "6"]
    if script != "train_fmnist_ablation.py":
        argv += ["--depth", "10", "--width", "1"]
    return argv


# ------------------------------------------------------------------------------------------- validation function
@pytest.mark.parametrize("case, make, message", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_validate_arrays_refuses(case, make, message, tmp_path):
    arrays = make()
    if case == "missing-array":  # a file matter: _npz's
        with pytest.raises(common.DataError, match="lacks y_test"):
            common.load_dataset(save_npz(tmp_path, arrays))
        return
    with pytest.raises(common.DataError) as error:
        common.validate_arrays("data.npz", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    text = str(error.value)
    assert text.startswith("data.npz: ") and message in text and "\n" not in text


def test_validate_arrays_accepts_and_converts():
    arrays = good_arrays()
    x_train, y_train, x_test, y_test = common.validate_arrays("d", *arrays.values())
    assert (
        x_train.shape == (60, 1, 8, 8)
        and x_train.dtype == np.uint8
        and np.array_equal(x_train[:, 0], arrays["x_train"])
    )
    assert y_train.dtype == np.int64 and x_test.shape == (12, 1, 8, 8)
    floats = with_float_images(arrays)
    floats["y_train"] = floats["y_train"].astype(np.float32)  # whole-number floats are labels too
    x_train, y_train, _, _ = common.validate_arrays("d", *floats.values())
    assert np.array_equal(x_train[:, 0], np.rint(floats["x_train"] * 255).astype(np.uint8))
    assert y_train.dtype == np.int64 and np.array_equal(y_train, arrays["y_train"])
    nhwc = np.zeros((60, 8, 8, 3), np.uint8)
    assert common.check_images(nhwc, "d", "x").shape == (60, 3, 8, 8)
    # a named data set: its own class count, classes may be missing from a small file
    common.validate_arrays("cifar10", nhwc, np.arange(60) % 4, nhwc[:4], np.arange(4), num_classes=10)
    with pytest.raises(common.DataError, match="has 10 classes"):
        common.validate_arrays("cifar10", nhwc, np.arange(60) % 11, nhwc[:4], np.arange(4), num_classes=10)


@pytest.mark.parametrize(
    "features, message",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "1 NaN/inf values"),
        (np.array([[0.0, np.inf], [-np.inf, 2.0]]), "2 NaN/inf values"),
        (np.array([[0.0, 1e39], [1.0, 2.0]]), "beyond float32's range"),
        (np.array([[1j, 0], [1, 2]]), "dtype complex128"),
        (np.array([["a", "b"], ["c", "d"]]), "dtype <U1"),
        (np.zeros((0, 3)), "holds no points"),
        (np.float64(3.0), "holds no points"),
    ],
)
def test_check_features_refuses(features, message):
    with pytest.raises(common.DataError, match=re.escape(message)):
        common.check_features(features, "x.npz", "x_train")


# ---------------------------------------------------------------------------- every image script, end to end
@pytest.mark.parametrize("script", list(IMAGE_SCRIPTS))
def test_image_scripts_refuse_bad_npz_before_writing(script, tmp_path, monkeypatch, capsys, spy_open_run):
    """Every case of IMAGE_CASES through the script's main(): one line naming the file, exit 1, nothing written."""
    calls, _ = spy_open_run
    for case, make, message in IMAGE_CASES:
        path = save_npz(tmp_path / "data", make(), f"{case}.npz")
        line = refused(IMAGE_SCRIPTS[script], script, image_argv(script, path, tmp_path), tmp_path, monkeypatch, capsys)
        assert path in line and message in line, (case, line)
    garbage = tmp_path / "data" / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    line = refused(
        IMAGE_SCRIPTS[script], script, image_argv(script, str(garbage), tmp_path), tmp_path, monkeypatch, capsys
    )
    assert "is not a readable .npz file" in line
    assert calls == []


@pytest.mark.parametrize("script", list(IMAGE_SCRIPTS))
def test_good_npz_reaches_the_run_directory(script, tmp_path, monkeypatch, spy_open_run):
    """The control of the test above: the same command line with good data gets as far as making the run
    directory (so the refusals are the data's, and the loading comes before the first write)."""
    calls, reached = spy_open_run
    for arrays in (good_arrays(), with_float_images(good_arrays())):
        path = save_npz(tmp_path / "data", arrays)
        monkeypatch.setattr(sys, "argv", [script, *map(str, image_argv(script, path, tmp_path))])
        with pytest.raises(reached):
            IMAGE_SCRIPTS[script].main()
    assert len(calls) == 2


@pytest.mark.parametrize("script", list(IMAGE_SCRIPTS))
def test_image_size_below_the_pipelines_minimum_is_refused(script, tmp_path, monkeypatch, capsys, spy_open_run):
    calls, reached = spy_open_run
    minimum = MIN_SIDE[script] or 1
    for side in range(1, minimum):
        path = save_npz(tmp_path / "data", good_arrays(side=side), f"side{side}.npz")
        line = refused(IMAGE_SCRIPTS[script], script, image_argv(script, path, tmp_path), tmp_path, monkeypatch, capsys)
        assert f"images are {side}x{side} pixels" in line and f"at least {minimum}x{minimum}" in line
    path = save_npz(tmp_path / "data", good_arrays(side=minimum), "smallest.npz")
    monkeypatch.setattr(sys, "argv", [script, *map(str, image_argv(script, path, tmp_path))])
    with pytest.raises(reached):
        IMAGE_SCRIPTS[script].main()
    assert len(calls) == 1


def test_the_minimum_sizes_are_the_pipelines_own():
    """What MIN_SIDE rests on: the translation works at shift + 1 px and indexes outside the image below; RandAugment
    works at 3 px and not at 2; the WRN's strided, padded convolutions take a 1 x 1 image."""
    torch.manual_seed(0)
    for shift in (1, 2):
        common.augment(torch.randn(256, 1, shift + 1, shift + 1), True, shift)
        with pytest.raises(RuntimeError):
            common.augment(torch.randn(256, 1, shift, shift), True, shift)
    for _ in range(10):
        common.rand_augment(torch.randint(0, 256, (64, 3, 3, 3), dtype=torch.uint8))
    with pytest.raises(RuntimeError):
        for _ in range(10):
            common.rand_augment(torch.randint(0, 256, (64, 3, 2, 2), dtype=torch.uint8))
    import wrn

    assert wrn.WideResNet(3, 10, 1, 1)(torch.randn(2, 1, 1, 1)).shape == (2, 3)
    assert train_fmnist_ablation.SmallCNN(3, 1, 1, 8)(torch.randn(2, 1, 1, 1)).shape == (2, 3)


# --------------------------------------------------------------------------------------------------- train_xc.py
def xc_arrays():
    rng = np.random.RandomState(0)
    return {
        "x_train": rng.randn(40, 20),
        "y_train": np.arange(40) % 4,
        "x_test": rng.randn(10, 20),
        "y_test": np.arange(10) % 4,
    }


XC_NPZ_CASES = [
    ("nan-feature", lambda: edit(xc_arrays(), x_train=poke(xc_arrays()["x_train"], 7, np.nan)), "1 NaN/inf values"),
    ("inf-test-feature", lambda: edit(xc_arrays(), x_test=poke(xc_arrays()["x_test"], 0, -np.inf)), "x_test has 1"),
    ("float32-overflow", lambda: edit(xc_arrays(), x_train=poke(xc_arrays()["x_train"], 0, 1e300)), "float32's range"),
    ("complex", lambda: edit(xc_arrays(), x_train=xc_arrays()["x_train"] * 1j), "dtype complex128"),
    ("negative-label", lambda: edit(xc_arrays(), y_train=poke(xc_arrays()["y_train"], 1, -2)), "negative values (-2)"),
    (
        "fractional-label",
        lambda: edit(xc_arrays(), y_train=poke(xc_arrays()["y_train"], 1, 0.25, float)),
        "not whole numbers (0.25)",
    ),
    ("labels-n-by-1", lambda: edit(xc_arrays(), y_test=xc_arrays()["y_test"][:, None]), "shape (10, 1)"),
    ("string-labels", lambda: edit(xc_arrays(), y_train=xc_arrays()["y_train"].astype(str)), "dtype <U"),
    ("empty", lambda: edit(xc_arrays(), x_train=np.zeros((0, 5)), y_train=np.zeros(0, int)), "holds no points"),
    ("single-class", lambda: edit(xc_arrays(), y_train=np.zeros(40, int)), "single class"),
    ("short-labels", lambda: edit(xc_arrays(), y_train=xc_arrays()["y_train"][:30]), "30 labels for 40 points"),
    ("feature-count", lambda: edit(xc_arrays(), x_test=np.zeros((10, 4))), "differ in shape"),
]

XC_TEXT_CASES = [  # (training file, its line-numbered message)
    ("3 2\n0.5 1.0\nnan 2.0\n1.0 1.0\n", "line 3: value 1 is 'nan', not finite"),
    ("3 2\n0.5 1.0\n1.0 1e39\n1.0 1.0\n", "line 3: value 2 is '1e39', not finite"),
    ("3 2\n0:0.5 1:inf\n0:1.0\n1:1.0\n", "line 2: feature 1 has the value inf"),
    ("3 2\n0:0.5\n0:1.0\n1:-1e39\n", "line 4: feature 1 has the value -1e+39"),
]


@pytest.mark.parametrize("case, make, message", XC_NPZ_CASES, ids=[c[0] for c in XC_NPZ_CASES])
def test_xc_npz_refused_before_writing(case, make, message, tmp_path, monkeypatch, capsys, spy_open_run):
    path = save_npz(tmp_path / "data", make())
    line = refused(
        train_xc, "train_xc.py", ["--dataset", path, "--runs-dir", tmp_path / "runs"], tmp_path, monkeypatch, capsys
    )
    assert path in line and message in line
    assert spy_open_run[0] == []


@pytest.mark.parametrize("text, message", XC_TEXT_CASES)
def test_xc_text_non_finite_feature_names_the_line(text, message, tmp_path, monkeypatch, capsys, spy_open_run):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train_x.txt").write_text(text)
    (data / "train_y.txt").write_text("3 2\n0:1\n1:1\n0:1\n")
    (data / "test_x.txt").write_text("2 2\n1.0 1.0\n0.0 1.0\n")
    (data / "test_y.txt").write_text("2 2\n0:1\n1:1\n")
    argv = ["--dataset", data / "train_x.txt", "--labels", data / "train_y.txt", "--test-data", data / "test_x.txt"]
    argv += ["--test-labels", data / "test_y.txt", "--runs-dir", tmp_path / "runs"]
    line = refused(train_xc, "train_xc.py", argv, tmp_path, monkeypatch, capsys)
    assert f"{data / 'train_x.txt'}: {message}" in line
    assert spy_open_run[0] == []


def test_xc_good_npz_reaches_the_run_directory(tmp_path, monkeypatch, spy_open_run):
    calls, reached = spy_open_run
    arrays = xc_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float64)  # whole-number floats are labels, as for images
    path = save_npz(tmp_path / "data", arrays)
    argv = ["train_xc.py", "--dataset", path, "--runs-dir", str(tmp_path / "runs"), "--batch-size", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(reached):
        train_xc.main()
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ train_imagenet_mel.py
def make_folder(root, size=12, per_class=4):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in range(2):
            os.makedirs(root / split / f"c{c}", exist_ok=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--crop-size", "1", "--resize-size", "1"], "--crop-size must be >= 29 for a DenseNet of 4 dense blocks"),
        (["--crop-size", "28"], "--crop-size must be >= 29"),
        (["--crop-size", "4", "--resize-size", "8", "--block-config", "2,2"], "--crop-size must be >= 5"),
    ],
)
def test_imagenet_crop_too_small_is_a_flag_error(flags, message, tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "data")
    line = refused(
        train_imagenet_mel,
        "train_imagenet_mel.py",
        ["--data-dir", tmp_path / "data", "--runs-dir", tmp_path / "runs", *flags],
        tmp_path,
        monkeypatch,
        capsys,
        code=2,
    )
    assert message in line


def test_imagenet_smallest_crop_runs_through_the_densenet():
    for blocks, side in (("2", 1), ("2,2", 5), ("2,2,2", 13), ("6,12,24,16", 29)):
        args = train_imagenet_mel.parse_args(
            ["--data-dir", "d", "--crop-size", str(side), "--block-config", blocks, "--growth-rate", "4"]
        )
        model = train_imagenet_mel.build_model(args, 3).eval()
        assert model(torch.randn(1, 3, side, side))[0].shape == (1, 3)
        if side > 1:
            with pytest.raises(RuntimeError):
                model(torch.randn(1, 3, side - 1, side - 1))


def test_imagenet_unreadable_images_are_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    """A corrupt and a truncated file: training substitutes the next image of the same pool, evaluation leaves them
    out, and each is named by one warning line; the run finishes."""
    root = make_folder(tmp_path / "data", size=40)
    corrupt = root / "train" / "c0" / "1.png"
    corrupt.write_bytes(b"this is not a png")
    truncated = root / "val" / "c1" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    train, train_eval, val = train_imagenet_mel.load_image_folders(str(root), 32, 36)
    capsys.readouterr()
    assert train[1] is None and val[4] is None  # sorted: c0/0..3 then c1/0..3
    view = train_imagenet_mel.SemiSupervisedView(train, ([0, 1, 5], [2, 3, 4]))
    image, target = view[(1, True)]
    assert target == 1 and tuple(image.shape) == (3, 32, 32)
    err = capsys.readouterr().err.splitlines()
    assert err == [line for line in err if "warning: skipping unreadable image" in line] and len(err) == 2
    assert str(corrupt) in err[0] and str(truncated) in err[1]

    runs = tmp_path / "runs"
    argv = ["--data-dir", root, "--runs-dir", runs, "--run-name", "r", "--num-labeled", "4", "--num-unlabeled", "-1"]
    argv += ["--num-valid", "2", "--batch-size", "4", "--total-steps", "3", "--eval-every", "3", "--no-cuda"]
    argv += ["--crop-size", "32", "--resize-size", "36", "--block-config", "2,2", "--growth-rate", "4"]
    argv += ["--num-init-features", "8", "--num-workers", "0", "--labeled-ratio", "0.5"]
    monkeypatch.setattr(sys, "argv", ["train_imagenet_mel.py", *map(str, argv)])
    train_imagenet_mel.main()
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(truncated) in err
    assert all("warning: skipping unreadable image" in line for line in err.splitlines())
    assert os.path.exists(runs / "r" / "summary.json")
