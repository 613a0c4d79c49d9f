"""Wide ResNet (WRN-28-2 and smaller variants) wired as in Oliver et al. 2018, "Realistic Evaluation of Deep
Semi-Supervised Learning Algorithms" (reference code: brain-research/realistic-ssl-evaluation).

- Pre-activation residual units, `(depth - 4) / 6` units per stage, widths 16 -> 16k -> 32k -> 64k (-> 128k).
- Stage 1, unit 0 ("activate before residual"): BN + leaky ReLU is computed once and feeds both the conv branch and
  the 1x1 shortcut. Every other unit: the conv branch takes BN-lReLU(x), the shortcut takes the raw x (identity, or a
  1x1 conv when the shape changes). The popular PyTorch ports (MixMatch-pytorch, USB, TorchSSL) feed the raw x into
  conv1 of the first unit of stages 2 and 3; that deviation is NOT copied here, except with ``layout="usb"``.
- Leaky ReLU slope 0.1; BatchNorm momentum 0.001 (TF decay 0.999; short CPU runs want ~0.01, or the running
  statistics lag far behind the weights), eps 1e-3; convs without bias (``conv_bias=True``
  for the official MixMatch code, which uses them), initialised N(0, sqrt(2 / (k * k * out_channels))).
- Head: BN -> lReLU -> global average pool -> linear.
- ``layout="usb"``: USB's WRN (microsoft/Semi-supervised-learning, semilearn/nets/wrn/wrn.py:30-116 and
  wrn_var.py for STL-10), which train_freematch.py uses: the raw x into conv1 of a stage's first unit where the
  width changes (:47-52), BN eps 1e-5 in the units and 1e-3 at the head (:33, :37, :97), a bias on the first
  convolution (:84-85), a plain Glorot-normal classifier (:114-116); ``first_stride`` 2 is wrn_var_37_2's first stage.

``no_bn_update(model)`` runs forward passes with batch statistics that leave the BatchNorm running statistics
untouched (VAT's perturbation search, the Pi-model target pass, MixMatch's label guess and interleave chunks).
"""

import contextlib
import math

import torch.nn as nn
import torch.nn.functional as F


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running-statistics update can be switched off while still normalising with batch statistics.

    With ``update_stats = False`` in training mode the layer calls ``F.batch_norm`` without running buffers, so no
    kernel can touch them (toggling ``track_running_stats`` or ``momentum`` is not reliable across versions).
    """

    def __init__(self, num_features, momentum=0.001, eps=1e-3):
        super().__init__(num_features, momentum=momentum, eps=eps)
        self.update_stats = True

    def forward(self, x):
        if self.training and not self.update_stats:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


@contextlib.contextmanager
def no_bn_update(model):
    """Within this block, training-mode forward passes of ``model`` use batch statistics but do not update the
    BatchNorm running mean / variance / counter."""
    layers = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    previous = [m.update_stats for m in layers]
    for m in layers:
        m.update_stats = False
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m.update_stats = p


class ResidualUnit(nn.Module):
    def __init__(
        self, in_channels, out_channels, stride, activate_before_residual, slope, conv_bias, bn_momentum, usb=False
    ):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        eps = 1e-5 if usb else 1e-3
        self.bn1 = BatchNorm2d(in_channels, bn_momentum, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=conv_bias)
        self.bn2 = BatchNorm2d(out_channels, bn_momentum, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=conv_bias)
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=conv_bias)
        self.slope = slope
        # USB: where the width changes and the unit does not activate before the residual, conv1 takes the raw x
        self.raw_conv_input = usb and in_channels != out_channels and not activate_before_residual

    def forward(self, x):
        activated = F.leaky_relu(self.bn1(x), self.slope)
        # Only stage-1 unit 0 feeds the activated tensor to the shortcut; elsewhere the shortcut sees the raw x.
        residual = activated if self.activate_before_residual else x
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        out = self.conv1(x if self.raw_conv_input else activated)
        out = self.conv2(F.leaky_relu(self.bn2(out), self.slope))
        return out + residual


class WideResNet(nn.Module):
    def __init__(
        self,
        num_classes,
        depth=28,
        width=2,
        in_channels=3,
        num_stages=3,
        slope=0.1,
        conv_bias=False,
        bn_momentum=0.001,
        layout="oliver",
        first_stride=1,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if width < 1 or num_stages < 1:
            raise ValueError("WRN width and num_stages must be >= 1")
        units = (depth - 4) // 6
        channels = [16] + [16 * width * 2**s for s in range(num_stages)]
        if layout not in ("oliver", "usb"):
            raise ValueError(f"WRN layout must be 'oliver' or 'usb', got {layout!r}")
        usb = layout == "usb"
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=conv_bias or usb)
        layers = []
        for stage in range(num_stages):
            for unit in range(units):
                layers.append(
                    ResidualUnit(
                        channels[stage] if unit == 0 else channels[stage + 1],
                        channels[stage + 1],
                        stride=(2 if stage > 0 else first_stride) if unit == 0 else 1,
                        activate_before_residual=(stage == 0 and unit == 0),
                        slope=slope,
                        conv_bias=conv_bias,
                        bn_momentum=bn_momentum,
                        usb=usb,
                    )
                )
        self.units = nn.Sequential(*layers)
        self.bn = BatchNorm2d(channels[-1], bn_momentum)
        self.fc = nn.Linear(channels[-1], num_classes)
        self.slope = slope
        self.num_features = channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and usb:  # nn.init.xavier_normal_ (USB wrn.py:115)
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # Oliver et al.: kernel_initializer=tf.glorot_normal_initializer() = truncated normal at +-2 std,
                # std sqrt(2 / (fan_in + fan_out)) / 0.8796 (the truncation's correction)
                std = math.sqrt(2.0 / (m.in_features + m.out_features)) / 0.87962566103423978
                nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.units(self.stem(x))
        out = F.leaky_relu(self.bn(out), self.slope)
        return self.fc(out.mean(dim=(2, 3)))
