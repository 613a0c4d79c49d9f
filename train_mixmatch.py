"""MixMatch and MixMatch + NS3L (Protocol B), faithful to the official google-research/mixmatch TensorFlow code.

MixMatch: Berthelot et al. 2019. MixMatch + NS3L: Chen et al., "Negative Sampling in Semi-Supervised Learning"
(ICML 2020) section 4.3 and Tables 3-5: every row of the mixed batches X' and U' gets as negatives the classes whose
*mixed target* probability is below T = 0.5 / num_classes (0.05), and L = L_x + lambda_u L_u + lambda_1 L_NS3L on the
mixed inputs' outputs.

    python train_mixmatch.py --dataset cifar10 --num-labeled 250 --ns3l       # 307,200 steps (NS3L's 300 epochs)
    python train_mixmatch.py --dataset cifar10 --num-labeled 250 --total-steps 1048576   # the MixMatch paper's 2^20
    python train_mixmatch.py --dataset digits --ns3l      # a CPU run of a few minutes (digits defaults, --help)

Point by point against the official code (google-research/mixmatch at 1011a1d; mixmatch.py, libml/{layers,models,
data,utils}.py, runs/table*.sh; line numbers in docs/fidelity.md):
 1. Batches: 64 labeled + 64 unlabeled, K = 2 views per unlabeled image (FLAGS.batch, nu). Inputs x * 2/255 - 1.
 2. Augmentation (libml/data.py): flip + reflect-pad-4 random crop (CIFAR), crop only (SVHN), flip + pad 12 (STL-10),
    one fresh draw per view. Other image sizes: pad = image size / 8 (the same ratio). No input noise, no whitening.
 3. WRN-28-2 with conv biases, BN decay 0.999 / eps 1e-3, leaky ReLU 0.1, 32 filters doubling per stage; 3 stages, 4 on
    STL-10 (--scales=4 in runs/table2.sh); dense layer Glorot-normal initialised (TF's truncated normal).
 4. Label guess (guess_label): each of the K views is its own training-mode forward pass (own batch statistics), no
    gradient, and the BN running statistics are not updated (its UPDATE_OPS are never run); mean of the softmaxes,
    then sharpen with T = 0.5.
 5. Mixup (MixMode 'xxy.yxy'): one shuffle of the concatenation [X; U_1; ...; U_K] and its targets, lambda ~
    Beta(alpha, alpha) per row, lambda' = max(lambda, 1 - lambda), alpha = 0.75.
 6. Interleave (layers.interleave): the mixed batch is cut into K + 1 chunks of 64 rows that each hold labeled and
    unlabeled rows; each chunk is a separate forward pass with its own batch statistics, and only the first chunk's
    BN updates are applied (post_ops). Logits are un-interleaved with the same swap.
 7. Loss: softmax cross-entropy on the mixed labeled rows + lambda_u * mean over rows and classes of the squared
    error between mixed targets and softmax on the unlabeled rows; lambda_u ramped linearly to its value over 1024 kimg
    = 16,384 steps of 64 (warmup_kimg). lambda_u: 75 CIFAR-10, 250 SVHN, 50 STL-10, 150 CIFAR-100.
 8. Adam lr 0.002 constant. Each step also applies w <- w * (1 - 0.02 * lr) to every conv / dense kernel ('kernel' in
    the name; no biases, no BN) and an EMA (decay 0.999) of the trainable variables only. BN moving statistics are not
    averaged: the EMA model reads the live model's (utils.getter_ema falls back to the variable itself). In the
    official graph the decay, EMA and BN-update ops are built before `tf.control_dependencies([train_op])`
    (mixmatch.py:88-96), so TF does not order them after the Adam update: they run in the same session.run in an
    unspecified order. Here the order is fixed: Adam, then decay, then EMA (the evident intent).
 9. Evaluation in fp32 with the EMA model in inference mode every 64 kimg = 1024 steps; the headline is the median
    test error of the last 20 evaluations on that grid (scripts/extract_accuracy.py). The raw model is also evaluated
    (classify_raw).
10. Split: the labeled images are not in the unlabeled stream (scripts/create_split.py); validation is held out of
    the unlabeled images. The official runs hold out 1 image ("-1" in runs/table*.sh); the defaults here follow the
    NS3L paper's counts instead (CIFAR 5,000; SVHN 7,325, the paper's 65,682 / 64,932 unlabeled; STL-10 500).
11. Length: the NS3L paper trains CIFAR-10 and SVHN for 300 epochs of 64 kimg = 307,200 steps (the default); the
    MixMatch paper's 2^20 steps elsewhere. CIFAR-100 + NS3L: T = 0.5 / 100 (the paper divides T by 10 on CIFAR-100).
12. --svhn-extra is the official "svhn" data set of runs/table7.sh: train + extra, labels drawn from both, alpha 0.25,
    lambda_u 250. The labeled draw is class-balanced here; the official create_split.py matches the class frequencies
    of train + extra.
Where this PyTorch port differs (all small): the post-step weight decay and EMA are unordered in the TF graph (here
decay, then EMA); PyTorch's Adam puts epsilon outside the bias correction (TF: inside); the labeled subset is a
class-balanced draw by seed (official: its own sampler; STL-10 official folds); the ramp is counted in steps, not
images; on CUDA the training passes run under bf16 autocast and torch.compile by default (the official code is fp32
throughout; --no-bf16 restores exact fp32, TF32 off; --no-compile runs eager), evaluation is always exact fp32.
"""

