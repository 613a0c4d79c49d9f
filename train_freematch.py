"""FreeMatch and FreeMatch + NS3L (Protocol B), as USB (microsoft/Semi-supervised-learning) runs FreeMatch.

FreeMatch: Wang et al., "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning" (ICLR 2023); its
published classic-CV numbers come from USB's implementation (semilearn/algorithms/freematch/) and configurations
(config/classic_cv/freematch/). FreeMatch + NS3L is beyond both papers: the NS3L loss of Chen et al., "Negative
Sampling in Semi-Supervised Learning" (ICML 2020) section 3, added as in train_fixmatch.py: the negatives of an
unlabeled image are the classes whose probability under the (detached) weak-view prediction is below T = 0.5 /
num_classes, and -log(1 - sum of their probabilities) is taken on the strong view's logits.

    python train_freematch.py --dataset cifar10 --num-labeled 40          # USB's run: 2^20 steps of 64 + 448
    python train_freematch.py --dataset cifar10 --num-labeled 40 --ns3l
    python train_freematch.py --dataset digits --ns3l     # a CPU run of a few minutes (digits defaults, --help)

Point by point against USB at 1ef4cbe (semilearn/algorithms/freematch/{freematch,utils}.py, semilearn/core/*,
semilearn/datasets/cv_datasets/*.py, semilearn/datasets/augmentation/randaugment.py, config/classic_cv/freematch/*;
lines in docs/fidelity.md):
 1. Batches: 64 labeled + uratio 7 x 64 unlabeled, each unlabeled image seen as a weak and a strong view; the labeled
    images are in the unlabeled stream (include_lb_to_ulb); no validation images (USB evaluates on the test set).
 2. Weak view: reflect-pad by int(size x (1 - crop_ratio 0.875)) = 4 at 32 px (12 at 96) and crop, horizontal flip
    on every USB data set (SVHN too). Inputs: /255, then each data set's mean / std (cifar.py, svhn.py, stl10.py).
 3. Strong view: its own weak draw, then USB's RandAugment(3, 5): 3 ops with replacement, every one applied at a
    magnitude drawn uniformly in its range, then Cutout of a side uniform in [0, 0.5] x the side, grey (125, 123, 114)
    (common.usb_rand_augment, batched on the device). --strong-augment fixmatch gives FixMatch's official RA instead.
 4. USB's WRN-28-2 (semilearn/nets/wrn/wrn.py: BN momentum 0.001 and eps 1e-5, leaky ReLU 0.1, a biased first
    convolution, the raw input into conv1 where a stage's width changes): wrn.py's layout="usb", checked against a
    transcription. STL-10 wrn_var_37_2 (4 stages, the first of stride 2); CIFAR-100 also WRN-28-2, weight decay 1e-3
    (the configurations). SVHN is train + extra, the labels drawn from both (svhn.py).
 5. One forward pass of [labeled; weak; strong] in training mode (use_cat: True).
 6. Self-adaptive thresholds (FreeMatchThresholingHook, utils.py): from the detached weak softmax p of the batch,
    time_p <- m time_p + (1 - m) mean(max p), p_model <- m p_model + (1 - m) mean(p), label_hist <- m label_hist
    + (1 - m) histogram(argmax p), m = ema_p 0.999, all starting uniform (1 / C); then mask = max p >=
    time_p x p_model[argmax p] / max(p_model). SVHN clips time_p to at most 0.95 (clip_thresh).
 7. Loss: cross-entropy on the labeled rows + lambda_u (1) x mean over the unlabeled rows of mask x cross-entropy of
    the strong logits to argmax p, + lambda_f (ent_loss_ratio, 0.001 in every classic configuration) x the
    self-adaptive fairness term sum_c SumNorm(p_model / label_hist)_c log SumNorm(pbar / hbar)_c, with pbar and hbar
    the mean probability and the histogram of argmax of the strong view over the masked rows (entropy_loss; 0 when
    no row is masked). Weight decay 5e-4 on conv and dense weights only (bias and BN skipped, nets/utils.py).
 8. SGD Nesterov 0.9, LR 0.03 x cos(7 pi k / 16 K); an EMA (0.999) of the parameters after each update, buffers
    copied (core/utils/misc.py EMA). Evaluation of the EMA model every 5,120 steps and at the end; USB reports the
    best test accuracy over the evaluations (core/hooks/evaluation.py), so the reported number here is
    best_test_error; summary.json also holds the median of the last 20 and, with --num-valid, the median
    validation error to select settings on. Length 2^20 steps.
--ns3l: loss + lambda_1 x mean over the unlabeled rows of -log(1 - sum_{k: p_weak,k < T} p_strong,k), every row (no
mask), T = 0.5 / num_classes; --ns3l-threshold class-adaptive uses T_k = T x C x p_model_k instead (FreeMatch's
class-wise mean probability: T at the uniform start, lower for a class the model rarely predicts).
Where this port differs: the labeled subset is a class-balanced draw by seed as USB's split_ssl_data, but not the
same draw, and STL-10's labeled images are in its unlabeled set once where USB adds them a second time; epochs are
full permutations drawn by seed (USB's sampler reshuffles by epoch number and cuts its epochs at 1,024 steps); the
colour ops floor where PIL rounds (within one grey level); on CUDA the training pass runs under bf16 autocast and
torch.compile (USB: fp32, amp off; --no-bf16 restores fp32, and the recipe's --fp32 passes it); evaluation is always
exact fp32. A --stop-at between evaluations only saves a checkpoint, so the legs evaluate as one run.
"""

