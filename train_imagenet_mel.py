"""Semi-supervised ImageNet with MEL, NBEL and CAM locality (Bansal & Zepeda) — single GPU or torchrun DDP.

Follows Bansal & Zepeda's note "Semi-Supervised Learning" (eqs. 1-4) and their code
(ankanbansal/semi-supervised-learning). A class-balanced labeled subset and a disjoint unlabeled subset are drawn by
the seed from an ImageNet-style `train/` folder; `val/` is the test set. Every batch slot is labeled with probability
`--labeled-ratio`. The loss on a batch of T images is

    L = CE(labeled rows) + alpha * MEL + beta * NBEL + gamma * Loc                                         (eq. 4)
    MEL  = 1/T sum_t H(q_t)                                                                                 (eq. 1)
    NBEL = -H(1/T sum_t q_t)          (under DDP: over the global batch, all-gathered with gradient)        (eq. 2)
    Loc  = sum over 4 directions of ||[ ||C_i(1:k, :)||_2 for k = 1..N ]||_1 on the CAM of the top class   (eq. 3)

with a DenseNet (torchvision, random init) whose CAMs come from its last ReLU feature map and classifier weights.

Two recipes fill the defaults (`--recipe`; every flag given on the command line wins):
- `paper` (default): the run behind the authors' ImageNet table (their final report, latex_files/final/
  experiments.tex of ankanbansal/semi-supervised-learning at commit 07a3918: DenseNet-161 from scratch (line 11),
  batch 52 (line 12), |S| = 64,000 and |U| = 192,000 (lines 8-9, 179), alpha = 0.8 (line 47) with R/T = 0.8, the
  supervised share of the 54.75 row (the note's §3.2 "till 0.8", the authors' slides and plots). What the report
  leaves open is the code as it ran when the table was made (07a3918): 130 epochs (main.py:63), LR / 10 every 20
  epochs (main.py:60 at 32a0169; 30 from 2576d16 on, after the table), batch slots drawn with replacement
  (dataLoader.py:111-122), NBEL as -H(softmax(mean logits)) (losses.py:42-43) and every class's CAM weighted by its
  probability (losses.py:177; train.py:99). The note's forms are flags: --no-nbel-on-mean-logits (eq. 2),
  --loc-weighting max (§2.3, also the report's line 123), --pool-sampling without.
- `code`: the authors' main.py defaults at HEAD, the same code with batch 140 (:39), 50k labeled / 150k unlabeled
  file lists (:43-44), supervised share 0.25 (:53), alpha 1 (:55), LR / 10 every 30 epochs (:61).
Both: beta 2 and gamma 0.01 (main.py:54-56; the report varies them and gives no values), SGD LR 0.1, Nesterov 0.9,
weight decay 1e-4 (main.py:60, :113-114). The note (an earlier draft) says 64k / 200k and "DenseNet".

Data: `train/` and `val/` are ImageFolder trees with the same class folders; the file listing and the split are
checked before anything is written. Images are decoded only when sampled, never in a pass before training (over
ImageNet's 1.28 M files that pass alone would take hours, and a cheap header check misses truncated files, which PIL
finds only when it decodes). An unreadable image (corrupt, truncated, not an image) is skipped with one warning line
naming it, once per file and loader process: in training the next image of its pool (labeled or unlabeled) takes its
slot, and evaluation leaves it out, reporting errors over the readable images. `--crop-size` must be at least what the
DenseNet's strides and pools leave a 1 x 1 map of (min_crop_size: 29 for the 4-block nets), a flag error (exit 2).

    python train_imagenet_mel.py --data-dir /data/imagenet
    torchrun --standalone --nproc_per_node 8 train_imagenet_mel.py --data-dir /data/imagenet --recipe code
"""

import argparse
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms import v2 as transforms

import bookkeeping

SCRIPT = "imagenet_mel"
# fmt: off
RECIPES = {
    "paper": {"arch": "densenet161", "batch_size": 52, "epochs": 130, "lr_step_epochs": 20, "num_labeled": 64000,
              "num_unlabeled": 192000, "labeled_ratio": 0.8, "mel_weight": 0.8, "loc_weighting": "prob",
              "nbel_on_mean_logits": True, "pool_sampling": "with"},
    "code": {"arch": "densenet161", "batch_size": 140, "epochs": 130, "lr_step_epochs": 30, "num_labeled": 50000,
             "num_unlabeled": 150000, "labeled_ratio": 0.25, "mel_weight": 1.0, "loc_weighting": "prob",
             "nbel_on_mean_logits": True, "pool_sampling": "with"},
}
# fmt: on
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Arguments that define the experiment; a resumed run must be started with the same values.
MUST_MATCH_ON_RESUME = (
    "data_dir",
    "seed",
    "num_labeled",
    "num_unlabeled",
    "num_valid",
    "labeled_ratio",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "lr_step_epochs",
    "arch",
    "growth_rate",
    "block_config",
    "num_init_features",
    "crop_size",
    "resize_size",
    "mel_weight",
    "nbel_weight",
    "loc_weight",
    "loc_weighting",
    "nbel_on_mean_logits",
    "pool_sampling",
)