import contextlib
import copy
import math
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import bookkeeping
import common
import wrn

SCRIPT = "train_mixmatch"
# ------------------------------------------------------------------------------------------- defaults per data set
# One row per --dataset: a flag left unset takes its row's value in resolve_defaults(), the one place defaults are
# resolved. lambda_u: official runs/table5.sh:24, table6.sh:25, table2.sh:18, table1.sh:21 (NS3L 4.4). num_valid: the
# official runs hold out 1 image (dataset suffix "-1", runs/table*.sh); the NS3L paper's counts imply CIFAR 5,000
# (section 4.1: 45,000 training images) and SVHN 7,325 (65,682 / 64,932 unlabeled at 250 / 1,000 labels = 73,257 -
# 7,325 - labels; Oliver et al.'s code holds out 7,326). STL-10: 500, the official code's other choice
# (libml/data_pair.py:43-46), as the paper gives none; 4 WRN stages on STL-10 (--scales=4, runs/table2.sh:18).
# Length: the NS3L paper (workshop version, section 4.1) "reduce[s] training epochs to 300 epochs for both SVHN and
# CIFAR10"; an official epoch is 64 kimg = 1,024 steps of 64 (libml/train.py:34, report_kimg), so 307,200 steps. The
# MixMatch paper's 2^20 steps (mixmatch.py:146, train_kimg 1 << 16) stay the default elsewhere (STL-10: the NS3L paper
# trains "significantly fewer epochs" without a number). Evaluation every 64 kimg = 1,024 steps, ramp 1024 kimg =
# 16,384 steps (warmup_kimg), WRN-28-2, BN decay 0.999 (libml/models.py:34) and EMA 0.999 (mixmatch.py:137). digits and
# synthetic get a CPU run (this project's choice, a few minutes on two cores): WRN-10-2, 1,000 steps, BN momentum 0.01,
# EMA 0.99. digits evaluates every 10 steps, so that the reported median of the last 20 covers the last fifth of the
# run (steps 810-1,000), as FixMatch's digits row; with an evaluation every 250 steps (until 2026-12-06) the median of
# "the last 20" was the median of all four evaluations, the first at the end of the lambda_u ramp.
# The tables, kept as tables by the formatter:
# fmt: off
NS3L_STEPS = 300 * 1024
PAPER = dict(num_labeled=1000, num_valid=5000, total_steps=1 << 20, lambda_u=75.0, num_stages=3, eval_every=1024,
             rampup_steps=16384, depth=28, bn_momentum=0.001, ema_decay=0.999)
