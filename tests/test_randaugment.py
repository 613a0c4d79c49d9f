"""Tests for common.rand_augment, FixMatch's batched RandAugment + Cutout: every op against torchvision's functional
op (colour ops) or PIL's transform (affine ops, what the official code calls) on single images, the official
strengths per level, per-sample independence, ranges and dtype."""

import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

COLOUR = ("autocontrast", "equalize", "solarize", "posterize", "brightness", "color", "contrast", "sharpness")


def images(channels=3, n=6, size=32, seed=0):
    """Smooth random uint8 images (a 3x3 box blur of noise), so the ops see real structure and repeated values."""
    noise = torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool2d(noise.float(), 3, 1, 1).to(torch.uint8)


def test_strengths_are_the_official_level_mappings():
    level = torch.arange(1, 10)
    assert common.randaugment_strength("rotate", level).tolist() == [3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert common.randaugment_strength("solarize", level).tolist() == [231, 205, 180, 154, 128, 103, 77, 52, 26]
    assert common.randaugment_strength("posterize", level).tolist() == [4, 4, 3, 3, 2, 2, 2, 1, 1]
    assert common.randaugment_strength("translate_x", level).tolist() == list(range(1, 10))
    assert common.randaugment_strength("translate_x", level, image_size=16).tolist() == [k / 2 for k in range(1, 10)]
    assert common.randaugment_strength("translate_x", level, image_size=96).tolist() == list(range(1, 10))  # STL-10
    assert common.randaugment_strength("shear_y", level).tolist() == pytest.approx([0.03 * k for k in range(1, 10)])
    assert common.randaugment_strength("contrast", level).tolist() == pytest.approx(
        [0.18 * k + 0.1 for k in range(1, 10)]
    )


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("op", COLOUR)
def test_colour_ops_match_torchvision_on_each_image(op, channels):
    batch = images(channels)
    for level in range(1, 10):
        strength = common.randaugment_strength(op, torch.full((len(batch),), level))
        v = float(strength[0])
        reference = {
            "autocontrast": TF.autocontrast,
            "equalize": TF.equalize,
            "solarize": lambda x: TF.solarize(x, v),
            "posterize": lambda x: TF.posterize(x, int(v)),
            "brightness": lambda x: TF.adjust_brightness(x, v),
            "color": lambda x: TF.adjust_saturation(x, v),
            "contrast": lambda x: TF.adjust_contrast(x, v),
            "sharpness": lambda x: TF.adjust_sharpness(x, v),
        }[op]
        expected = torch.stack([reference(image) for image in batch])
        assert torch.equal(common.colour_op(batch, op, strength), expected), (op, level)


def test_colour_ops_take_a_strength_per_image():
    batch = images(n=4)
    strength = torch.tensor([231.0, 128.0, 26.0, 256.0])  # the last threshold inverts nothing
    out = common.colour_op(batch, "solarize", strength)
    for image, value, result in zip(batch, strength, out):
        assert torch.equal(result, TF.solarize(image, float(value)) if value < 256 else image)


def pil_affine(image, op, value):
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    grey = (common.FILL,) * 3
    if op == "rotate":
        out = pil.rotate(value, fillcolor=grey)  # the official _rotate_impl (nearest, about the centre)
    else:
        data = {
            "shear_x": (1, value, 0, 0, 1, 0),
            "shear_y": (1, 0, 0, value, 1, 0),
            "translate_x": (1, 0, value, 0, 1, 0),
            "translate_y": (1, 0, 0, 0, 1, value),
        }[op]
        out = pil.transform(pil.size, Image.AFFINE, data, fillcolor=grey)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


@pytest.mark.parametrize("op", common.AFFINE_OPS)
def test_affine_ops_match_pil_on_each_image(op):
    """Exact, except where a sample point lands exactly on a pixel boundary and PIL's rounding picks the other
    neighbour: at most one row of the image (32 of 1,024 pixels), at one level of the nine (shear 0.12, rotate 12
    degrees)."""
    batch = images()
    index = torch.full((len(batch),), common.RANDAUGMENT_OPS.index(op))
    inexact = 0
    for level in range(1, 10):
        for sign in (-1.0, 1.0):
            strength = common.randaugment_strength(op, torch.full((len(batch),), level))
            signs = torch.full((len(batch),), sign, dtype=torch.float64)
            out = common.warp_affine(batch, common.affine_matrices(index, strength, signs, 32, 32))
            expected = torch.stack([pil_affine(image, op, sign * float(strength[0])) for image in batch])
            differs = (out != expected).any(1).float().mean().item()
            assert differs <= 32 / 1024, (op, level, sign, differs)
            inexact += differs > 0
    assert inexact <= 2, op
    assert (out == common.FILL).any() or op == "rotate"  # shifted-in pixels are grey


def test_one_grid_applies_each_images_own_affine_op():
    batch = images(n=5)
    names = ["identity", "rotate", "shear_x", "translate_y", "solarize"]  # solarize: not affine, left alone
    ops = torch.tensor([common.RANDAUGMENT_OPS.index(name) for name in names])
    strength = torch.tensor([0.0, 27.0, 0.21, 7.0, 128.0], dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    out = common.warp_affine(batch, common.affine_matrices(ops, strength, signs, 32, 32))
    assert torch.equal(out[0], batch[0]) and torch.equal(out[4], batch[4])
    assert torch.equal(out[1], pil_affine(batch[1], "rotate", -27.0))
    assert torch.equal(out[2], pil_affine(batch[2], "shear_x", 0.21))
    assert torch.equal(out[3], pil_affine(batch[3], "translate_y", -7.0))


def test_rand_augment_dtype_shape_and_per_sample_draws():
    one = images(n=1)
    batch = one.expand(64, -1, -1, -1).contiguous()
    out = common.rand_augment(batch, generator=torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    distinct = {bytes(image.numpy()) for image in out}
    assert len(distinct) > 48  # every image draws its own ops, levels, signs and Cutout square
    again = common.rand_augment(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # a seeded generator repeats the draw


def test_cutout_is_one_grey_square_of_half_the_side():
    batch = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    out = common.rand_augment(batch, probability=0.0, generator=torch.Generator().manual_seed(0))
    grey = (out == common.FILL).all(1)
    sizes = grey.sum((1, 2))
    assert sizes.max() == 256 and sizes.min() >= 64  # 16 x 16, clipped to at least 8 x 8 at a corner
    rows, cols = grey.any(2).sum(1), grey.any(1).sum(1)
    assert torch.equal(rows * cols, sizes)  # a rectangle
    assert torch.equal(common.rand_augment(batch, probability=0.0, cutout=0), batch)


def test_each_op_is_drawn_and_applied_half_the_time():
    """With one op slot and no Cutout, a little under half of the images change: probability 0.5, minus the draws that
    leave an image as it is (identity, a solarize threshold above its brightest pixel, ...)."""
    batch = images(n=400, seed=1)
    out = common.rand_augment(batch, num_ops=1, cutout=0, generator=torch.Generator().manual_seed(5))
    changed = (out != batch).flatten(1).any(1).float().mean().item()
    assert 0.35 < changed < 0.55


# ------------------------------------------------------------------ USB's RandAugment (FreeMatch's strong view)
def usb_pil(image, op, v):
    """USB's op on one image, as semilearn/datasets/augmentation/randaugment.py:16-112 writes it (PIL)."""
    import PIL.ImageEnhance
    import PIL.ImageOps

    pil = Image.fromarray(
        image.permute(1, 2, 0).numpy().squeeze(-1) if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
    )
    out = {
        "brightness": lambda: PIL.ImageEnhance.Brightness(pil).enhance(v),
        "color": lambda: PIL.ImageEnhance.Color(pil).enhance(v),
        "contrast": lambda: PIL.ImageEnhance.Contrast(pil).enhance(v),
        "sharpness": lambda: PIL.ImageEnhance.Sharpness(pil).enhance(v),
        "posterize": lambda: PIL.ImageOps.posterize(pil, max(1, int(v))),
        "solarize": lambda: PIL.ImageOps.solarize(pil, v),
        "rotate": lambda: pil.rotate(v),
        "shear_x": lambda: pil.transform(pil.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "shear_y": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "translate_x": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, v * pil.size[0], 0, 1, 0)),
        "translate_y": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, v * pil.size[1])),
    }[op]()
    array = np.array(out)
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)