import argparse
import copy
import math
import statistics
import sys

import torch
import torch.nn.functional as F

import bookkeeping
import common
import wrn

SCRIPT = "train_freematch"
# ------------------------------------------------------------------------------------------- defaults per data set
# One row per --dataset: a flag left unset takes its row's value in resolve_defaults(). USB's classic-CV FreeMatch
# configurations (config/classic_cv/freematch/freematch_<data>_<labels>_0.yaml): 2^20 steps, an evaluation per 5,120,
# batch 64, uratio 7, lr 0.03, wd 5e-4 (CIFAR-100 1e-3), EMA 0.999, ema_p 0.999, ent_loss_ratio 0.001, wrn_28_2
# (STL-10 wrn_var_37_2), SVHN clip_thresh True. Labels: each data set's smallest configuration (CIFAR-10 40, the
# number the issue asks about). No validation set: USB evaluates on the test set. digits and synthetic get a CPU run
# (this project's choice, as train_fixmatch.py's): WRN-10-2, batch 32 + 7 x 32, BN momentum 0.02, EMA 0.99, digits
# 2,000 steps with an evaluation every 20, 200 validation images.
# fmt: off
PAPER = dict(num_labeled=40, num_valid=0, total_steps=1 << 20, eval_every=5120, batch_size=64, depth=28, width=2,
             weight_decay=5e-4, bn_momentum=0.001, ema_decay=0.999, pad_to=0, clip_threshold=False, svhn_extra=False,
             first_stride=1)
CPU = dict(total_steps=1000, eval_every=10, batch_size=32, depth=10, bn_momentum=0.02, ema_decay=0.99)
DEFAULTS = {
    "cifar10": PAPER,
    "cifar100": PAPER | dict(num_labeled=400, weight_decay=1e-3),
    "svhn": PAPER | dict(clip_threshold=True, svhn_extra=True),
    "stl10": PAPER | dict(num_stages=4, first_stride=2),
    "fashion_mnist": PAPER | dict(pad_to=32),
    "mnist": PAPER | dict(pad_to=32),
    "npz": PAPER,
    "digits": PAPER | CPU | dict(num_labeled=100, num_valid=200, total_steps=2000, eval_every=20),
    "synthetic": PAPER | CPU | dict(num_labeled=40, num_valid=50),
}
SOURCES = {"cifar10, cifar100, svhn, stl10": "USB's classic-CV FreeMatch configurations "
                                             "(config/classic_cv/freematch/*.yaml; docs/fidelity.md)",
           "fashion_mnist, mnist, npz": "the same schedule; Fashion-MNIST and MNIST padded to 32 px as "
                                        "train_fixmatch.py does (USB has no such configuration)",
           "digits, synthetic": "a CPU run, this project's choice (train_fixmatch.py's)",
           "every data set": "uratio 7, lambda_u 1, lambda_f 0.001, ema_p 0.999, SGD Nesterov 0.9, LR 0.03 with "
                             "cosine decay; NS3L: T = 0.5 / classes, lambda_1 1"}