CPU = dict(total_steps=1000, eval_every=250, rampup_steps=250, depth=10, bn_momentum=0.01, ema_decay=0.99)
DEFAULTS = {
    "cifar10": PAPER | dict(num_labeled=250, total_steps=NS3L_STEPS),
    "cifar100": PAPER | dict(num_labeled=10000, lambda_u=150.0),
    "svhn": PAPER | dict(num_labeled=250, num_valid=7325, total_steps=NS3L_STEPS, lambda_u=250.0),
    "stl10": PAPER | dict(num_labeled=1000, num_valid=500, lambda_u=50.0, num_stages=4),
    "fashion_mnist": PAPER,
    "mnist": PAPER | dict(num_labeled=100),
    "npz": PAPER | dict(num_valid=1000),
    "digits": PAPER | CPU | dict(num_labeled=100, num_valid=200, eval_every=10),
    "synthetic": PAPER | CPU | dict(num_labeled=40, num_valid=50),
}
SOURCES = {"cifar10, cifar100, svhn, stl10": "the official code's runs/table*.sh and the NS3L paper (section 4.1 "
                                            "length, 4.4 weights; docs/fidelity.md, file and line)",
           "fashion_mnist, mnist, npz": "the MixMatch paper's schedule; the split sizes are this project's",
           "digits, synthetic": "a CPU run, this project's choice (a few minutes on two cores); digits evaluates every "
                                "10 steps, so the median of the last 20 is the last fifth of the run",
           "every data set": "alpha 0.75 (0.25 with --svhn-extra, runs/table7.sh), T = 0.5 / classes, lambda_1 2 "
                             "(CIFAR-10: 5 below 4,000 labels, 10 at 4,000): NS3L paper 4.4"}
# fmt: on
TABLE = "per --dataset, see the table below"


