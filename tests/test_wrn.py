"""WRN wiring (Oliver et al. lib/networks.py), parameter count, and the forward pass that leaves BatchNorm statistics
alone."""

import torch
import torch.nn.functional as F

import wrn


def test_wrn_28_2_parameter_count():
    model = wrn.WideResNet(10)
    # 1,467,610: the "1.47 M" WRN-28-2 of Oliver et al. (conv without bias, 1x1 shortcuts where the shape changes).
    assert sum(p.numel() for p in model.parameters()) == 1_467_610
    assert sum(p.numel() for p in wrn.WideResNet(10, conv_bias=True).parameters()) > 1_467_610


def test_stage_layout_and_defaults():
    model = wrn.WideResNet(10, depth=28, width=2)
    units = list(model.units)
    assert len(units) == 12  # 4 units x 3 stages
    assert [u.conv1.out_channels for u in units[::4]] == [32, 64, 128]
    assert [u.conv1.stride[0] for u in units[::4]] == [1, 2, 2]
    assert [u.activate_before_residual for u in units] == [True] + [False] * 11
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.001 and m.eps == 1e-3 for m in bns)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    four = wrn.WideResNet(10, num_stages=4)
    assert four(torch.randn(2, 3, 96, 96)).shape == (2, 10) and four.num_features == 256


def test_conv_init_std():
    torch.manual_seed(0)
    model = wrn.WideResNet(10)
    conv = model.units[8].conv2  # 128 -> 128, 3x3: std sqrt(2 / (9 * 128))
    assert abs(conv.weight.std().item() - (2 / (9 * 128)) ** 0.5) < 0.002


def test_head_init_is_tf_glorot_normal():
    torch.manual_seed(0)
    weight = wrn.WideResNet(10).fc.weight  # 10 x 128: std sqrt(2 / 138), truncated at 2 / 0.8796 of that
    std = (2 / 138) ** 0.5
    assert abs(weight.std().item() - std) < 0.1 * std and weight.abs().max() <= 2 * std / 0.8796 + 1e-6
    assert torch.count_nonzero(wrn.WideResNet(10).fc.bias) == 0


def _capture_inputs(module):
    seen = {}
    module.register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0].detach().clone()))
    return seen


def test_unit_wiring_matches_oliver():
    """Stage-1 unit 0 feeds BN-lReLU(x) to both conv1 and the shortcut; the first unit of stage 2 feeds BN-lReLU(x)
    to conv1 (the popular ports feed raw x there) and the raw x to its 1x1 shortcut."""
    torch.manual_seed(0)
    model = wrn.WideResNet(10, depth=10, width=2).eval()  # width 2: stage-1 unit 0 has a 1x1 shortcut
    first, stage2 = model.units[0], model.units[1]
    seen = {
        name: _capture_inputs(getattr(unit, part))
        for name, unit, part in [
            ("f_conv", first, "conv1"),
            ("f_short", first, "shortcut"),
            ("s_conv", stage2, "conv1"),
            ("s_short", stage2, "shortcut"),
        ]
    }
    unit_in = {}
    stage2.register_forward_hook(lambda m, inp, out: unit_in.__setitem__("x", inp[0].detach().clone()))
    stem_out = {}
    model.stem.register_forward_hook(lambda m, inp, out: stem_out.__setitem__("x", out.detach().clone()))
    model(torch.randn(3, 3, 16, 16))
    act = F.leaky_relu(first.bn1(stem_out["x"]), 0.1)
    assert torch.allclose(seen["f_conv"]["x"], act) and torch.allclose(seen["f_short"]["x"], act)
    assert torch.allclose(seen["s_conv"]["x"], F.leaky_relu(stage2.bn1(unit_in["x"]), 0.1))
    assert torch.equal(seen["s_short"]["x"], unit_in["x"])


def test_no_bn_update_pass_keeps_running_stats_bit_identical():
    torch.manual_seed(0)
    model = wrn.WideResNet(10, depth=10, width=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.randn(8, 3, 16, 16) * 3 + 1
    with wrn.no_bn_update(model):
        out = model(x)
    out.sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # batch statistics were used (train-mode output differs from eval-mode output) ...
    with wrn.no_bn_update(model):
        train_out = model(x)
    assert not torch.allclose(train_out, model.eval()(x))
    model.train()
    # ... and an ordinary pass does update the statistics, so the check above can fail.
    model(x)
    changed = model.state_dict()
    assert not all(torch.equal(before[k], changed[k]) for k in before)
    assert all(m.update_stats for m in model.modules() if isinstance(m, wrn.BatchNorm2d))