def parse_args(argv=None):
    parser = bookkeeping.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = parser.add_argument_group("experiment")
    g.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="paper",
        help="the defaults of the flags marked 'recipe' below: 'paper' = the run behind the authors' table, "
        "'code' = their main.py (module docstring)",
    )
    g.add_argument(
        "--seed", type=bookkeeping.seed, default=1, help="seeds the split, the batch schedule and the model init"
    )
    g.add_argument("--runs-dir", default="runs", help="parent of the run directory")
    g.add_argument(
        "--run-name",
        type=bookkeeping.run_name,
        default=None,
        help="default: <dataset>__imagenet_mel__<seed>__<unix time>",
    )
    g.add_argument(
        "--resume",
        type=bookkeeping.existing_path,
        default=None,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its checkpoint.pt",
    )
    g.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR",
        help="start from the model weights of the finished run RUN_DIR (the note's '+MEL+NBEL initialised "
        "from the MEL model'); optimizer, LR schedule and step count start fresh; ignored with --resume",
    )
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA if available")
    g.add_argument(
        "--torch-deterministic",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="cuDNN deterministic kernels with benchmarking off (default off: cudnn.benchmark, as the "
        "authors' main.py:106). Not torch.use_deterministic_algorithms: DenseNet's adaptive pooling "
        "has no deterministic CUDA backward, and DataLoader workers still vary with their count",
    )
    g.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast + channels_last on CUDA (ignored on CPU)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the training forward and backward (default: on for CUDA, off on the CPU); the "
        "first step, which compiles, is timed apart and left out of SPS; evaluation and checkpoints "
        "use the uncompiled module",
    )
    g.add_argument("--log-every", type=bookkeeping.positive_int, default=100, help="steps between scalar logs")
    g.add_argument(
        "--eval-every",
        type=bookkeeping.nonnegative_int,
        default=0,
        help="steps between evaluations; 0 = once per epoch",
    )
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", required=True, help="folder with ImageNet-style train/ and val/ class folders")
    g.add_argument(
        "--num-labeled",
        type=bookkeeping.nonnegative_int,
        default=None,
        help="class-balanced labeled subset of train/ (recipe: 64000 / 50000)",
    )
    g.add_argument(
        "--num-unlabeled",
        type=int,
        default=None,
        help="unlabeled subset of train/, disjoint from the labeled one; -1 = all the rest (recipe: 192000 / 150000)",
    )
    g.add_argument(
        "--num-valid",
        type=bookkeeping.nonnegative_int,
        default=0,
        help="images of train/ held out for model selection; 0 = none, as in the note (val/ is the test set)",
    )
    g.add_argument(
        "--labeled-ratio",
        type=bookkeeping.unit_interval,
        default=None,
        help="probability that a batch slot is labeled, R/T (recipe: 0.8 / 0.25)",
    )
    g.add_argument(
        "--pool-sampling",
        choices=("without", "with"),
        default=None,
        help="batch slots take the next image of a seeded reshuffle of their pool, or a uniform draw with "
        "replacement as the authors' WeightedBatchSampler (recipe: with)",
    )
    g.add_argument(
        "--crop-size", type=bookkeeping.positive_int, default=224, help="training and centre-crop size (authors' 224)"
    )
    g.add_argument(
        "--resize-size",
        type=int,
        default=256,
        help="resize before the crop, training ('authors' augmentation) and evaluation (authors' 256)",
    )
    g.add_argument(
        "--augmentation",
        choices=("authors", "random-resized-crop"),
        default="authors",
        help="'authors': Resize + RandomCrop + flip (their dataLoader.py:29-31); 'random-resized-crop': "
        "torchvision's ImageNet recipe",
    )
    g.add_argument("--num-workers", type=bookkeeping.nonnegative_int, default=8, help="DataLoader workers per process")
    g = parser.add_argument_group("model")
    g.add_argument(
        "--arch",
        default=None,
        choices=["densenet121", "densenet161", "densenet169", "densenet201"],
        help="torchvision DenseNet, random init (recipe: densenet161)",
    )
    g.add_argument(
        "--growth-rate",
        type=bookkeeping.positive_int,
        default=None,
        help="override the arch's growth rate (tiny test nets)",
    )
    g.add_argument("--block-config", default=None, help="override the arch's blocks, e.g. '2,2' (tiny test nets)")
    g.add_argument(
        "--num-init-features", type=bookkeeping.positive_int, default=None, help="override the arch's stem width"
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--epochs",
        type=bookkeeping.positive_int,
        default=None,
        help="epochs of labeled + unlabeled pool size (recipe: 130)",
    )
    g.add_argument(
        "--total-steps",
        type=bookkeeping.positive_int,
        default=None,
        help="override the number of steps (default: epochs x steps per epoch)",
    )
    g.add_argument(
        "--batch-size",
        type=bookkeeping.positive_int,
        default=None,
        help="global batch, split over the DDP processes (recipe: 52 / 140)",
    )
    g.add_argument("--lr", type=bookkeeping.positive_float, default=0.1, help="authors' main.py:60")
    g.add_argument(
        "--lr-step-epochs",
        type=bookkeeping.positive_int,
        default=None,
        help="LR divided by 10 every this many epochs (recipe: 20 / 30)",
    )
    g.add_argument("--momentum", type=bookkeeping.ema_decay, default=0.9, help="Nesterov momentum (authors' code)")
    g.add_argument("--weight-decay", type=bookkeeping.nonnegative_float, default=1e-4, help="authors' code")
    g = parser.add_argument_group("MEL / NBEL / locality")
    g.add_argument(
        "--mel-weight", type=bookkeeping.nonnegative_float, default=None, help="alpha, eq. 4 (recipe: 0.8 / 1)"
    )
    g.add_argument(
        "--nbel-weight",
        type=bookkeeping.nonnegative_float,
        default=2.0,
        help="beta, eq. 4 (authors' ImageNet default 2)",
    )
    g.add_argument(
        "--loc-weight",
        type=bookkeeping.nonnegative_float,
        default=0.01,
        help="gamma, eq. 4 (authors' ImageNet default 0.01)",
    )
    g.add_argument(
        "--loc-weighting",
        default=None,
        choices=["max", "prob"],
        help="max: CAM of the most probable class (note §2.3, report line 123); prob: every class's penalty "
        "weighted by its probability, with gradient (authors' train.py:99) (recipe: prob)",
    )
    g.add_argument(
        "--nbel-on-mean-logits",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NBEL as -H(softmax(mean logits)) like the authors' losses.py, instead of -H(mean softmax) "
        "(note eq. 2) (recipe: on)",
    )
    args = parser.parse_args(argv)
    bookkeeping.fill_defaults(args, RECIPES, args.recipe)  # flags not given take the recipe's value

    if args.num_unlabeled < -1:
        parser.error(
            f"--num-unlabeled must be >= -1 (-1 = every image not labeled or held out), got {args.num_unlabeled}"
        )
    if args.labeled_ratio > 0 and args.num_labeled == 0:
        parser.error("--labeled-ratio > 0 needs --num-labeled > 0")
    if args.labeled_ratio < 1 and args.num_unlabeled == 0:
        parser.error("--labeled-ratio < 1 needs --num-unlabeled != 0")
    if args.resize_size < args.crop_size:
        parser.error(f"--resize-size ({args.resize_size}) must be >= --crop-size ({args.crop_size})")
    if args.block_config is not None:
        try:
            blocks = tuple(int(b) for b in args.block_config.split(","))
        except ValueError:
            blocks = ()
        if not blocks or min(blocks) < 1:
            parser.error(f"--block-config must be comma-separated integers >= 1, got {args.block_config!r}")
    num_blocks = len(args.block_config.split(",")) if args.block_config else 4  # every torchvision DenseNet has 4
    if args.crop_size < min_crop_size(num_blocks):
        parser.error(
            f"--crop-size must be >= {min_crop_size(num_blocks)} for a DenseNet of {num_blocks} dense blocks (its "
            f"strides and pools shrink a smaller crop to nothing), got {args.crop_size}"
        )
    return args