def parse_args(argv=None):
    rate, unit = bookkeeping.nonnegative_float, bookkeeping.open_unit
    parser = bookkeeping.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=bookkeeping.defaults_epilog(DEFAULTS, SOURCES)
    )
    positive, nonnegative = bookkeeping.positive_int, bookkeeping.nonnegative_int
    g = parser.add_argument_group("experiment")
    bookkeeping.add_run_args(g)  # --seed, --runs-dir, --run-name, --resume
    bookkeeping.add_device_args(g)
    g.add_argument("--eval-every", type=positive, help=f"steps between evaluations, official 64 kimg ({TABLE})")
    g.add_argument("--log-every", type=positive, default=100, help="steps between logged scalars")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help=f"{', '.join(common.DATASET_NAMES)} or a path to an .npz "
                   "(x_train, y_train, x_test, y_test)")  # fmt: skip
    g.add_argument("--data-dir", default="data", help="torchvision data root")
    g.add_argument("--download", action="store_true", help="let torchvision download the data set")
    g.add_argument("--svhn-extra", action="store_true", help="SVHN + extra as the official runs/table7.sh: the 531k "
                   "'extra' images join train, the labeled and validation images are drawn from train + extra, and "
                   "--alpha defaults to 0.25")  # fmt: skip
    g.add_argument("--num-labeled", type=positive, help=f"labeled images ({TABLE})")
    g.add_argument("--num-valid", type=nonnegative, help=f"validation images; the official runs hold out 1 ({TABLE})")
    g.add_argument("--include-labeled", action="store_true", help="also put the labeled images in the unlabeled stream "
                   "(official create_split.py does not)")  # fmt: skip
    g.add_argument("--shift", type=nonnegative, help="random-crop padding in px (official: 4 at 32 px, 12 on STL-10; "
                   "default image size / 8)")  # fmt: skip
    g = parser.add_argument_group("optimisation")
    g.add_argument("--total-steps", type=positive, help="training steps; --total-steps 1048576 is the MixMatch paper's "
                   f"2^16 kimg ({TABLE})")  # fmt: skip
    g.add_argument("--batch-size", type=positive, default=64, help="labeled images per step, = unlabeled (official 64)")
    g.add_argument("--lr", type=bookkeeping.positive_float, default=0.002, help="Adam learning rate, constant "
                   "(official)")  # fmt: skip
    g.add_argument("--weight-decay", type=rate, default=0.02, help="decoupled decay w <- w (1 - wd lr) on conv / dense "
                   "kernels after each step (official wd)")  # fmt: skip
    g.add_argument("--ema-decay", type=bookkeeping.ema_decay, help=f"EMA of the weights, used for evaluation ({TABLE})")
    g.add_argument("--depth", type=bookkeeping.wrn_depth, help=f"WRN depth, 6n + 4 ({TABLE})")
    g.add_argument("--width", type=positive, default=2, help="WRN widening factor (official 32 filters = width 2)")
    g.add_argument("--num-stages", type=positive, help=f"WRN stages, official --scales ({TABLE})")
    g.add_argument("--bn-momentum", type=bookkeeping.momentum, help="BatchNorm running-stat momentum; 0.001 = TF's "
                   f"decay 0.999 ({TABLE})")  # fmt: skip
    g = parser.add_argument_group("mixmatch")
    g.add_argument("--k-augment", type=positive, default=2, help="augmentations per unlabeled image (official nu = 2)")
    g.add_argument("--temperature", type=bookkeeping.positive_float, default=0.5, help="sharpening temperature T "
                   "(official)")  # fmt: skip
    g.add_argument("--alpha", type=bookkeeping.positive_float, help="Beta(alpha, alpha) of mixup (default 0.75, "
                   "official --beta in runs/table*.sh; 0.25 with --svhn-extra, runs/table7.sh)")  # fmt: skip
    g.add_argument("--lambda-u", type=rate, help=f"weight of the L2 loss ({TABLE})")
    g.add_argument("--rampup-steps", type=nonnegative, help=f"linear ramp of lambda_u, official 1024 kimg ({TABLE})")
    g = parser.add_argument_group("ns3l")
    g.add_argument("--ns3l", action="store_true", help="add the NS3L loss on X' and U' (NS3L paper section 4.3)")
    g.add_argument("--ns3l-weight", type=rate, help="lambda_1 (NS3L 4.4: CIFAR-10 5 below 4000 labels, 10 at 4000; "
                   "SVHN, STL-10 and others 2)")  # fmt: skip
    g.add_argument("--threshold", type=unit, help="T: mixed-target probabilities below it are negatives (default 0.5 / "
                   "num_classes: 0.05 for 10 classes, NS3L 4.4; divided by 10 for CIFAR-100 as the paper does for "
                   "Protocol A)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < max(2, args.k_augment + 1):
        parser.error(
            f"--batch-size must be >= 2 and >= --k-augment + 1 (one interleave group each), got {args.batch_size}"
        )
    try:
        key = common.dataset_key(args.dataset)
    except common.DataError as error:
        parser.error(str(error))
    return resolve_defaults(args, key, common.DATASETS[key]["num_classes"])


def resolve_defaults(args, key, num_classes, image_size=None):
    """Every flag left unset: its data set's row of DEFAULTS, then the values that depend on other flags. Called again
    once the data are loaded, when an .npz's number of classes (and so T) and the image size (and so the crop padding)
    become known; a resumed run's saved arguments are all set already."""
    bookkeeping.fill_defaults(args, DEFAULTS, key)
    if args.alpha is None:
        args.alpha = 0.25 if (key == "svhn" and args.svhn_extra) else 0.75
    if args.ns3l_weight is None:
        args.ns3l_weight = (10.0 if args.num_labeled >= 4000 else 5.0) if key == "cifar10" else 2.0
    if args.threshold is None and num_classes:  # 0.05 for 10 classes (NS3L 4.4), 0.005 for 100
        args.threshold = 0.5 / num_classes
    if args.shift is None and image_size:  # the official pad of 4 at 32 px (CIFAR, SVHN), 12 at 96 px (STL-10)
        args.shift = max(1, round(image_size / 8))
    return args


# ---------------------------------------------------------------------------------------------------- the algorithm
def sharpen(probs, temperature):
    """Sharpen(p, T)_k = p_k^(1/T) / sum_j p_j^(1/T) (MixMatch eq. 7)."""
    powered = probs.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


@torch.no_grad()
def guess_labels(model, views, temperature, autocast=contextlib.nullcontext()):
    """Mean softmax over the K views, each its own training-mode pass (own batch statistics, as the official code runs
    them) that leaves BN running statistics alone; then sharpened. No gradient flows into the targets."""
    with wrn.no_bn_update(model), autocast:
        probs = torch.stack([torch.softmax(model(view).float(), dim=1) for view in views]).mean(dim=0)
    return sharpen(probs, temperature)


def mixup(inputs, targets, alpha):
    """Official MixMode 'xxy.yxy': one shuffle of all rows, lambda ~ Beta(alpha, alpha) per row and
    lambda' = max(lambda, 1 - lambda), so each mixed row stays closer to its own input (MixMatch eq. 8-11)."""
    alpha = torch.tensor(float(alpha), device=inputs.device)  # drawn on the device: no host-device copy per step
    lam = torch.distributions.Beta(alpha, alpha, validate_args=False).sample((len(inputs),))  # no checks: no syncs
    lam = torch.maximum(lam, 1.0 - lam)
    perm = torch.randperm(len(inputs), device=inputs.device)
    lam_x = lam.view(-1, *([1] * (inputs.dim() - 1)))
    mixed_inputs = lam_x * inputs + (1.0 - lam_x) * inputs[perm]
    mixed_targets = lam[:, None] * targets + (1.0 - lam[:, None]) * targets[perm]
    return mixed_inputs, mixed_targets, lam, perm


def interleave_offsets(batch, nu):
    """Group boundaries of official layers.interleave_offsets: nu + 1 near-equal groups, the remainder at the end."""
    groups = [batch // (nu + 1)] * (nu + 1)
    for i in range(batch - sum(groups)):
        groups[-i - 1] += 1
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + group)
    return offsets


def interleave(chunks, batch):
    """Official layers.interleave: swap group i of chunk 0 with group i of chunk i, so every chunk holds labeled and
    unlabeled rows. It is its own inverse (used again to put the logits back in order)."""
    nu = len(chunks) - 1
    offsets = interleave_offsets(batch, nu)
    parts = [[c[offsets[p] : offsets[p + 1]] for p in range(nu + 1)] for c in chunks]
    for i in range(1, nu + 1):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(p) for p in parts]