# USB's input normalisation: /255, then (x - mean) / std per channel (cifar.py:16-21, svhn.py:15-17, stl10.py:16-18;
# CIFAR-10 uses ImageNet's values there). Other data sets: 0.5 / 0.5, i.e. [-1, 1].
MEAN_STD = {
    "cifar10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": (tuple(x / 255 for x in (129.3, 124.1, 112.4)), tuple(x / 255 for x in (68.2, 65.4, 70.4))),
    "svhn": ((0.4380, 0.4440, 0.4730), (0.1751, 0.1771, 0.1744)),
    "stl10": (tuple(x / 255 for x in (112.4, 109.1, 98.6)), tuple(x / 255 for x in (68.4, 66.6, 68.5))),
}
USB_DATA = ("cifar10", "cifar100", "svhn", "stl10")  # USB flips every one of them (SVHN too)
# fmt: on
TABLE = "per --dataset, see the table below"


def parse_args(argv=None):
    parser = bookkeeping.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=bookkeeping.defaults_epilog(DEFAULTS, SOURCES)
    )
    positive, nonnegative = bookkeeping.positive_int, bookkeeping.nonnegative_int
    rate = bookkeeping.nonnegative_float
    g = parser.add_argument_group("experiment")
    bookkeeping.add_run_args(g)  # --seed, --runs-dir, --run-name, --resume, --track
    g.add_argument(
        "--stop-at", type=positive, default=None, metavar="STEP", help="leave after STEP steps with a checkpoint "
        "(a job's time limit) and continue later with --resume; the legs equal one uninterrupted run"
    )  # fmt: skip
    bookkeeping.add_device_args(g)
    g.add_argument("--eval-every", type=positive, help=f"steps between evaluations, USB 5,120 ({TABLE})")
    g.add_argument("--median-of", type=positive, default=20, help="the median of this many last evaluations")
    g.add_argument(
        "--reported", choices=("best_test_error", "median_test_error"), default="best_test_error", help="the number "
        "summary.json reports: USB's best test error over the evaluations (chosen on the test set, as USB's tables), "
        "or the median of the last --median-of (FixMatch's rule; the laptop suite compares with it)"
    )  # fmt: skip
    g.add_argument("--log-every", type=positive, default=100, help="steps between logged scalars")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help=f"{', '.join(common.DATASET_NAMES)} or an .npz path")
    g.add_argument("--data-dir", default="data", help="torchvision data root")
    g.add_argument("--download", action="store_true", help="let torchvision download the data set")
    g.add_argument("--num-labeled", type=positive, help=f"labeled images ({TABLE})")
    g.add_argument("--num-valid", type=nonnegative, help=f"validation images; USB holds out none ({TABLE})")
    g.add_argument("--exclude-labeled", action="store_true", help="keep the labeled images out of the unlabeled stream")
    g.add_argument("--shift", type=nonnegative, help="crop padding in px of the weak view (default size / 8: USB's 4)")
    g.add_argument("--pad-to", type=nonnegative, help=f"pad smaller images with black to this size first ({TABLE})")
    g.add_argument(
        "--svhn-extra", action=argparse.BooleanOptionalAction, default=None, help="SVHN: train + the 531k extra "
        f"images, labels drawn from both, as USB's svhn.py ({TABLE})"
    )  # fmt: skip
    g.add_argument(
        "--strong-augment", choices=("usb", "fixmatch"), default="usb", help="usb: USB's RandAugment(3, 5) + random "
        "Cutout (FreeMatch's published runs); fixmatch: FixMatch's official RA (2 ops at p 0.5, Cutout 16)"
    )  # fmt: skip
    g.add_argument("--randaugment-ops", type=nonnegative, help="ops per strong view (default: usb 3, fixmatch 2)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--total-steps", type=positive, help=f"training steps; USB 2^20 ({TABLE})")
    g.add_argument("--batch-size", type=positive, help=f"labeled images per step, USB 64 ({TABLE})")
    g.add_argument("--uratio", type=positive, default=7, help="unlabeled images per step = uratio x --batch-size")
    g.add_argument("--lr", type=bookkeeping.positive_float, default=0.03, help="SGD LR before the cosine decay")
    g.add_argument("--weight-decay", type=rate, help=f"on conv and dense weights only ({TABLE})")
    g.add_argument("--ema-decay", type=bookkeeping.ema_decay, help=f"EMA of the weights, evaluated ({TABLE})")
    g.add_argument("--depth", type=bookkeeping.wrn_depth, help=f"WRN depth, 6n + 4 ({TABLE})")
    g.add_argument("--width", type=positive, help=f"WRN widening factor, USB wrn_28_2: 2 ({TABLE})")
    g.add_argument("--num-stages", type=positive, help="WRN stages (default ceil(log2(image size)) - 2; STL-10 4)")
    g.add_argument(
        "--first-stride", type=positive, help=f"stride of the first stage (STL-10 2: wrn_var_37_2) ({TABLE})"
    )
    g.add_argument("--bn-momentum", type=bookkeeping.momentum, help=f"BatchNorm running-stat momentum ({TABLE})")
    g = parser.add_argument_group("freematch")
    g.add_argument("--lambda-u", type=rate, default=1.0, help="weight of the pseudo-label loss (ulb_loss_ratio)")
    g.add_argument("--fairness-weight", type=rate, default=0.001, help="lambda_f (ent_loss_ratio in the configs)")
    g.add_argument("--ema-p", type=bookkeeping.ema_decay, default=0.999, help="momentum of the threshold EMAs")
    g.add_argument(
        "--clip-threshold", action=argparse.BooleanOptionalAction, default=None,
        help=f"clip the global threshold at 0.95 (USB's clip_thresh: SVHN) ({TABLE})"
    )  # fmt: skip
    g = parser.add_argument_group("ns3l")
    g.add_argument("--ns3l", action="store_true", help="add the NS3L loss on the unlabeled images")
    g.add_argument("--ns3l-weight", type=rate, default=1.0, help="lambda_1")
    g.add_argument("--threshold", type=bookkeeping.open_unit, help="T: negatives below it (default 0.5 / classes)")
    g.add_argument(
        "--ns3l-threshold", choices=("fixed", "class-adaptive"), default="fixed", help="fixed: T for every class; "
        "class-adaptive: T x classes x p_model_k, FreeMatch's class-wise mean probability"
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        key = common.dataset_key(args.dataset)
    except common.DataError as error:
        parser.error(str(error))
    return resolve_defaults(args, key, common.DATASETS[key]["num_classes"])


def resolve_defaults(args, key, num_classes, image_size=None):
    """Every flag left unset: its data set's row of DEFAULTS, then the values that depend on other flags (T on the
    number of classes; the crop padding and the number of stages on the image size, known once the data are loaded)."""
    bookkeeping.fill_defaults(args, DEFAULTS, key)
    if args.randaugment_ops is None:
        args.randaugment_ops = 3 if args.strong_augment == "usb" else 2
    if args.threshold is None and num_classes:
        args.threshold = 0.5 / num_classes
    if image_size:
        if args.shift is None:  # USB: int(32 x (1 - 0.875)) = 4, int(96 x 0.125) = 12
            args.shift = max(1, int(image_size * 0.125))
        if args.num_stages is None:
            args.num_stages = max(1, math.ceil(math.log2(image_size)) - 2)
    return args


# ---------------------------------------------------------------------------------------------------- the algorithm
def cosine_lr(base_lr, step, total_steps):
    """USB's get_cosine_schedule_with_warmup (no warmup): lr cos(7 pi k / (16 K))."""
    return base_lr * math.cos(7.0 * math.pi * min(max(step / total_steps, 0.0), 1.0) / 16.0)


def initial_thresholds(num_classes, device):
    """FreeMatchThresholingHook.__init__: p_model and label_hist uniform, time_p their mean (1 / C)."""
    uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
    return {"time_p": uniform.mean(), "p_model": uniform.clone(), "label_hist": uniform.clone()}


@torch.no_grad()
def update_thresholds(state, probs_weak, momentum, clip=False):
    """Self-adaptive thresholding's EMAs (FreeMatchThresholingHook.update): the global time_p of the mean maximum
    probability, the class-wise p_model of the mean probability vector, the histogram label_hist of argmax p."""
    max_probs, max_idx = probs_weak.max(dim=1)
    time_p = state["time_p"] * momentum + (1 - momentum) * max_probs.mean()
    if clip:  # clip_thresh: at most 0.95
        time_p = time_p.clamp(0.0, 0.95)
    p_model = state["p_model"] * momentum + (1 - momentum) * probs_weak.mean(dim=0)
    hist = torch.bincount(max_idx, minlength=len(p_model)).to(p_model.dtype)
    label_hist = state["label_hist"] * momentum + (1 - momentum) * hist / hist.sum()
    return {"time_p": time_p, "p_model": p_model, "label_hist": label_hist}


def local_thresholds(state):
    """The class-wise thresholds time_p x MaxNorm(p_model)."""
    return state["time_p"] * state["p_model"] / state["p_model"].max()


def freematch_mask(probs_weak, state):
    """A pseudo-label counts where its max probability reaches its class's local threshold (masking, utils.py)."""
    max_probs, max_idx = probs_weak.max(dim=1)
    return (max_probs >= local_thresholds(state)[max_idx]).float()


def fairness_loss(mask, logits_strong, p_model, label_hist):
    """USB's entropy_loss (freematch.py:16-44): sum_c SumNorm(p_model / label_hist)_c log SumNorm(pbar / hbar)_c, pbar
    the mean softmax and hbar the normalised histogram of argmax of the strong logits over the masked rows (a class
    with an empty bin gets a scale of 0, replace_inf_to_zero). Weighted sums instead of indexing the masked rows, so
    the step never waits for the device; 0 when no row is masked, as the original's mask.sum() > 0 test."""
    probs = torch.softmax(logits_strong.float(), dim=1)
    count = mask.sum()
    hist_s = (F.one_hot(probs.argmax(dim=1), probs.shape[1]).float() * mask[:, None]).sum(0) / count.clamp_min(1)
    scale_model = torch.where(label_hist > 0, 1.0 / label_hist, torch.zeros_like(label_hist))
    mod_prob_model = p_model * scale_model
    mod_prob_model = mod_prob_model / mod_prob_model.sum()
    mean_prob = (probs * mask[:, None]).sum(0) / count.clamp_min(1)
    mod_mean_prob = mean_prob * torch.where(hist_s > 0, 1.0 / hist_s.clamp_min(1e-12), torch.zeros_like(hist_s))
    mod_mean_prob = mod_mean_prob / mod_mean_prob.sum().clamp_min(1e-12)
    loss = (mod_prob_model * torch.log(mod_mean_prob + 1e-12)).sum()
    return torch.where(count > 0, loss, torch.zeros_like(loss))


def freematch_losses(logits_x, labels, logits_weak, logits_strong, state, momentum, clip):
    """One step's thresholds (updated with this batch first, as the hook does), mask, labeled cross-entropy, masked
    pseudo-label loss (mean over every unlabeled row) and fairness term."""
    loss_xe = F.cross_entropy(logits_x.float(), labels)
    probs_weak = torch.softmax(logits_weak.detach().float(), dim=1)
    state = update_thresholds(state, probs_weak, momentum, clip)
    mask = freematch_mask(probs_weak, state)
    pseudo_labels = probs_weak.argmax(dim=1)
    loss_xeu = (F.cross_entropy(logits_strong.float(), pseudo_labels, reduction="none") * mask).mean()
    loss_fair = fairness_loss(mask, logits_strong, state["p_model"], state["label_hist"])
    return loss_xe, loss_xeu, loss_fair, probs_weak, pseudo_labels, mask, state


def ns3l_negatives(probs_weak, threshold, state=None):
    """Negative labels of each unlabeled image: the classes whose weak-view probability is below ``threshold``, or,
    given FreeMatch's ``state`` (class-adaptive), below threshold x classes x p_model_k."""
    if state is not None:
        threshold = threshold * probs_weak.shape[1] * state["p_model"]
    return probs_weak < threshold


def ns3l_loss(logits, negatives):
    """Mean over rows of -log(1 - sum_{k in negatives} p_k), in the stable form logsumexp(non-negative logits) -
    logsumexp(all logits), clamped at 1e-8 like the authors' released ns3l.py."""
    logits = logits.float()
    log_keep = torch.logsumexp(logits.masked_fill(negatives, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)
    return -log_keep.clamp_min(math.log(1e-8)).mean()


def diagnostics(state, y_hidden, pseudo_labels, mask, negatives=None):
    """The thresholds, and what the hidden labels of the unlabeled batch say (-1 = no label, skipped; never in a
    loss): mask rate, accuracy of the masked pseudo-labels and of all, NS3L's negatives per image and false-negative
    rate. Returns {tag: device scalar}."""
    local = local_thresholds(state)
    known = y_hidden >= 0
    confident = mask.bool() & known
    correct = pseudo_labels == y_hidden
    stats = {
        "charts/global_threshold": state["time_p"],
        "charts/local_threshold_min": local.min(),
        "charts/local_threshold_max": local.max(),
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
    """USB's param_groups_weight_decay (nets/utils.py): weight decay on parameters of more than one dimension that
    are not biases (conv and dense weights), none on biases and BN."""
    decay = [p for name, p in model.named_parameters() if p.ndim > 1 and not name.endswith(".bias")]
    ids = {id(p) for p in decay}
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0},
    ]


@torch.no_grad()
def ema_update_(ema_model, model, decay):
    """USB's EMA.update (core/utils/misc.py): shadow <- decay shadow + (1 - decay) param, the buffers copied."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - decay)
    torch._foreach_copy_(list(ema_model.buffers()), list(model.buffers()))


class MeanStd:
    """uint8 -> (x / 255 - mean) / std per channel (torchvision's ToTensor + Normalize)."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x):
        return (x.float() / 255.0 - self.mean) / self.std


def input_normalizer(name, channels, device):
    """USB's normalisation of data set ``name`` (MEAN_STD), 0.5 / 0.5 per channel for the others."""
    mean, std = MEAN_STD.get(name, ((0.5,) * channels, (0.5,) * channels))
    return MeanStd(mean, std, device)


def make_model(num_classes, args, channels):
    """USB's wrn_28_2 (nets/wrn/wrn.py), or wrn_var_37_2 for STL-10 (wrn_var.py: 4 stages, the first of stride 2):
    wrn.py's WRN in USB's layout."""
    return wrn.WideResNet(
        num_classes,
        args.depth,
        args.width,
        channels,
        num_stages=args.num_stages,
        bn_momentum=args.bn_momentum,
        layout="usb",
        first_stride=args.first_stride,
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
    amp, memory_format = bookkeeping.precision(args, device)
    bookkeeping.seed_everything(args.seed, args.torch_deterministic)

    # Data: every failure here is one line and happens before anything is written.
    try:
        extra = bool(args.svhn_extra) and common.dataset_key(args.dataset) == "svhn"
        data = common.load_dataset(args.dataset, args.data_dir, args.download, device, extra)
        if extra:  # USB's svhn.py:80-93: train + extra, and the labeled images drawn from both
            data.num_labelable = len(data.x_train)
        args = resolve_defaults(args, data.name, data.num_classes)
        if args.pad_to:
            data.x_train, data.x_test = (common.pad_images(x, args.pad_to) for x in (data.x_train, data.x_test))
        common.require_image_size(data, 3, "RandAugment's 3x3 sharpness filter (unpadded)")
        args = resolve_defaults(args, data.name, data.num_classes, data.image_size)
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
    flip = data.name in USB_DATA or common.DATASETS[data.name]["flip"]
    if args.shift >= data.image_size:
        bookkeeping.fail(f"--shift {args.shift} must be smaller than the image size {data.image_size}")
    bookkeeping.warn_bn_momentum(args.bn_momentum, args.total_steps)
    normalize = input_normalizer(data.name, data.channels, device)

    model = make_model(data.num_classes, args, data.channels).to(device, memory_format=memory_format)
    ema_model = copy.deepcopy(model).requires_grad_(False)  # USB's EMA starts at the initial weights
    optimizer = torch.optim.SGD(optimizer_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    labeled_batches = common.BatchSampler(split.labeled.to(device), args.batch_size)
    unlabeled_batches = common.BatchSampler(split.unlabeled.to(device), args.batch_size * args.uratio)
    state = initial_thresholds(data.num_classes, device)
    start_step, best_test, evaluations, valid_evaluations = 0, float("inf"), [], []
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
            state = {k: checkpoint["thresholds"][k].to(device) for k in ("time_p", "p_model", "label_hist")}
            if state["p_model"].shape != (data.num_classes,):
                raise KeyError("thresholds")
            start_step, best_test = checkpoint["step"], checkpoint["best_test"]
            evaluations = [tuple(e) for e in checkpoint["evaluations"]]
            valid_evaluations = [tuple(e) for e in checkpoint["valid_evaluations"]]
            print(f"resumed {args.resume} at step {start_step}")
    end = min(args.total_steps, args.stop_at or args.total_steps)
    if end <= start_step:
        bookkeeping.fail(f"--stop-at {args.stop_at} must be after the checkpoint's step {start_step}")
    run_dir, writer = bookkeeping.open_run(args, SCRIPT, split, checkpoint)  # made (or reopened) only now

    def weak(indices):  # uint8 on the device: flip / reflect-pad-and-crop, a fresh draw per image
        return common.augment(data.x_train[indices], flip, args.shift)

    def strong(indices):  # its own weak draw, then USB's RandAugment + Cutout (or FixMatch's RA)
        if args.strong_augment == "usb":
            return common.usb_rand_augment(weak(indices), args.randaugment_ops)
        cutout = min(16, data.image_size // 2)
        return common.rand_augment(weak(indices), args.randaugment_ops, 10, probability=0.5, cutout=cutout)

    sums = {}  # running sums of logged scalars, kept on the device so the loop never waits for the GPU

    def accumulate(name, value):
        sums[name] = sums.get(name, 0.0) + value.detach().float()

    valid_error = test_error = float("nan")
    net = bookkeeping.compile_model(model, args, device)
    model.train()
    last_log_step = start_step
    clock.start()
    for step in range(start_step, end):
        # ALGO LOGIC: one pass over [labeled; weak; strong], self-adaptive thresholds from the weak view, SGD, EMA
        labeled_idx, unlabeled_idx = next(labeled_batches), next(unlabeled_batches)
        images = torch.cat([weak(labeled_idx), weak(unlabeled_idx), strong(unlabeled_idx)])
        with amp:
            logits = net(normalize(images).contiguous(memory_format=memory_format)).float()
        n, u = len(labeled_idx), len(unlabeled_idx)
        logits_x, logits_weak, logits_strong = logits[:n], logits[n : n + u], logits[n + u :]
        loss_xe, loss_xeu, loss_fair, probs_weak, pseudo_labels, mask, state = freematch_losses(
            logits_x, data.y_train[labeled_idx], logits_weak, logits_strong, state, args.ema_p, args.clip_threshold
        )
        loss = loss_xe + args.lambda_u * loss_xeu + args.fairness_weight * loss_fair
        negatives = None
        if args.ns3l:  # negatives from the detached weak view, the loss on the strong logits
            adaptive = state if args.ns3l_threshold == "class-adaptive" else None
            negatives = ns3l_negatives(probs_weak, args.threshold, adaptive)
            loss_ns3l = ns3l_loss(logits_strong, negatives)
            loss = loss + args.ns3l_weight * loss_ns3l
            accumulate("losses/ns3l", loss_ns3l)
        lr = cosine_lr(args.lr, step, args.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step(compiled=net is not model)
        ema_update_(ema_model, model, args.ema_decay)
        accumulate("losses/xe", loss_xe)
        accumulate("losses/xeu", loss_xeu)
        accumulate("losses/fairness", loss_fair)
        accumulate("losses/total", loss)
        for name, value in diagnostics(state, data.y_train[unlabeled_idx], pseudo_labels, mask, negatives).items():
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
        # EVAL: the EMA model; reported: the best test error (USB's best_eval_acc), also the median of the last ones
        evaluate = done % args.eval_every == 0 or done == args.total_steps  # a --stop-at only saves: the legs
        if evaluate or done == end:  # evaluate as one uninterrupted run would
            clock.pause()
            if evaluate:
                valid_x, valid_y = data.x_train[split.valid.to(device)], data.y_train[split.valid.to(device)]
                valid_error = (
                    bookkeeping.error_rate(ema_model, valid_x, valid_y, normalize, memory_format=memory_format)
                    if len(valid_x)
                    else float("nan")
                )
                test_error = bookkeeping.error_rate(
                    ema_model, data.x_test, data.y_test, normalize, memory_format=memory_format
                )
                evaluations.append((done, test_error))
                valid_evaluations.append((done, valid_error))
                best_test = min(best_test, test_error)
                median = statistics.median([e for _, e in evaluations][-args.median_of :])
                bookkeeping.write_scalars(
                    writer,
                    done,
                    {
                        "eval/valid_error": valid_error,
                        "eval/test_error": test_error,
                        "eval/best_test_error": best_test,
                        "eval/median_test_error": median,
                    },
                )
                print(
                    f"eval step {done}: EMA valid error {valid_error:.2f}% test error {test_error:.2f}%, best "
                    f"{best_test:.2f}%, median of last {min(args.median_of, len(evaluations))}: {median:.2f}%",
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
                thresholds={k: v.detach().cpu() for k, v in state.items()},
                best_test=best_test,
                evaluations=evaluations,
                valid_evaluations=valid_evaluations,
            )
            clock.start()

    if end < args.total_steps:  # stopped early: no summary.json, the run is not finished
        writer.close()
        print(
            f"stopped at step {end} of {args.total_steps}; continue with: python train_freematch.py --resume {run_dir}"
        )
        return
    last = [e for _, e in evaluations][-args.median_of :]
    last_valid = [e for _, e in valid_evaluations][-args.median_of :]
    summary = bookkeeping.write_summary(
        writer,
        run_dir,
        {
            "steps": args.total_steps,
            **clock.summary(),
            "best_test_error": best_test,
            "median_test_error": statistics.median(last),
            "median_of": args.median_of,
            "median_valid_error": statistics.median(last_valid) if args.num_valid else float("nan"),
            "final_valid_error": valid_error,
            "final_test_error": test_error,
            "final_global_threshold": float(state["time_p"]),
        },
        args,
        reported=(args.reported, *{"best_test_error", "median_test_error"} - {args.reported}),
    )
    print(
        f"done: {args.total_steps - start_step} steps, best EMA test error {best_test:.2f}% (median of the last "
        f"{len(last)} {summary['median_test_error']:.2f}%, final {test_error:.2f}%), "
        f"{summary['steps_per_second'] or 0:.1f} steps/s -> {run_dir}"
    )


if __name__ == "__main__":
    main()