# ----------------------------------------------------------------------------------------------------- losses
def mean_entropy_loss(logits):
    """MEL, eq. 1: mean over the rows of the entropy of each row's softmax."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1).mean()


def negative_batch_entropy_loss(logits, on_mean_logits=False):
    """NBEL, eq. 2: -H(mean over the rows of the softmax). on_mean_logits: -H(softmax(mean logits)), the authors'
    code."""
    logits = logits.float()
    if on_mean_logits:
        mean_probs = F.softmax(logits.mean(dim=0), dim=0)
    else:
        mean_probs = F.softmax(logits, dim=1).mean(dim=0)
    return (mean_probs * mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny).log()).sum()


def _safe_sqrt(x):
    # sqrt with a zero (not NaN) gradient at 0: an all-zero CAM row is common after the ReLU.
    positive = x > 0
    return torch.where(positive, x.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(x))


def locality_penalty(cams):
    """Eq. 3 for maps of shape (..., H, W): sum over the 4 directions of sum_k ||first/last k rows/columns||_2.

    ||C(1:k, :)||_2 = sqrt(sum_{r<=k} sum_w C[r, w]^2), so each direction is a cumulative sum of squared row (column)
    norms: O(HW) instead of the O(H^2 W) loop over the groups."""
    cams = cams.float()
    row_sq, col_sq = cams.pow(2).sum(dim=-1), cams.pow(2).sum(dim=-2)  # (..., H), (..., W)
    total = 0
    for sq in (row_sq, col_sq):
        total = total + _safe_sqrt(sq.cumsum(dim=-1)).sum(dim=-1)  # top-down / left-right
        total = total + _safe_sqrt(sq.flip(-1).cumsum(dim=-1)).sum(dim=-1)  # bottom-up / right-left
    return total


def locality_loss(features, classifier_weight, logits, weighting="max"):
    """Mean over the rows of the locality penalty on CAMs C_c = sum_k W[c, k] * features[k] (no bias).

    weighting="max": the CAM of the most probable class only (note §2.3); "prob": every class's penalty weighted by its
    softmax probability, which keeps its gradient (authors' code)."""
    features, classifier_weight = features.float(), classifier_weight.float()
    if weighting == "max":
        top_class = logits.detach().argmax(dim=1)
        cams = torch.einsum("bkhw,bk->bhw", features, classifier_weight[top_class])
        return locality_penalty(cams).mean()
    cams = torch.einsum("bkhw,ck->bchw", features, classifier_weight)
    probs = F.softmax(logits.float(), dim=1)
    return (probs * locality_penalty(cams)).sum(dim=1).mean()


def supervised_loss(logits, targets, normaliser):
    """Cross-entropy summed over the labeled rows (target >= 0) and divided by `normaliser`; 0 if none is labeled."""
    per_row = F.cross_entropy(logits.float(), targets.clamp_min(0), reduction="none")
    return torch.where(targets >= 0, per_row, torch.zeros_like(per_row)).sum() / normaliser


class GatherWithGradient(torch.autograd.Function):
    """All-gather of equal-size rows along dim 0, differentiable: every rank's loss depends on every rank's rows, so a
    rank's rows get the sum over ranks of the gradients flowing into them (an all-reduce, then this rank's slice)."""

    @staticmethod
    def forward(ctx, tensor):
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def compute_losses(
    logits,
    features,
    classifier_weight,
    targets,
    mel_weight,
    nbel_weight,
    loc_weight,
    loc_weighting="max",
    nbel_on_mean_logits=False,
    world_size=1,
):
    """Eq. 4 on this process's rows. Under DDP (world_size > 1) the losses are scaled so that DDP's gradient average
    equals the gradient of the same loss on the global batch: CE is normalised by the global labeled count, and NBEL
    sees the all-gathered logits (gather with gradient: every rank's loss depends on every row)."""
    labeled_count = (targets >= 0).sum()
    if world_size > 1:
        labeled_count = labeled_count.clone()
        dist.all_reduce(labeled_count)
        batch_logits = GatherWithGradient.apply(logits.float())
    else:
        batch_logits = logits
    ce = supervised_loss(logits, targets, labeled_count.clamp_min(1).float() / world_size)
    mel = mean_entropy_loss(logits)
    nbel = negative_batch_entropy_loss(batch_logits, nbel_on_mean_logits)
    loc = locality_loss(features, classifier_weight, logits, loc_weighting) if loc_weight > 0 else logits.new_zeros(())
    total = ce + mel_weight * mel + nbel_weight * nbel + loc_weight * loc
    return {"total": total, "cross_entropy": ce, "mel": mel, "nbel": nbel, "locality": loc}


# ------------------------------------------------------------------------------------------------------- data
def make_split(targets, num_classes, num_labeled, num_unlabeled, num_valid, seed):
    """Class-balanced labeled indices, then uniformly drawn validation and unlabeled indices from the rest (all
    disjoint). num_unlabeled = -1 takes all the rest. Raises ValueError when train/ is too small."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    if num_labeled > len(targets):
        raise ValueError(f"--num-labeled {num_labeled} is more than the {len(targets)} images in train/")
    per_class = np.full(num_classes, num_labeled // num_classes)
    per_class[rng.choice(num_classes, num_labeled % num_classes, replace=False)] += 1  # spread the remainder
    labeled = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        if per_class[c] > len(members):
            raise ValueError(
                f"--num-labeled {num_labeled} needs {per_class[c]} labels in class {c}, "
                f"which has only {len(members)} images"
            )
        labeled.append(rng.choice(members, per_class[c], replace=False))
    labeled = np.sort(np.concatenate(labeled)).astype(np.int64)
    rest = rng.permutation(np.setdiff1d(np.arange(len(targets)), labeled))
    if num_unlabeled == -1:
        num_unlabeled = len(rest) - num_valid
    if num_valid + num_unlabeled > len(rest):
        raise ValueError(
            f"--num-valid {num_valid} + --num-unlabeled {num_unlabeled} is more than the {len(rest)} "
            f"images of train/ left after the {num_labeled} labeled ones"
        )
    valid = np.sort(rest[:num_valid]).astype(np.int64)
    unlabeled = np.sort(rest[num_valid : num_valid + num_unlabeled]).astype(np.int64)
    return labeled, unlabeled, valid


class LabeledRatioBatchSampler:
    """Infinite stream of this rank's share of each global batch, as (train index, is_labeled) pairs.

    Global batch `step`: slot s is labeled with probability `labeled_ratio` (a Bernoulli mask seeded by (seed, step));
    labeled slots take the next images of a seeded reshuffle of the labeled pool, the other slots of the unlabeled pool.
    Every rank builds the same global batch and takes its contiguous chunk of batch_size / world_size slots, so ranks
    never share a slot, a pass through a pool is split between ranks without overlap, and the global batches (hence
    the run) depend on the seed only — not on the number of processes. Resuming at `start_step` is exact.
    replacement=True: each slot draws uniformly from its pool instead (the authors' WeightedBatchSampler,
    dataLoader.py:111-122), seeded by (seed, step)."""

    def __init__(
        self, labeled, unlabeled, batch_size, labeled_ratio, seed, rank=0, world_size=1, start_step=0, replacement=False
    ):
        self.pools = (np.asarray(labeled, dtype=np.int64), np.asarray(unlabeled, dtype=np.int64))
        self.batch_size, self.labeled_ratio, self.seed, self.replacement = batch_size, labeled_ratio, seed, replacement
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.per_rank = batch_size // world_size
        self._orders = {}

    def slot_mask(self, step):
        return np.random.default_rng([self.seed, 1, step]).random(self.batch_size) < self.labeled_ratio

    def _take(self, pool_id, position, count):
        # The `count` images after the first `position` of this pool's stream: concatenated seeded permutations.
        pool, out = self.pools[pool_id], []
        while count > 0:
            cycle, offset = divmod(position, len(pool))
            if self._orders.get(pool_id, (None,))[0] != cycle:
                self._orders[pool_id] = (
                    cycle,
                    np.random.default_rng([self.seed, 2 + pool_id, cycle]).permutation(len(pool)),
                )
            n = min(count, len(pool) - offset)
            out.append(pool[self._orders[pool_id][1][offset : offset + n]])
            position, count = position + n, count - n
        return (np.concatenate(out) if out else np.zeros(0, np.int64)), position

    def global_batches(self):
        labeled_pos = int(sum(self.slot_mask(s).sum() for s in range(self.start_step)))
        unlabeled_pos = self.start_step * self.batch_size - labeled_pos
        step = self.start_step
        while True:
            mask = self.slot_mask(step)
            indices = np.empty(self.batch_size, np.int64)
            if self.replacement:
                draw = np.random.default_rng([self.seed, 4, step])
                indices[mask] = (
                    self.pools[0][draw.integers(len(self.pools[0]), size=int(mask.sum()))] if mask.any() else []
                )
                indices[~mask] = (
                    self.pools[1][draw.integers(len(self.pools[1]), size=int((~mask).sum()))] if (~mask).any() else []
                )
            else:
                indices[mask], labeled_pos = self._take(0, labeled_pos, int(mask.sum()))
                indices[~mask], unlabeled_pos = self._take(1, unlabeled_pos, int((~mask).sum()))
            yield indices, mask
            step += 1

    def __iter__(self):
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        for indices, mask in self.global_batches():
            yield [(int(i), bool(m)) for i, m in zip(indices[mine], mask[mine])]


class TolerantImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose unreadable files give None instead of an exception, with one warning line naming the file
    (once per file and loader process). Files are read only when sampled: a decode pass over ImageNet's 1.28 M files
    before training would take longer than many runs, and a header check misses truncated files (PIL decodes lazily)."""

    warned = None  # paths already reported by this process

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)  # PIL: open + convert("RGB"), i.e. a full decode
        except Exception as error:  # corrupt, truncated, not an image, unreadable: UnidentifiedImageError, OSError, ...
            self.warned = self.warned if self.warned is not None else set()
            if path not in self.warned:
                self.warned.add(path)
                reason = str(error).splitlines()[0] if str(error) else ""
                print(
                    f"{os.path.basename(sys.argv[0]) or 'warning'}: warning: skipping unreadable image {path} "
                    f"({type(error).__name__}{': ' + reason if reason else ''})",
                    file=sys.stderr,
                    flush=True,
                )
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def readable_batch(items):
    """collate_fn of the evaluation loaders: the batch without its unreadable images (None), or None if none is left."""
    items = [item for item in items if item is not None]
    return torch.utils.data.default_collate(items) if items else None


