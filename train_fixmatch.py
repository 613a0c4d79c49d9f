"""FixMatch and FixMatch + NS3L (Protocol B), faithful to the official google-research/fixmatch TensorFlow code.

FixMatch: Sohn et al., NeurIPS 2020, with RandAugment as its strong augmentation (FixMatch (RA), the official
ablation/ab_fixmatch_ra.py). FixMatch + NS3L is beyond both papers: the NS3L loss of Chen et al., "Negative
Sampling in Semi-Supervised Learning" (ICML 2020) section 3, added the way FixMatch takes its pseudo-label: the
negatives of an unlabeled image are the classes whose probability under the (detached) weak-view prediction is below
T = 0.5 / num_classes, and -log(1 - sum of their probabilities) is taken on the strong view's logits.

    python train_fixmatch.py --dataset cifar10 --num-labeled 250          # the official run: 2^20 steps of 64 + 448
    python train_fixmatch.py --dataset cifar10 --num-labeled 40 --ns3l
    python train_fixmatch.py --dataset digits --ns3l      # a CPU run of about two minutes (digits defaults, --help)

Point by point against the official FixMatch (RA) (google-research/fixmatch at d4985a1: ablation/ab_fixmatch_ra.py,
libml/{augment,data,models,train,utils}.py, third_party/auto_augment/augmentations.py; lines in docs/fidelity.md):
 1. Batches: 64 labeled (FLAGS.batch) + mu x 64 unlabeled with mu = 7 (uratio), each unlabeled image seen as a weak
    and a strong view. The unlabeled stream is the whole training set, the labeled images included
    (scripts/create_unlabeled.py); 1 image held out for validation ("-1"). Inputs x * 2/255 - 1, no whitening.
 2. Weak view (labeled images and the pseudo-label's view): flip + reflect-pad-4 random crop (CIFAR, Fashion-MNIST),
    crop only (SVHN), pad 12 on STL-10 (DEFAULT_AUGMENT); other sizes pad = image size / 8. Fashion-MNIST is padded
    with black from 28 to 32 px first, as record_parse_mnist does (--pad-to).
 3. Strong view: its own weak draw, then RandAugment (two ops from the 14 of RANDOM_POLICY_OPS, each applied with
    probability 0.5 at a level drawn from 1..9; translations of up to 9 px at 32 px and above), then Cutout of 16 px
    (--augment d.d.rac, AugmentPoolRAMC): common.rand_augment, batched on the device, every image its own draw.
 4. WRN-28-2 with conv biases, BN decay 0.999 / eps 1e-3, leaky ReLU 0.1, 32 filters doubling per stage,
    ceil(log2(size)) - 2 stages (scales), He-normal convs, Glorot-normal dense (libml/models.py ResNet). CIFAR-100: 128
    filters (WRN-28-8) and weight decay 1e-3; STL-10: 4 stages (WRN-37-2), where the code's rule gives 5: the FixMatch
    paper's settings (section 4, appendix B).
 5. One forward pass of [labeled; weak; strong] in training mode: BN normalises with the statistics of the whole
    960-image batch and its running statistics take that batch (the official interleave only splits the batch
    across GPUs; on one device the pass is the same, utils.para_cat).
 6. Loss: cross-entropy on the labeled rows + lambda_u (1) x mean over the unlabeled rows of mask x cross-entropy of the
    strong logits to argmax softmax(weak logits), the weak prediction detached, mask = max probability >= 0.95; plus
    wd x sum of 1/2 ||w||^2 over conv and dense kernels (no biases, no BN): here SGD's weight_decay on exactly those.
 7. SGD with Nesterov momentum 0.9; LR 0.03 x cos(7 pi k / (16 K)) with K the run's length; an EMA (0.999) of the
    trainable variables applied after each update, BN statistics read live (utils.getter_ema).
 8. Evaluation in fp32 of the EMA model every 64 kimg = 1,024 steps; the reported number is the median test error of
    the last 20 evaluations (README, scripts/extract_accuracy.py). The raw model is evaluated too (classify_raw).
    summary.json also holds the median validation error of the same evaluations, to select settings on.
 9. Length: 2^16 kimg = 2^20 steps of 64 (train_kimg).
--ns3l: loss + lambda_1 x mean over the unlabeled rows of -log(1 - sum_{k: p_weak,k < T} p_strong,k), every row (no
mask: a negative needs no confidence). --ns3l-view weak takes it on the weak logits instead. T = 0.5 / num_classes
as the NS3L paper's MixMatch setting; lambda_1 = 1 from a small CPU sweep selected on validation error
(docs/fixmatch_l1_sweep.md): no paper gives FixMatch values.
Where this PyTorch port differs (all small): the strong view's out-of-image pixels are grey (FILL = 128) where the
official affine ops leave 0 in [-1, 1] (the same up to half a grey level) and a colour op after an affine op would make
them black; the labeled subset is a class-balanced draw by seed (official create_split.py: CIFAR balanced too, SVHN
in proportion to the class frequencies, STL-10 its predefined folds) and the validation image another draw; the
Contrast and Color ops floor the luma as torchvision does where PIL rounds (at most a grey level); a grey image
(Fashion-MNIST, digits) gets the same ops on one channel, which the official RandAugment (RGB only) never ran;
convolutions pad 1 on every side where TF's 'same' pads a stride-2 convolution on the bottom and right only; below
32 px (digits, synthetic), which the official code never sees, translations shrink by size / 32 and Cutout is half
the side; the
official data pipeline shuffles with a buffer of 8,192 images, here every epoch is
a full permutation; on CUDA the training pass runs under bf16 autocast and torch.compile by default (the official code
is fp32; --no-bf16 restores exact fp32, TF32 off; --no-compile runs eager); evaluation is always exact fp32.
"""

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

