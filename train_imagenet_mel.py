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

Flags the table in parse_args only names: --init-from starts from a finished run's weights (the note's "initialised
from the MEL model"), with a fresh optimizer, schedule and step count; --pool-sampling without gives each batch slot
the next image of a seeded reshuffle of its pool, with (the recipes) a uniform draw as the authors'
WeightedBatchSampler; --torch-deterministic is cuDNN's deterministic mode with benchmarking off (not
use_deterministic_algorithms: DenseNet's adaptive pooling has no deterministic CUDA backward); --compile's first step
is timed apart and left out of SPS.

    python train_imagenet_mel.py --data-dir /data/imagenet
    torchrun --standalone --nproc_per_node 8 train_imagenet_mel.py --data-dir /data/imagenet --recipe code
"""

import argparse
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

import bookkeeping
from imagenet_mel_parts import (  # the model, the data pipeline and the DDP helpers, beside this file
    GatherWithGradient,
    LabeledRatioBatchSampler,
    SemiSupervisedView,
    average_buffers,
    build_model,
    check_init_source,
    create_shared_run_dir,
    load_image_folders,
    make_split,
    min_crop_size,
    read_checkpoint,
    readable_batch,
)

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
    """The flags, one per line; 'recipe' marks a default taken from RECIPES (the module docstring says where each
    value comes from). Checks across flags follow the table."""
    rows = [f"  {n}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in r.items()) for n, r in RECIPES.items()]
    epilog = "\n".join(["the 'recipe' flags' defaults per --recipe (sources: the module docstring):", *rows])
    parser = bookkeeping.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog)
    pos, nonneg, rate = bookkeeping.positive_int, bookkeeping.nonnegative_int, bookkeeping.nonnegative_float
    onoff = argparse.BooleanOptionalAction
    g = parser.add_argument_group("experiment")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="paper", help="defaults of the 'recipe' flags below")
    g.add_argument("--seed", type=bookkeeping.seed, default=1, help="seeds the split, the batches and the init")
    g.add_argument("--runs-dir", default="runs", help="parent of the run directory")
    g.add_argument("--run-name", type=bookkeeping.run_name, help="default <dataset>__imagenet_mel__<seed>__<time>")
    g.add_argument("--resume", type=bookkeeping.existing_path, metavar="RUN_DIR", help="continue RUN_DIR")
    g.add_argument("--init-from", metavar="RUN_DIR", help="start from a finished run's weights (ignored on --resume)")
    g.add_argument("--cuda", action=onoff, default=True, help="use CUDA if available")
    g.add_argument(
        "--torch-deterministic", action=onoff, default=False, help="cuDNN deterministic, no benchmark (main.py:106)"
    )
    g.add_argument("--bf16", action=onoff, default=True, help="bf16 autocast + channels_last on CUDA (not the CPU)")
    g.add_argument(
        "--compile", action=onoff, default=None, help="torch.compile the training pass (default: on for CUDA)"
    )
    g.add_argument("--log-every", type=pos, default=100, help="steps between scalar logs")
    g.add_argument("--eval-every", type=nonneg, default=0, help="steps between evaluations; 0 = once per epoch")
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", required=True, help="folder with ImageNet-style train/ and val/ class folders")
    g.add_argument("--num-labeled", type=nonneg, help="class-balanced labeled subset of train/ (recipe)")
    g.add_argument("--num-unlabeled", type=int, help="disjoint unlabeled subset; -1 = all the rest (recipe)")
    g.add_argument("--num-valid", type=nonneg, default=0, help="train/ images held out for selection (note: none)")
    g.add_argument("--labeled-ratio", type=bookkeeping.unit_interval, help="P(a batch slot is labeled), R/T (recipe)")
    g.add_argument("--pool-sampling", choices=("without", "with"), help="slots drawn with replacement? (recipe)")
    g.add_argument("--crop-size", type=pos, default=224, help="training and centre-crop size (authors' 224)")
    g.add_argument("--resize-size", type=int, default=256, help="resize before the crop (authors' 256)")
    g.add_argument("--augmentation", choices=("authors", "random-resized-crop"), default="authors", help="authors: "
                   "Resize + RandomCrop + flip (dataLoader.py:29-31); random-resized-crop: torchvision's")  # fmt: skip
    g.add_argument("--num-workers", type=nonneg, default=8, help="DataLoader workers per process")
    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=["densenet121", "densenet161", "densenet169", "densenet201"], help="(recipe)")
    g.add_argument("--growth-rate", type=pos, help="override the arch's growth rate (tiny test nets)")
    g.add_argument("--block-config", help="override the arch's blocks, e.g. '2,2' (tiny test nets)")
    g.add_argument("--num-init-features", type=pos, help="override the arch's stem width (tiny test nets)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=pos, help="epochs of the labeled + unlabeled pools (recipe)")
    g.add_argument("--total-steps", type=pos, help="override the steps (default: epochs x steps per epoch)")
    g.add_argument("--batch-size", type=pos, help="global batch, split over the DDP processes (recipe)")
    g.add_argument("--lr", type=bookkeeping.positive_float, default=0.1, help="authors' main.py:60")
    g.add_argument("--lr-step-epochs", type=pos, help="LR / 10 every this many epochs (recipe)")
    g.add_argument("--momentum", type=bookkeeping.ema_decay, default=0.9, help="Nesterov momentum (main.py:113-114)")
    g.add_argument("--weight-decay", type=rate, default=1e-4, help="authors' main.py:114")
    g = parser.add_argument_group("MEL / NBEL / locality")
    g.add_argument("--mel-weight", type=rate, help="alpha, eq. 4 (recipe)")
    g.add_argument("--nbel-weight", type=rate, default=2.0, help="beta, eq. 4 (main.py:56)")
    g.add_argument("--loc-weight", type=rate, default=0.01, help="gamma, eq. 4 (main.py:54)")
    g.add_argument("--loc-weighting", choices=["max", "prob"], help="max: the top class's CAM (note 2.3); prob: "
                   "every class's, weighted by its probability (train.py:99) (recipe)")  # fmt: skip
    g.add_argument("--nbel-on-mean-logits", action=onoff, help="-H(softmax(mean logits)) as losses.py:42, not the "
                   "note's -H(mean softmax) (recipe)")  # fmt: skip
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
    else:  # rank 0 makes it (args.json, split.npz), every rank learns its name or the error
        run_dir = create_shared_run_dir(args, SCRIPT, is_main, world_size, labeled_idx, unlabeled_idx, valid_idx)
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