class SemiSupervisedView(torch.utils.data.Dataset):
    """Indexed by (index, is_labeled); unlabeled images get target -1 (their label is dropped). An unreadable image
    (TolerantImageFolder) is replaced by the next readable one of the same pool (``pools``: sorted labeled and
    unlabeled indices), so a labeled slot never takes an image from outside the labeled set."""

    def __init__(self, image_folder, pools=None):
        self.image_folder = image_folder
        self.pools = None if pools is None else [np.asarray(pool, dtype=np.int64) for pool in pools]

    def __getitem__(self, item):
        index, is_labeled = item
        sample = self.image_folder[index]
        if sample is None and self.pools is not None:
            pool = self.pools[0 if is_labeled else 1]
            start = int(np.searchsorted(pool, index))
            for offset in range(1, min(len(pool), 100)):  # a long run of bad files is a damaged folder, not bad luck
                sample = self.image_folder[int(pool[(start + offset) % len(pool)])]
                if sample is not None:
                    break
        if sample is None:
            raise RuntimeError(
                f"image {index} of train/ and the next ones of its {'labeled' if is_labeled else 'unlabeled'} pool "
                f"(up to 100) are unreadable: is the folder damaged?"
            )
        image, target = sample
        return image, (target if is_labeled else -1)


def min_crop_size(num_blocks):
    """The smallest input side torchvision's DenseNet keeps at least 1 x 1 to the end: the stem's 7 x 7 convolution and
    3 x 3 max pool (stride 2, padded) each halve a side rounding up, each of the num_blocks - 1 transitions' 2 x 2
    average pools halves it rounding down. 29 for the 4-block ImageNet nets, 5 for the 2-block test nets."""
    return 4 * 2 ** (num_blocks - 1) - 3