SCRIPT = "train_fixmatch"
# ------------------------------------------------------------------------------------------- defaults per data set
# One row per --dataset: a flag left unset takes its row's value in resolve_defaults(), the one place defaults are
# resolved. The official defaults (ablation/ab_fixmatch_ra.py:150-161): confidence 0.95, wd 5e-4, wu 1,
# filters 32 (width 2), repeat 4 (depth 28), uratio 7, batch 64, lr 0.03, train_kimg 2^16 (2^20 steps); EMA 0.999
# (ab_fixmatch_ra.py:67), BN decay 0.999 (libml/models.py:66); an evaluation per report_kimg = 64 kimg = 1,024 steps
# (libml/train.py:34). Labels: the README's example and ab_fixmatch_ra.py:158 (CIFAR-10 250), the README's list of
# splits (CIFAR-100 10,000, STL-10 1,000). CIFAR-100: WRN-28-8 (filters 128) and wd 1e-3; STL-10: WRN-37-2, i.e. 4
# stages (FixMatch paper, section 4 and appendix B; the code's scales = ilog2(96) - 2 would be 5). Fashion-MNIST is
# padded to 32 px (libml/data.py:78). digits and synthetic get a CPU run (this project's choice): WRN-10-2, batch
# 32 + 7 x 32, BN momentum 0.02, EMA 0.99; synthetic 1,000 steps with an evaluation every 10, digits 2,000 steps with
# an evaluation every 20 (the median of the last 20 covers the last fifth of the run, as a CPU-sized grid). digits had
# 1,000 steps until 2026-12-06: with 30 labels (seed 1) a 1,000-step run ended at 11.7 % EMA test error, still falling,
# where a 3,000-step run stood at 3.8 % at step 2,000 and 3.6 % at its end; so 2,000 steps, the length of the
# Protocol A scripts' digits runs (the laptop suite in the README measures it over 5 seeds).
# The tables, kept as tables by the formatter:
# fmt: off
PAPER = dict(num_labeled=250, num_valid=1, total_steps=1 << 20, eval_every=1024, batch_size=64, depth=28, width=2,
             weight_decay=5e-4, bn_momentum=0.001, ema_decay=0.999, pad_to=0)