def interleaved_forward(model, chunks, autocast=contextlib.nullcontext(), memory_format=torch.contiguous_format):
    """Each interleaved chunk is its own forward pass (own batch statistics, as separate TF batches); only the first
    chunk updates the BN running statistics (official: only its UPDATE_OPS go into post_ops)."""
    batch = len(chunks[0])
    mixed = [c.contiguous(memory_format=memory_format) for c in interleave(chunks, batch)]
    with autocast:
        logits = [model(mixed[0]).float()]
        with wrn.no_bn_update(model):
            logits += [model(c).float() for c in mixed[1:]]
    return interleave(logits, batch)


def mixmatch_losses(logits_x, targets_x, logits_u, targets_u):
    """Soft cross-entropy on X' (mean over rows) and squared error on U' (mean over rows and classes)."""
    loss_xe = -(targets_x * F.log_softmax(logits_x, dim=1)).sum(dim=1).mean()
    loss_l2u = (targets_u - torch.softmax(logits_u, dim=1)).pow(2).mean()
    return loss_xe, loss_l2u


def linear_rampup(step, rampup_steps):
    """Official: w_match * clip(step / warmup, 0, 1)."""
    return 1.0 if rampup_steps == 0 else min(max(step / rampup_steps, 0.0), 1.0)


def ns3l_negatives(mixed_targets, threshold):
    """NS3L + MixMatch negatives: the classes whose mixed-target probability is below ``threshold``."""
    return mixed_targets < threshold


def ns3l_loss(logits, negatives):
    """Mean over rows of -log(1 - sum_{k in negatives} p_k), stable form logsumexp(non-negative logits) - logsumexp(all
    logits), clamped at 1e-8 like the authors' released ns3l.py."""
    logits = logits.float()
    log_keep = torch.logsumexp(logits.masked_fill(negatives, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)
    return -log_keep.clamp_min(math.log(1e-8)).mean()


@torch.no_grad()
def decoupled_weight_decay_(model, factor):
    """Official post-step decay v <- v * (1 - wd * lr) on 'kernel' variables: conv and dense weights only (one
    multi-tensor kernel)."""
    torch._foreach_mul_([m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))], 1.0 - factor)