def train_transform(augmentation, crop_size, resize_size):
    """The training augmentation. 'authors' (default): Resize(256) + RandomCrop(224) + horizontal flip, as the authors'
    TrainTransform (ankanbansal/semi-supervised-learning dataLoader.py:29-31); 'random-resized-crop': torchvision's
    ImageNet recipe, RandomResizedCrop(224) + flip. Both end with ToImage + ToDtype(float32, scale=True) (the v2 form
    of ToTensor) and the ImageNet mean / std."""
    if augmentation == "authors":
        crop = [transforms.Resize(resize_size), transforms.RandomCrop(crop_size)]
    else:
        crop = [transforms.RandomResizedCrop(crop_size)]
    return transforms.Compose(
        crop
        + [
            transforms.RandomHorizontalFlip(),
            transforms.ToImage(),
            transforms.ToDtype(torch.float32, scale=True),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(crop_size, resize_size):
    """Resize(256) + CenterCrop(224), the authors' ValTransform (dataLoader.py:44-46)."""
    return transforms.Compose(
        [
            transforms.Resize(resize_size),
            transforms.CenterCrop(crop_size),
            transforms.ToImage(),
            transforms.ToDtype(torch.float32, scale=True),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_image_folders(data_dir, crop_size, resize_size, augmentation="authors"):
    """ImageFolders for train/ (augmented), train/ (evaluation transform) and val/; SystemExit on missing folders."""
    train_tf = train_transform(augmentation, crop_size, resize_size)
    eval_tf = eval_transform(crop_size, resize_size)
    folders = {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            bookkeeping.fail(f"{path} is not a directory (--data-dir needs ImageNet-style train/ and val/ folders)")
        try:
            folders[split] = TolerantImageFolder(path, transform=train_tf if split == "train" else eval_tf)
        except (FileNotFoundError, RuntimeError) as error:
            bookkeeping.fail(f"{path}: {error}".replace("\n", " "))
    if folders["train"].classes != folders["val"].classes:
        bookkeeping.fail(f"train/ and val/ in {data_dir} have different class folders")
    train_eval = copy.copy(folders["train"])
    train_eval.transform = eval_tf
    return folders["train"], train_eval, folders["val"]


# ------------------------------------------------------------------------------------------------------ model
class DenseNetCAM(nn.Module):
    """torchvision DenseNet returning (logits, ReLU feature map); logits = classifier(mean over space of the map)."""

    def __init__(self, densenet):
        super().__init__()
        self.features, self.classifier = densenet.features, densenet.classifier

    def forward(self, x):
        features = F.relu(self.features(x))  # torchvision applies this ReLU before pooling; CAMs use the same maps
        return self.classifier(features.mean(dim=(2, 3))), features


def build_model(args, num_classes):
    if args.growth_rate is None and args.block_config is None and args.num_init_features is None:
        densenet = getattr(torchvision.models, args.arch)(weights=None, num_classes=num_classes)
    else:  # tiny nets for tests: the arch's values unless overridden
        defaults = {
            "densenet121": (32, (6, 12, 24, 16), 64),
            "densenet161": (48, (6, 12, 36, 24), 96),
            "densenet169": (32, (6, 12, 32, 32), 64),
            "densenet201": (32, (6, 12, 48, 32), 64),
        }[args.arch]
        densenet = torchvision.models.DenseNet(
            growth_rate=args.growth_rate or defaults[0],
            block_config=tuple(int(b) for b in args.block_config.split(",")) if args.block_config else defaults[1],
            num_init_features=args.num_init_features or defaults[2],
            num_classes=num_classes,
        )
    return DenseNetCAM(densenet)


@torch.no_grad()
def evaluate(model, dataset, batch_size, num_workers, device, channels_last, rank, world_size):
    """Top-1 / top-5 error (%) and mean CE over `dataset`, sharded over the ranks (no padding) and summed; in exact
    fp32 (autocast and TF32 off), as the authors' code evaluates. Unreadable images are left out (each named once by a
    warning line): the numbers are over the readable ones."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=readable_batch,
    )
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # count, top-1 correct, top-5 correct, CE sum
    for batch in loader:
        if batch is None:  # every image of this batch was unreadable (each named by a warning)
            continue
        images, targets = batch
        images = images.to(
            device, non_blocking=True, memory_format=torch.channels_last if channels_last else torch.preserve_format
        )
        targets = targets.to(device, non_blocking=True)
        with bookkeeping.exact_fp32(device.type):
            logits = model(images)[0].float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.stack(
            [
                torch.tensor(len(targets), device=device),
                (top5[:, 0] == targets).sum(),
                (top5 == targets[:, None]).any(dim=1).sum(),
                F.cross_entropy(logits, targets, reduction="sum"),
            ]
        ).double()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    count = max(totals[0].item(), 1.0)
    return {
        "top1_error": 100.0 * (1 - totals[1].item() / count),
        "top5_error": 100.0 * (1 - totals[2].item() / count),
        "loss": totals[3].item() / count,
    }


def average_buffers(module, world_size):
    # BN running statistics drift apart on the ranks (each sees its own images): average them before evaluating or
    # saving. DDP re-broadcasts rank 0's buffers at the next forward, which are then this average.
    if world_size > 1:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= world_size


def read_checkpoint(run_dir, flag):
    """(checkpoint, its saved args) of RUN_DIR/checkpoint.pt as written by this script; a missing, corrupt or foreign
    file is one line and exit 1 (bookkeeping.load_checkpoint)."""
    checkpoint = bookkeeping.load_checkpoint(run_dir, "train_imagenet_mel.py", flag)
    return checkpoint, checkpoint["args"]


def check_init_source(init_from, init_checkpoint, model_shapes, labeled_idx):
    """--init-from must name a finished run of the same network whose labeled images are labeled here too (else the
    warm start would carry labels of this run's unlabeled or validation images). One line and exit 1 otherwise."""
    summary_path = os.path.join(init_from, "summary.json")
    if not os.path.isfile(summary_path):  # checkpoint.pt of a run still going
        bookkeeping.fail(f"--init-from {init_from} has not finished (no summary.json); wait for it or --resume it")
    with open(summary_path) as f:
        if json.load(f).get("steps") != init_checkpoint["step"]:  # a finished run being extended by --resume
            bookkeeping.fail(
                f"--init-from {init_from}: its checkpoint is not the finished model (a --resume is extending it)"
            )
    source_shapes = {k: tuple(v.shape) for k, v in init_checkpoint["model"].items()}
    different = sorted(
        k for k in source_shapes.keys() | model_shapes.keys() if source_shapes.get(k) != model_shapes.get(k)
    )
    if different:
        bookkeeping.fail(
            f"--init-from {init_from} has another network ({len(different)} tensors differ, e.g. "
            f"{different[0]}: {source_shapes.get(different[0])} there, {model_shapes.get(different[0])} here)"
        )
    split_path = os.path.join(init_from, "split.npz")
    leaked = np.setdiff1d(np.load(split_path)["labeled"], labeled_idx) if os.path.isfile(split_path) else None
    if leaked is None or leaked.size:
        bookkeeping.fail(
            f"--init-from {init_from}: "
            + (
                "no split.npz"
                if leaked is None
                else f"{leaked.size} of its labeled train/ images are not labeled in this run; their labels would leak"
            )
        )


def main(argv=None):
    args = parse_args(argv)
    # torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; a plain `python` run is a world of one.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if args.batch_size % world_size:
        bookkeeping.fail(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    is_main = rank == 0
    mixed = use_cuda and args.bf16 and torch.cuda.is_bf16_supported()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed)

    # Data checks come before anything is written.
    train_folder, train_eval_folder, val_folder = load_image_folders(
        args.data_dir, args.crop_size, args.resize_size, args.augmentation
    )
    num_classes = len(train_folder.classes)
    try:
        labeled_idx, unlabeled_idx, valid_idx = make_split(
            train_folder.targets, num_classes, args.num_labeled, args.num_unlabeled, args.num_valid, args.seed
        )
    except ValueError as error:
        bookkeeping.fail(f"{error}")
    if args.labeled_ratio < 1 and len(unlabeled_idx) == 0:
        bookkeeping.fail(
            f"no images of train/ are left for the unlabeled pool (--labeled-ratio {args.labeled_ratio} < 1)"
        )
    steps_per_epoch = math.ceil((len(labeled_idx) + len(unlabeled_idx)) / args.batch_size)
    total_steps = args.total_steps or args.epochs * steps_per_epoch
    checkpoint = None
    if args.resume:  # the run's own length unless --total-steps extends it; a finished run is never run again
        checkpoint, saved = read_checkpoint(args.resume, "--resume")
        given = sys.argv[1:] if argv is None else list(argv)
        if not any(a == "--total-steps" or a.startswith("--total-steps=") for a in given):
            total_steps = saved.get("total_steps") or saved["epochs"] * steps_per_epoch
        if checkpoint["step"] >= total_steps:
            bookkeeping.fail(
                f"--resume {args.resume}: the run already finished {checkpoint['step']} steps; pass --total-steps "
                f"larger than that to extend it"
            )
    eval_every = args.eval_every or steps_per_epoch

    # Warm start: read and check the other run's weights before anything is written.
    init_weights = None
    if args.init_from and not args.resume:  # a resumed run has its own weights in its checkpoint
        init_checkpoint, _ = read_checkpoint(args.init_from, "--init-from")
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model_shapes = {k: tuple(v.shape) for k, v in build_model(args, num_classes).state_dict().items()}
        check_init_source(args.init_from, init_checkpoint, model_shapes, labeled_idx)
        init_weights = init_checkpoint["model"]
        del init_checkpoint  # the source's optimizer state is not needed

    # Run directory: rank 0 picks it, everyone learns it (or the error) by broadcast.
    if args.resume:
        run_dir = args.resume
        mismatched = [k for k in MUST_MATCH_ON_RESUME if saved.get(k) != getattr(args, k)]
        if mismatched:
            bookkeeping.fail(f"--resume needs the run's own settings; these differ: {', '.join(mismatched)}")
        saved_split = np.load(os.path.join(run_dir, "split.npz"))
        if not (
            np.array_equal(saved_split["labeled"], labeled_idx)
            and np.array_equal(saved_split["unlabeled"], unlabeled_idx)
        ):
            bookkeeping.fail(f"train/ in {args.data_dir} no longer gives the split saved in {run_dir}")
    else:
        dataset_name = os.path.basename(os.path.normpath(args.data_dir))
        run_dir = [
            os.path.join(args.runs_dir, args.run_name or f"{dataset_name}__{SCRIPT}__{args.seed}__{int(time.time())}")
        ]
        if world_size > 1:
            dist.broadcast_object_list(run_dir, src=0)
        run_dir = run_dir[0]
        failed = [None]
        if is_main:
            failed[0] = bookkeeping.run_dir_problem(args.runs_dir, run_dir)  # taken, or --runs-dir unusable
            if not failed[0]:
                bookkeeping.create_run_dir(args.runs_dir, os.path.basename(run_dir))  # locked; removed if no checkpoint
                bookkeeping.write_json(os.path.join(run_dir, "args.json"), vars(args) | {"world_size": world_size})
                np.savez(
                    os.path.join(run_dir, "split.npz"), labeled=labeled_idx, unlabeled=unlabeled_idx, valid=valid_idx
                )
        if world_size > 1:
            dist.broadcast_object_list(failed, src=0)
        if failed[0]:
            bookkeeping.fail(failed[0])
    if is_main:
        print(
            f"{run_dir}: {num_classes} classes, {len(labeled_idx)} labeled / {len(unlabeled_idx)} unlabeled / "
            f"{len(valid_idx)} valid / {len(val_folder)} test images, {steps_per_epoch} steps per epoch, "
            f"{total_steps} steps, {world_size} process(es) on {device}",
            flush=True,
        )

    # Same seed on every rank: identical init (DDP also broadcasts rank 0's weights); augmentation differs per rank.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic

    model = build_model(args, num_classes).to(device)
    if mixed:
        model = model.to(memory_format=torch.channels_last)
    core = model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True, weight_decay=args.weight_decay
    )
    start_step, best = 0, {"valid": None, "test_at_best_valid": None}
    if init_weights is not None:
        core.load_state_dict(init_weights)
        del init_weights
        if is_main:
            print(f"initialised the model from {args.init_from}", flush=True)
    if checkpoint is not None:
        with bookkeeping.restoring(args.resume):  # a checkpoint that does not fit: one line, nothing kept
            core.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            start_step, best = checkpoint["step"], json.loads(checkpoint["best"])
            torch.set_rng_state(checkpoint["torch_rng"])
            if is_main:
                print(f"resumed {run_dir} at step {start_step}", flush=True)
    if is_main:
        bookkeeping.record_leg(run_dir, start_step, device)  # run_info.json: this leg's code, command and machine
    writer = SummaryWriter(run_dir) if is_main else None  # opened only now: a refused resume writes nothing
    if is_main:
        writer.add_text("hyperparameters", bookkeeping.hparams_table(args) + f"\n|world_size|{world_size}|")
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    train_model = bookkeeping.compile_model(model, args, device)  # compiled around DDP, as PyTorch's DDP notes advise
    compiled = train_model is not model

    sampler = LabeledRatioBatchSampler(
        labeled_idx,
        unlabeled_idx,
        args.batch_size,
        args.labeled_ratio,
        args.seed,
        rank,
        world_size,
        start_step,
        replacement=args.pool_sampling == "with",
    )
    loader_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 1_009 + start_step)
    train_loader = torch.utils.data.DataLoader(
        SemiSupervisedView(train_folder, (labeled_idx, unlabeled_idx)),
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=use_cuda,
        generator=loader_generator,
    )
    train_iter = iter(train_loader)
    eval_batch = args.batch_size // world_size
    valid_set = torch.utils.data.Subset(train_eval_folder, valid_idx.tolist())

    def lr_at(step):
        return args.lr * 0.1 ** ((step // steps_per_epoch) // args.lr_step_epochs)

    def run_evaluation(step):
        average_buffers(core, world_size)
        metrics = {"test": evaluate(core, val_folder, eval_batch, args.num_workers, device, mixed, rank, world_size)}
        if len(valid_idx):
            metrics["valid"] = evaluate(core, valid_set, eval_batch, args.num_workers, device, mixed, rank, world_size)
            if best["valid"] is None or metrics["valid"]["top1_error"] < best["valid"]:
                best.update(valid=metrics["valid"]["top1_error"], test_at_best_valid=metrics["test"]["top1_error"])
        if is_main:
            bookkeeping.write_scalars(
                writer,
                step,
                {
                    ("eval/" if split == "test" else "eval/valid_") + key: value
                    for split, values in metrics.items()
                    for key, value in values.items()
                },
            )
            print(
                f"step {step}: test top-1 error {metrics['test']['top1_error']:.2f}% top-5 "
                f"{metrics['test']['top5_error']:.2f}%"
                + (f", valid top-1 {metrics['valid']['top1_error']:.2f}%" if "valid" in metrics else ""),
                flush=True,
            )
            bookkeeping.save_checkpoint(
                os.path.join(run_dir, "checkpoint.pt"),
                {
                    "script": "train_imagenet_mel.py",
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "args": vars(args),
                    "best": json.dumps(best),
                    "torch_rng": torch.get_rng_state(),
                },
            )
        return metrics

    model.train()
    steps_done, steps_since_log, metrics = 0, 0, None
    running = torch.zeros(6, device=device)  # summed loss components and labeled share since the last log
    clock = bookkeeping.TrainClock(device)  # this leg's training time; the compiling first step is kept apart
    clock.start()
    for step in range(start_step, total_steps):
        # ALGO LOGIC: a batch with labeled and unlabeled slots, one forward, eq. 4, one SGD step.
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        images, targets = next(train_iter)
        images = images.to(
            device, non_blocking=True, memory_format=torch.channels_last if mixed else torch.preserve_format
        )
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits, features = train_model(images)
        losses = compute_losses(
            logits.float(),
            features.float(),
            core.classifier.weight,
            targets,
            args.mel_weight,
            args.nbel_weight,
            args.loc_weight,
            args.loc_weighting,
            args.nbel_on_mean_logits,
            world_size,
        )
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        running += torch.stack([v.detach() for v in losses.values()] + [(targets >= 0).float().mean()])
        clock.step(compiled=compiled)
        steps_done += 1
        steps_since_log += 1

        # LOGGING: component means over the log interval and all ranks (one all-reduce per log).
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            if world_size > 1:
                dist.all_reduce(running)
                running /= world_size
            values = (running / steps_since_log).tolist()
            running.zero_()
            steps_since_log = 0
            if not all(math.isfinite(v) for v in values):
                bookkeeping.fail(f"non-finite loss at step {step + 1}: {values}")
            if is_main:
                sps = clock.lap()  # steps per second since the last log; nan when it held only the compiling step
                bookkeeping.write_scalars(
                    writer,
                    step + 1,
                    {
                        **{
                            ("charts/" if name == "labeled_share" else "losses/") + name: value
                            for name, value in zip(list(losses) + ["labeled_share"], values)
                        },
                        "charts/learning_rate": lr_at(step),
                        "charts/SPS": sps,
                    },
                )
                print(
                    bookkeeping.progress_line(
                        step + 1,
                        total_steps,
                        sps,
                        loss=values[0],
                        ce=values[1],
                        mel=values[2],
                        nbel=values[3],
                        loc=values[4],
                        labeled=values[5],
                        lr=lr_at(step),
                    ),
                    flush=True,
                )
        # EVAL and checkpoint.
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            clock.pause()
            metrics = run_evaluation(step + 1)
            clock.start()
    if metrics is None:  # resumed a finished run: evaluate the loaded weights
        metrics = run_evaluation(total_steps)

    # Sanity check that DDP kept the replicas identical (0.0 = bitwise equal weights and buffers on every rank).
    max_rank_diff = 0.0
    if world_size > 1:
        for tensor in core.state_dict().values():
            reference = tensor.clone()
            dist.broadcast(reference, src=0)
            max_rank_diff = max(max_rank_diff, (tensor.double() - reference.double()).abs().max().item())
        diff = torch.tensor(max_rank_diff, dtype=torch.float64, device=device)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        max_rank_diff = diff.item()
    if is_main:
        summary = bookkeeping.write_summary(
            writer,
            run_dir,
            {
                "steps": total_steps,
                "steps_this_run": steps_done,
                **clock.summary(),
                "final_test_error": metrics["test"]["top1_error"],
                "final_test_top5_error": metrics["test"]["top5_error"],
                "final_test_loss": metrics["test"]["loss"],
                "final_valid_error": metrics["valid"]["top1_error"] if "valid" in metrics else None,
                "best_valid_error": best["valid"],
                "test_error_at_best_valid": best["test_at_best_valid"],
                "world_size": world_size,
                "max_param_diff_across_ranks": max_rank_diff,
                "num_labeled": len(labeled_idx),
                "num_unlabeled": len(unlabeled_idx),
                "num_valid": len(valid_idx),
                "num_test": len(val_folder),
            },
            args,
            reported=("final_test_error", "final_test_top5_error"),
        )
        print(
            f"done: {total_steps} steps, {summary['steps_per_second'] or 0:.2f} steps/s, test top-1 error "
            f"{summary['final_test_error']:.2f}% top-5 {summary['final_test_top5_error']:.2f}%, "
            f"ranks max |diff| {max_rank_diff}",
            flush=True,
        )
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