CPU = dict(total_steps=1000, eval_every=10, batch_size=32, depth=10, bn_momentum=0.02, ema_decay=0.99)
DEFAULTS = {
    "cifar10": PAPER,
    "cifar100": PAPER | dict(num_labeled=10000, width=8, weight_decay=1e-3),
    "svhn": PAPER,
    "stl10": PAPER | dict(num_labeled=1000, num_stages=4),
    "fashion_mnist": PAPER | dict(pad_to=32),
    "mnist": PAPER | dict(pad_to=32),
    "npz": PAPER,
    "digits": PAPER | CPU | dict(num_labeled=100, num_valid=200, total_steps=2000, eval_every=20),
    "synthetic": PAPER | CPU | dict(num_labeled=40, num_valid=50),
}
SOURCES = {"cifar10, svhn": "the official code's defaults (ablation/ab_fixmatch_ra.py, libml/*.py; "
                                   "docs/fidelity.md, file and line)",
           "cifar100, stl10": "the same with the FixMatch paper's models: CIFAR-100 WRN-28-8 and weight decay 1e-3, "
                              "STL-10 WRN-37-2 (4 stages) (section 4 and appendix B)",
           "fashion_mnist, mnist, npz": "the official schedule; Fashion-MNIST padded to 32 px as libml/data.py does",
           "digits, synthetic": "a CPU run, this project's choice; digits 2,000 steps (with 30 labels 1,000 "
                                "steps had not converged)",
           "every data set": "mu 7, tau 0.95, lambda_u 1, SGD Nesterov 0.9, LR 0.03 with cosine decay; NS3L: "
                             "T = 0.5 / classes, lambda_1 1 (a small CPU sweep, selected on validation; no paper gives "
                             "FixMatch values)"}
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
    g.add_argument("--stop-at", type=positive, default=None, metavar="STEP", help="leave after STEP steps with a "
                   "checkpoint (a job's time limit; a run is ~a day on one GPU) and continue later with --resume; the "
                   "LR schedule still follows --total-steps, so the legs equal one uninterrupted run")  # fmt: skip
    bookkeeping.add_device_args(g)
    g.add_argument("--eval-every", type=positive, help=f"steps between evaluations, official 64 kimg ({TABLE})")
    g.add_argument("--median-of", type=positive, default=20, help="the reported number is the median test error of "
                   "this many last evaluations (official 20)")  # fmt: skip
    g.add_argument("--log-every", type=positive, default=100, help="steps between logged scalars")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help=f"{', '.join(common.DATASET_NAMES)} or a path to an .npz "
                   "(x_train, y_train, x_test, y_test)")  # fmt: skip
    g.add_argument("--data-dir", default="data", help="torchvision data root")
    g.add_argument("--download", action="store_true", help="let torchvision download the data set")
    g.add_argument("--num-labeled", type=positive, help=f"labeled images ({TABLE})")
    g.add_argument("--num-valid", type=nonnegative, help=f"validation images; the official runs hold out 1 ({TABLE})")
    g.add_argument("--exclude-labeled", action="store_true", help="keep the labeled images out of the unlabeled stream "
                   "(official: the unlabeled stream is the whole training set)")  # fmt: skip
    g.add_argument("--shift", type=nonnegative, help="random-crop padding in px of the weak view (official: 4 at 32 "
                   "px, 12 on STL-10; default image size / 8)")  # fmt: skip
    g.add_argument("--pad-to", type=nonnegative, help="pad smaller images with black to this size first; 0 = never "
                   f"(official: Fashion-MNIST to 32) ({TABLE})")  # fmt: skip
    g = parser.add_argument_group("optimisation")
    g.add_argument("--total-steps", type=positive, help=f"training steps; official 2^20 ({TABLE})")
    g.add_argument("--batch-size", type=positive, help=f"labeled images per step, official 64 ({TABLE})")
    g.add_argument("--uratio", type=positive, default=7, help="mu: unlabeled images per step = mu x --batch-size "
                   "(official 7)")  # fmt: skip
    g.add_argument("--lr", type=bookkeeping.positive_float, default=0.03, help="SGD learning rate before the cosine "
                   "decay lr cos(7 pi k / 16 K) (official)")  # fmt: skip
    g.add_argument("--weight-decay", type=rate, help="L2 wd x sum 1/2 ||w||^2 on conv and dense kernels, in the loss "
                   f"as the official code ({TABLE})")  # fmt: skip
    g.add_argument("--ema-decay", type=bookkeeping.ema_decay, help=f"EMA of the weights, used for evaluation ({TABLE})")
    g.add_argument("--depth", type=bookkeeping.wrn_depth, help=f"WRN depth, 6n + 4 ({TABLE})")
    g.add_argument("--width", type=positive, help=f"WRN widening factor: 2 = official 32 filters, 8 = 128 ({TABLE})")
    g.add_argument("--num-stages", type=positive, help="WRN stages, official scales (default ceil(log2(image size)) - "
                   "2; STL-10 4)")  # fmt: skip
    g.add_argument("--bn-momentum", type=bookkeeping.momentum, help="BatchNorm running-stat momentum; 0.001 = TF's "
                   f"decay 0.999 ({TABLE})")  # fmt: skip
    g = parser.add_argument_group("fixmatch")
    g.add_argument("--confidence", type=bookkeeping.unit_interval, default=0.95, help="tau: a pseudo-label counts "
                   "where the weak view's max probability is >= tau (official)")  # fmt: skip
    g.add_argument("--lambda-u", type=rate, default=1.0, help="weight of the pseudo-label loss (wu)")
    g.add_argument("--randaugment-ops", type=nonnegative, default=2, help="RandAugment ops per strong view (official "
                   "nops)")  # fmt: skip
    g.add_argument("--randaugment-magnitude", type=positive, default=10, help="levels are drawn from 1..magnitude - 1 "
                   "(official randint(1, 10))")  # fmt: skip
    g.add_argument("--cutout", type=nonnegative, default=None, help="Cutout side in px of the strong view (default: "
                   "the official 16, half the side on images under 32 px)")  # fmt: skip
    g = parser.add_argument_group("ns3l")
    g.add_argument("--ns3l", action="store_true", help="add the NS3L loss on the unlabeled images")
    g.add_argument("--ns3l-weight", type=rate, default=1.0, help="lambda_1 (a small CPU sweep selected on validation, "
                   "docs/fixmatch_l1_sweep.md; no paper gives FixMatch values)")  # fmt: skip
    g.add_argument("--threshold", type=unit, help="T: classes whose weak-view probability is below it are negatives "
                   "(default 0.5 / num_classes, the NS3L paper's MixMatch setting)")  # fmt: skip
    g.add_argument("--ns3l-view", choices=("strong", "weak"), default="strong", help="the logits the NS3L loss is "
                   "taken on (the negatives always come from the detached weak view)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.randaugment_magnitude < 2:
        parser.error(
            f"--randaugment-magnitude must be >= 2 (levels 1..magnitude - 1), got {args.randaugment_magnitude}"
        )
    try:
        key = common.dataset_key(args.dataset)
    except common.DataError as error:
        parser.error(str(error))
    return resolve_defaults(args, key, common.DATASETS[key]["num_classes"])


def resolve_defaults(args, key, num_classes, image_size=None):
    """Every flag left unset: its data set's row of DEFAULTS, then the values that depend on other flags. Called again
    once the data are loaded (and padded), when an .npz's number of classes (and so T) and the image size (and so the
    crop padding and the number of stages) become known; a resumed run's saved arguments are all set already."""
    bookkeeping.fill_defaults(args, DEFAULTS, key)
    if args.threshold is None and num_classes:  # 0.05 for 10 classes, 0.005 for 100
        args.threshold = 0.5 / num_classes
    if image_size:
        if args.shift is None:  # the official pad of 4 at 32 px, 12 at 96 px (STL-10)
            args.shift = max(1, round(image_size / 8))
        if args.num_stages is None:  # official scales = ilog2(width) - 2, rounding up (ab_fixmatch_ra.py:130, :142)
            args.num_stages = max(1, math.ceil(math.log2(image_size)) - 2)
    return args


# ---------------------------------------------------------------------------------------------------- the algorithm
def cosine_lr(base_lr, step, total_steps):
    """Official: lr cos(7 pi k / (16 K)), k / K clipped to [0, 1]; at the end the LR is cos(7 pi / 16) = 0.195 x."""
    return base_lr * math.cos(7.0 * math.pi * min(max(step / total_steps, 0.0), 1.0) / 16.0)


def fixmatch_losses(logits_x, labels, logits_weak, logits_strong, confidence):
    """Labeled cross-entropy and the masked pseudo-label loss: cross-entropy of the strong logits to the argmax of the
    detached weak softmax, times mask (max probability >= confidence), averaged over every unlabeled row."""
    loss_xe = F.cross_entropy(logits_x.float(), labels)
    probs_weak = torch.softmax(logits_weak.detach().float(), dim=1)
    max_prob, pseudo_labels = probs_weak.max(dim=1)
    mask = (max_prob >= confidence).float()
    loss_xeu = (F.cross_entropy(logits_strong.float(), pseudo_labels, reduction="none") * mask).mean()
    return loss_xe, loss_xeu, probs_weak, pseudo_labels, mask


def ns3l_negatives(probs_weak, threshold):
    """Negative labels of each unlabeled image: the classes whose weak-view probability is below ``threshold``."""
    return probs_weak < threshold


def ns3l_loss(logits, negatives):
    """Mean over rows of -log(1 - sum_{k in negatives} p_k), in the stable form logsumexp(non-negative logits) -
    logsumexp(all logits), clamped at 1e-8 like the authors' released ns3l.py."""
    logits = logits.float()
    log_keep = torch.logsumexp(logits.masked_fill(negatives, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)
    return -log_keep.clamp_min(math.log(1e-8)).mean()


def hidden_label_stats(y_hidden, pseudo_labels, mask, negatives=None):
    """Diagnostics from the hidden labels of the unlabeled batch, which never enter a loss (-1 = no label, skipped):
    the mask rate, the accuracy of the masked pseudo-labels and of all of them; NS3L's negatives per image and the rate
    at which an image's true class was among its negatives. Returns {tag: device scalar}."""
    known = y_hidden >= 0
    confident = mask.bool() & known
    correct = pseudo_labels == y_hidden
    stats = {
        "charts/mask_rate": mask.mean(),
        "charts/pseudo_label_accuracy": (correct & confident).sum() / confident.sum().clamp_min(1),
        "charts/pseudo_label_accuracy_all": (correct & known).sum() / known.sum().clamp_min(1),
    }
    if negatives is not None:
        hit = negatives.gather(1, y_hidden.clamp_min(0)[:, None]).squeeze(1) & known
        stats["charts/ns3l_negatives_per_sample"] = negatives.sum(1).float().mean()
        stats["charts/ns3l_false_negative_rate"] = hit.sum() / known.sum().clamp_min(1)
    return stats


def optimizer_groups(model, weight_decay):
    """The official L2 term wd x sum 1/2 ||w||^2 over 'kernel' variables (ab_fixmatch_ra.py:107) has the gradient
    wd x w on conv and dense weights only: SGD's weight_decay on that group, none on biases and BN."""
    kernels = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ids = {id(p) for p in kernels}
    others = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": kernels, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update_(ema_model, model, decay):
    """tf.train.ExponentialMovingAverage over the trainable variables, run after the update: e <- decay e + (1 - decay)
    p. BN running statistics are not averaged; the EMA model reads the live ones (official getter_ema)."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - decay)
    torch._foreach_copy_(list(ema_model.buffers()), list(model.buffers()))


def grid_test_errors(evaluations, eval_every, total_steps):
    """The errors (test, or validation) that enter the median of the last --median-of, in order: evaluations on the
    --eval-every grid plus the one at the end of the run (a run extended with --resume drops its old off-grid final
    evaluation)."""
    return [error for step, error in evaluations if step % eval_every == 0 or step == total_steps]


def make_model(num_classes, args, channels):
    """Official ResNet classifier (libml/models.py:62-98): the WRN of wrn.py with conv biases."""
    return wrn.WideResNet(
        num_classes,
        args.depth,
        args.width,
        channels,
        num_stages=args.num_stages,
        conv_bias=True,
        bn_momentum=args.bn_momentum,
    )


def main():
    args = parse_args()
    checkpoint = None
    if args.resume:
        checkpoint = bookkeeping.load_checkpoint(args.resume, SCRIPT)
        stop_at = args.stop_at  # a leg's own stop, never the saved one
        overrides = ("total_steps", "cuda", "compile", "stop_at")
        args = bookkeeping.resume_args(args, checkpoint, sys.argv[1:], overrides, legacy=False)
        args.stop_at = stop_at
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    amp, memory_format = bookkeeping.precision(args, device)  # bf16 autocast on CUDA; the faster format (channels_last)
    bookkeeping.seed_everything(args.seed, args.torch_deterministic)

    # Data: every failure here is one line and happens before anything is written.
    try:
        data = common.load_dataset(args.dataset, args.data_dir, args.download, device)
        args = resolve_defaults(args, data.name, data.num_classes)  # an .npz's classes: T
        if args.pad_to:
            data.x_train, data.x_test = (common.pad_images(x, args.pad_to) for x in (data.x_train, data.x_test))
        common.require_image_size(data, 3, "RandAugment's 3x3 sharpness filter (unpadded)")  # after --pad-to
        args = resolve_defaults(args, data.name, data.num_classes, data.image_size)  # the padded size: shift, stages
        split = common.make_ssl_split(
            data.y_train,
            data.num_classes,
            args.num_labeled,
            args.num_valid,
            args.seed,
            data.num_labelable,
            include_labeled=not args.exclude_labeled,
        )
    except common.DataError as error:
        bookkeeping.fail(str(error))
    flip, shift = common.DATASETS[data.name]["flip"], args.shift  # CIFAR / STL-10 / F-MNIST flip, SVHN / digits do not
    if shift >= data.image_size:
        bookkeeping.fail(f"--shift {shift} must be smaller than the image size {data.image_size} (reflect padding)")
    cutout = min(16, data.image_size // 2) if args.cutout is None else args.cutout  # official 16 px at any size
    if cutout > data.image_size:
        bookkeeping.fail(f"--cutout {cutout} must be at most the image size {data.image_size}")
    bookkeeping.warn_bn_momentum(args.bn_momentum, args.total_steps)
    normalize = common.Normalizer("scale")  # official: x * 2 / 255 - 1, no whitening

    model = make_model(data.num_classes, args, data.channels).to(device, memory_format=memory_format)
    ema_model = copy.deepcopy(model).requires_grad_(False)  # TF EMA shadows start at the initial values
    optimizer = torch.optim.SGD(
        optimizer_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True
    )  # MomentumOptimizer(lr, 0.9, use_nesterov=True): the same update as PyTorch's (no dampening)
    labeled_batches = common.BatchSampler(split.labeled.to(device), args.batch_size)
    unlabeled_batches = common.BatchSampler(split.unlabeled.to(device), args.batch_size * args.uratio)
    start_step, best_valid, test_at_best, evaluations = 0, float("inf"), float("nan"), []
    valid_evaluations = []  # (step, EMA validation error): the median_valid_error that selects settings
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
            evaluations = [tuple(e) for e in checkpoint["evaluations"]]
            valid_evaluations = [tuple(e) for e in checkpoint.get("valid_evaluations", [])]  # absent in older runs
            print(f"resumed {args.resume} at step {start_step}")
    end = min(args.total_steps, args.stop_at or args.total_steps)
    if end <= start_step:
        bookkeeping.fail(f"--stop-at {args.stop_at} must be after the checkpoint's step {start_step}")
    run_dir, writer = bookkeeping.open_run(args, SCRIPT, split, checkpoint)  # made (or reopened) only now

    def weak(indices):  # uint8 on the device: flip / pad-and-crop, a fresh draw per image
        return common.augment(data.x_train[indices], flip, shift)

    def strong(indices):  # its own weak draw, then RandAugment + Cutout per image (--augment d.d.rac)
        return common.rand_augment(
            weak(indices), args.randaugment_ops, args.randaugment_magnitude, probability=0.5, cutout=cutout
        )

    sums = {}  # running sums of logged scalars, kept on the device so the loop never waits for the GPU

    def accumulate(name, value):
        sums[name] = sums.get(name, 0.0) + value.detach().float()

    valid_error = test_error = raw_test_error = float("nan")
    net = bookkeeping.compile_model(model, args, device)  # the training pass; evaluation and checkpoints use model
    model.train()
    last_log_step = start_step
    clock.start()
    for step in range(start_step, end):
        # ALGO LOGIC: one pass over [labeled; weak; strong], pseudo-labels from the weak view, SGD, EMA
        labeled_idx, unlabeled_idx = next(labeled_batches), next(unlabeled_batches)
        images = torch.cat([weak(labeled_idx), weak(unlabeled_idx), strong(unlabeled_idx)])
        with amp:
            logits = net(normalize(images).contiguous(memory_format=memory_format)).float()
        n, u = len(labeled_idx), len(unlabeled_idx)
        logits_x, logits_weak, logits_strong = logits[:n], logits[n : n + u], logits[n + u :]
        loss_xe, loss_xeu, probs_weak, pseudo_labels, mask = fixmatch_losses(
            logits_x, data.y_train[labeled_idx], logits_weak, logits_strong, args.confidence
        )
        loss = loss_xe + args.lambda_u * loss_xeu
        negatives = None
        if args.ns3l:  # negatives from the detached weak view, the loss on the strong (or weak) logits
            negatives = ns3l_negatives(probs_weak, args.threshold)
            loss_ns3l = ns3l_loss(logits_strong if args.ns3l_view == "strong" else logits_weak, negatives)
            loss = loss + args.ns3l_weight * loss_ns3l
            accumulate("losses/ns3l", loss_ns3l)
        lr = cosine_lr(args.lr, step, args.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step(compiled=net is not model)  # a compiled leg's first step compiles: timed apart
        ema_update_(ema_model, model, args.ema_decay)
        accumulate("losses/xe", loss_xe)
        accumulate("losses/xeu", loss_xeu)
        accumulate("losses/total", loss)
        for name, value in hidden_label_stats(data.y_train[unlabeled_idx], pseudo_labels, mask, negatives).items():
            accumulate(name, value)  # hidden labels: diagnostics only, never in a loss

        done = step + 1
        # LOGGING: means since the last log; SPS over training time only
        if done % args.log_every == 0 or done == end:
            sps = clock.lap()
            means = bookkeeping.interval_means(sums, done - last_log_step)
            bookkeeping.write_scalars(writer, done, means | {"charts/learning_rate": lr, "charts/SPS": sps})
            print(
                bookkeeping.progress_line(
                    done, args.total_steps, sps, loss=means["losses/total"], mask=means["charts/mask_rate"]
                ),
                flush=True,
            )
            sums, last_log_step = {}, done
        # EVAL: the EMA model (official classify_op); reported: the median of the last --median-of test errors
        if done % args.eval_every == 0 or done == end:  # an evaluation and a checkpoint at a --stop-at too
            clock.pause()
            valid_x, valid_y = data.x_train[split.valid.to(device)], data.y_train[split.valid.to(device)]
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
            valid_evaluations.append((done, valid_error))
            test_errors = grid_test_errors(evaluations, args.eval_every, args.total_steps)
            median = statistics.median(test_errors[-args.median_of :])
            if valid_error < best_valid and (done % args.eval_every == 0 or done == args.total_steps):  # on the grid
                best_valid, test_at_best = valid_error, test_error
            bookkeeping.write_scalars(
                writer,
                done,
                {
                    "eval/valid_error": valid_error,
                    "eval/test_error": test_error,
                    "eval/test_error_raw": raw_test_error,
                    "eval/test_error_at_best_valid": test_at_best,
                    "eval/median_test_error": median,
                },
            )
            print(
                f"eval step {done}: EMA valid error {valid_error:.2f}% test error {test_error:.2f}% (raw model "
                f"{raw_test_error:.2f}%), median of last {min(args.median_of, len(test_errors))}: {median:.2f}%",
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
                valid_evaluations=valid_evaluations,
            )
            clock.start()

    if end < args.total_steps:  # stopped early: no summary.json, the run is not finished
        writer.close()
        print(
            f"stopped at step {end} of {args.total_steps}; continue with: python train_fixmatch.py --resume {run_dir}"
        )
        return
    test_errors = grid_test_errors(evaluations, args.eval_every, args.total_steps)
    median = statistics.median(test_errors[-args.median_of :]) if test_errors else float("nan")
    valid_errors = grid_test_errors(valid_evaluations, args.eval_every, args.total_steps)[-args.median_of :]
    if len(valid_errors) < len(test_errors[-args.median_of :]):  # resumed from a checkpoint that kept no validation
        valid_errors = []  # errors: no median over fewer evaluations than the test median's
    summary = bookkeeping.write_summary(
        writer,
        run_dir,
        {
            "steps": args.total_steps,
            **clock.summary(),
            "median_test_error": median,
            "median_of": args.median_of,
            "median_valid_error": statistics.median(valid_errors) if valid_errors else float("nan"),
            "final_valid_error": valid_error,
            "final_test_error": test_error,
            "final_test_error_raw": raw_test_error,
            "best_valid_error": best_valid if best_valid != float("inf") else float("nan"),
            "test_error_at_best_valid": test_at_best,
        },
        args,
        reported=("median_test_error",),
    )
    print(
        f"done: {args.total_steps - start_step} steps, median of the last {args.median_of} EMA test errors "
        f"{median:.2f}% (final {test_error:.2f}%), {summary['steps_per_second'] or 0:.1f} steps/s -> {run_dir}"
    )


if __name__ == "__main__":
    main()