@torch.no_grad()
def ema_update_(ema_model, model, decay):
    """tf.train.ExponentialMovingAverage over the trainable variables: e <- decay e + (1 - decay) p. BN running
    statistics are not averaged; the EMA model uses the live ones (official getter_ema falls back to the variable).
    Multi-tensor kernels (torch._foreach_*): two launches per step instead of two per tensor."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - decay)
    torch._foreach_copy_(list(ema_model.buffers()), list(model.buffers()))


def grid_test_errors(evaluations, eval_every, total_steps):
    """The test errors that enter the median of the last 20, in order: evaluations on the --eval-every grid plus the
    one at the end of this run. A run extended with --resume --total-steps drops its old off-grid final evaluation,
    so an extended run reports what an uninterrupted run of the new length would (official: one checkpoint per
    64 kimg, scripts/extract_accuracy.py:34-37)."""
    return [error for step, error in evaluations if step % eval_every == 0 or step == total_steps]


def make_model(num_classes, args, channels):
    """Official ResNet classifier: WRN with conv biases; the dense kernel TF Glorot-normal (truncated) initialised."""
    model = wrn.WideResNet(
        num_classes,
        args.depth,
        args.width,
        channels,
        num_stages=args.num_stages,
        conv_bias=True,
        bn_momentum=args.bn_momentum,
    )
    fan_in, fan_out = model.fc.in_features, model.fc.out_features
    std = math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978  # TF's truncated-normal variance correction
    nn.init.trunc_normal_(model.fc.weight, 0.0, std, -2 * std, 2 * std)
    return model


def main():
    args = parse_args()
    checkpoint = None
    if args.resume:
        checkpoint = bookkeeping.load_checkpoint(args.resume, SCRIPT)
        args = bookkeeping.resume_args(args, checkpoint, sys.argv[1:])
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    amp, memory_format = bookkeeping.precision(args, device)  # bf16 autocast on CUDA; the faster format (channels_last)
    bookkeeping.seed_everything(args.seed, args.torch_deterministic)

    # Data: every failure here is one line and happens before anything is written.
    try:
        data = common.load_dataset(args.dataset, args.data_dir, args.download, device, args.svhn_extra)
        # the default shift is max(1, round(side / 8)): reflect padding by >= 1 px needs 2 px a side (--shift: below)
        common.require_image_size(data, 2, "the random translation by 1 px or more (reflect padding)")
        if args.svhn_extra and data.name == "svhn":  # official svhn split: labels from train + extra (README.md:31)
            data.num_labelable = len(data.x_train)
        args = resolve_defaults(args, data.name, data.num_classes, data.image_size)  # what needs the data: T, shift
        split = common.make_ssl_split(
            data.y_train,
            data.num_classes,
            args.num_labeled,
            args.num_valid,
            args.seed,
            data.num_labelable,
            include_labeled=args.include_labeled,
        )
    except common.DataError as error:
        bookkeeping.fail(str(error))
    flip, shift = common.DATASETS[data.name]["flip"], args.shift  # CIFAR / STL-10 flip, SVHN / digits / MNIST do not
    if shift >= data.image_size:
        bookkeeping.fail(f"--shift {shift} must be smaller than the image size {data.image_size} (reflect padding)")
    bookkeeping.warn_bn_momentum(args.bn_momentum, args.total_steps)
    normalize = common.Normalizer("scale")  # official: x * 2 / 255 - 1, no whitening

    model = make_model(data.num_classes, args, data.channels).to(device, memory_format=memory_format)
    ema_model = copy.deepcopy(model).requires_grad_(False)  # TF EMA shadows start at the initial values
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # default betas, constant LR (official)
    labeled_batches = common.BatchSampler(split.labeled.to(device), args.batch_size)
    unlabeled_batches = common.BatchSampler(split.unlabeled.to(device), args.batch_size)
    start_step, best_valid, test_at_best, evaluations = 0, float("inf"), float("nan"), []
    clock = bookkeeping.TrainClock(device)
    if checkpoint is not None:
        with bookkeeping.restoring(args.resume):  # a checkpoint that does not fit: one line, nothing kept
            clock = bookkeeping.restore_run(
                checkpoint,
                device,
                model=model,
                ema_model=ema_model,
                optimizer=optimizer,
                labeled_sampler=labeled_batches,
                unlabeled_sampler=unlabeled_batches,
            )
            start_step, best_valid, test_at_best = (checkpoint[k] for k in ("step", "best_valid", "test_at_best"))
            if "evaluations" in checkpoint:
                evaluations = [tuple(e) for e in checkpoint["evaluations"]]
            else:  # an older checkpoint kept only the errors, one per --eval-every steps, the last one at its step
                errors = list(checkpoint["test_errors"])
                evaluations = [(min(args.eval_every * (i + 1), start_step), e) for i, e in enumerate(errors)]
            print(f"resumed {args.resume} at step {start_step}")
    run_dir, writer = bookkeeping.open_run(args, SCRIPT, split, checkpoint)  # made (or reopened) only now

    def batch(indices):  # gather uint8 images on the device -> [-1, 1] -> flip / pad-and-crop, fresh per sample
        return common.augment(normalize(data.x_train[indices]), flip, shift).contiguous(memory_format=memory_format)

    sums = {}  # running sums of logged scalars, kept on the device so the loop never waits for the GPU

    def accumulate(name, value):
        sums[name] = sums.get(name, 0.0) + value.detach().float()

    valid_error = test_error = raw_test_error = float("nan")
    net = bookkeeping.compile_model(model, args, device)  # the training passes; evaluation and checkpoints use model
    model.train()
    last_log_step = start_step
    clock.start()
    for step in range(start_step, args.total_steps):
        # ALGO LOGIC: guess labels on K views, mixup all rows, interleaved forward, losses, Adam, decay, EMA
        labeled_idx, unlabeled_idx = next(labeled_batches), next(unlabeled_batches)
        x, y = batch(labeled_idx), data.y_train[labeled_idx]
        views = [batch(unlabeled_idx) for _ in range(args.k_augment)]
        guessed = guess_labels(net, views, args.temperature, amp)
        targets = torch.cat([F.one_hot(y, data.num_classes).float()] + [guessed] * args.k_augment)
        mixed_inputs, mixed_targets, lam, _ = mixup(torch.cat([x] + views), targets, args.alpha)
        logits = torch.cat(interleaved_forward(net, list(mixed_inputs.split(len(x))), amp, memory_format))
        n = len(x)
        loss_xe, loss_l2u = mixmatch_losses(logits[:n], mixed_targets[:n], logits[n:], mixed_targets[n:])
        lambda_u = args.lambda_u * linear_rampup(step, args.rampup_steps)
        loss = loss_xe + lambda_u * loss_l2u
        if args.ns3l:  # NS3L 4.3: negatives from the mixed targets of every row of X' and U'
            negatives = ns3l_negatives(mixed_targets, args.threshold)
            loss_ns3l = ns3l_loss(logits, negatives)
            loss = loss + args.ns3l_weight * loss_ns3l
            # The dominant (lambda' >= 0.5) image of each row is the row's own: a negative at its true class is wrong.
            dominant = torch.cat([y] + [data.y_train[unlabeled_idx]] * args.k_augment)
            known = dominant >= 0
            wrong = negatives.gather(1, dominant.clamp_min(0)[:, None]).squeeze(1) & known
            accumulate("losses/ns3l", loss_ns3l)
            accumulate("charts/ns3l_negatives_per_sample", negatives.sum(1).float().mean())
            accumulate("charts/ns3l_false_negative_rate", wrong.sum() / known.sum().clamp_min(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step(compiled=net is not model)  # a compiled leg's first step compiles: timed apart
        decoupled_weight_decay_(model, args.weight_decay * args.lr)
        ema_update_(ema_model, model, args.ema_decay)
        hidden = data.y_train[unlabeled_idx]  # hidden labels: diagnostics only, never in a loss
        accumulate("losses/xe", loss_xe)
        accumulate("losses/l2u", loss_l2u)
        accumulate("losses/total", loss)
        accumulate(
            "charts/guess_accuracy",
            ((guessed.argmax(1) == hidden) & (hidden >= 0)).sum() / (hidden >= 0).sum().clamp_min(1),
        )
        accumulate("charts/guess_max_probability", guessed.max(1).values.mean())
        accumulate("charts/mixup_lambda", lam.mean())

        done = step + 1
        # LOGGING: means since the last log; SPS over training time only
        if done % args.log_every == 0 or done == args.total_steps:
            sps = clock.lap()
            means = bookkeeping.interval_means(sums, done - last_log_step)
            bookkeeping.write_scalars(
                writer, done, means | {"charts/learning_rate": args.lr, "charts/lambda_u": lambda_u, "charts/SPS": sps}
            )
            print(
                bookkeeping.progress_line(done, args.total_steps, sps, loss=means["losses/total"], lambda_u=lambda_u),
                flush=True,
            )
            sums, last_log_step = {}, done
        # EVAL: the EMA model (official classify_op); the reported number is the median of the last 20 test errors
        if done % args.eval_every == 0 or done == args.total_steps:
            clock.pause()
            valid_x, valid_y = data.x_train[split.valid.to(device)], data.y_train[split.valid.to(device)]
            # fp32 evaluation (bookkeeping.error_rate), as the official graph (float32 placeholders, mixmatch.py:54)
            valid_error = (
                bookkeeping.error_rate(ema_model, valid_x, valid_y, normalize, memory_format=memory_format)
                if len(valid_x)
                else float("nan")
            )
            test_error = bookkeeping.error_rate(
                ema_model, data.x_test, data.y_test, normalize, memory_format=memory_format
            )
            raw_test_error = bookkeeping.error_rate(
                model, data.x_test, data.y_test, normalize, memory_format=memory_format
            )
            evaluations.append((done, test_error))
            test_errors = grid_test_errors(evaluations, args.eval_every, args.total_steps)
            median20 = statistics.median(test_errors[-20:])
            if valid_error < best_valid:
                best_valid, test_at_best = valid_error, test_error
            bookkeeping.write_scalars(
                writer,
                done,
                {
                    "eval/valid_error": valid_error,
                    "eval/test_error": test_error,
                    "eval/test_error_raw": raw_test_error,
                    "eval/test_error_at_best_valid": test_at_best,
                    "eval/median_last20_test_error": median20,
                },
            )
            print(
                f"eval step {done}: EMA valid error {valid_error:.2f}% test error {test_error:.2f}% (raw model "
                f"{raw_test_error:.2f}%), median of last {min(20, len(test_errors))}: {median20:.2f}%",
                flush=True,
            )
            bookkeeping.save_run(
                run_dir,
                SCRIPT,
                args,
                done,
                clock,
                model=model.state_dict(),
                ema_model=ema_model.state_dict(),
                optimizer=optimizer.state_dict(),
                labeled_sampler=labeled_batches.state_dict(),
                unlabeled_sampler=unlabeled_batches.state_dict(),
                best_valid=best_valid,
                test_at_best=test_at_best,
                evaluations=evaluations,
            )
            clock.start()

    test_errors = grid_test_errors(evaluations, args.eval_every, args.total_steps)
    median20 = statistics.median(test_errors[-20:]) if test_errors else float("nan")
    summary = bookkeeping.write_summary(
        writer,
        run_dir,
        {
            "steps": args.total_steps,
            **clock.summary(),
            "median_last20_test_error": median20,
            "final_valid_error": valid_error,
            "final_test_error": test_error,
            "final_test_error_raw": raw_test_error,
            "best_valid_error": best_valid if best_valid != float("inf") else float("nan"),
            "test_error_at_best_valid": test_at_best,
        },
        args,
        reported=("median_last20_test_error", "test_error_at_best_valid"),
    )
    print(
        f"done: {args.total_steps - start_step} steps, median of the last 20 EMA test errors {median20:.2f}% "
        f"(final {test_error:.2f}%), {summary['steps_per_second'] or 0:.1f} steps/s -> {run_dir}"
    )


if __name__ == "__main__":
    main()