@pytest.mark.parametrize("op", sorted(common.USB_RANGES))
def test_usb_ops_match_usbs_pil_code_at_magnitudes_across_their_range(op):
    """Colour ops: within one grey level of PIL (torchvision's arithmetic truncates where PIL rounds, as for
    FixMatch's ops); affine ops: exact but for a sample point on a pixel boundary (one row at most)."""
    batch = images()
    low, high = common.USB_RANGES[op]
    index = torch.full((len(batch),), common.RANDAUGMENT_OPS.index(op))
    for u in (0.0, 0.13, 0.5, 0.77, 0.999):
        v = low + (high - low) * u
        strength = common.usb_strength(op, torch.full((len(batch),), v, dtype=torch.float64), 32)
        if op in common.AFFINE_OPS:
            out = common.warp_affine(
                batch, common.affine_matrices(index, strength, torch.ones(len(batch)).double(), 32, 32), fill=0
            )
        else:
            out = common.colour_op(batch, op, strength)
        expected = torch.stack([usb_pil(image, op, v) for image in batch])
        if op in common.AFFINE_OPS:
            assert (out != expected).any(1).float().mean().item() <= 32 / 1024, (op, v)
        else:
            assert (out.int() - expected.int()).abs().max() <= 1, (op, v)


def test_usb_cutout_is_pils_rectangle_and_usb_draws_every_op():
    import PIL.ImageDraw

    for v, x0, y0 in [(0.0, 5.0, 5.0), (3.7, 1.2, 31.9), (16.0, 20.5, 2.0), (11.2, 31.99, 17.3), (9.9, 16.0, 16.0)]:
        box = common.usb_cutout_box(
            torch.tensor([v]).double(), torch.tensor([x0]).double(), torch.tensor([y0]).double(), 32, 32
        )
        canvas = Image.new("L", (32, 32), 0)
        if v > 0:  # CutoutAbs, :128-141
            left, top = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
            PIL.ImageDraw.Draw(canvas).rectangle((left, top, min(32, left + v), min(32, top + v)), 255)
        assert torch.equal(box[0, 0], torch.from_numpy(np.array(canvas) > 0)), (v, x0, y0)
    # every image gets its three ops and a Cutout whose side is uniform in [0, 16] px at 32 px
    flat = torch.full((4000, 3, 32, 32), 60, dtype=torch.uint8)
    out = common.usb_rand_augment(flat, generator=torch.Generator().manual_seed(0))
    filled = (out == torch.tensor(common.USB_CUTOUT_FILL, dtype=torch.uint8).view(1, 3, 1, 1)).all(1).sum((1, 2))
    side = filled.float().sqrt()
    assert side.max() <= 17 and 6.5 < side.mean() < 9.5  # mean side ~ 8 px (+ PIL's inclusive corner, - clipping)
    assert (out != flat).any(1).flatten(1).any(1).float().mean() > 0.9  # almost every image changes


@pytest.mark.parametrize("op", ["translate_x", "translate_y"])
def test_usb_translations_scale_with_their_own_side_on_a_wide_image(op):
    batch = torch.randint(0, 256, (4, 3, 16, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    index = torch.full((4,), common.RANDAUGMENT_OPS.index(op))
    v = 0.25
    strength = common.usb_strength(op, torch.full((4,), v, dtype=torch.float64), 40 if op == "translate_x" else 16)
    out = common.warp_affine(batch, common.affine_matrices(index, strength, torch.ones(4).double(), 16, 40), fill=0)
    assert torch.equal(out, torch.stack([usb_pil(image, op, v) for image in batch]))
