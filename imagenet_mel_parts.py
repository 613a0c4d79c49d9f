"""The DenseNet-CAM model, the ImageFolder pipeline and the DDP / checkpoint helpers of train_imagenet_mel.py (the
script keeps the method: its losses, eqs. 1-4, the training step and the evaluation). Forking the script means
copying this file beside it, as train_xc.py's forks copy xc_tree.py.

- Data: the class-balanced labeled / unlabeled / validation split of an ImageNet-style train/ folder (make_split),
  the batch sampler whose slots are labeled with probability --labeled-ratio (LabeledRatioBatchSampler), the
  ImageFolder that skips an unreadable image with one warning (TolerantImageFolder, readable_batch), the
  semi-supervised view, the authors' transforms and the folder loading with its checks.
- Model: torchvision's DenseNet returning the logits and the ReLU feature map the CAMs come from (DenseNetCAM).
- DDP: the all-gather with gradient that NBEL needs over the global batch, the BN-buffer average; the checkpoint of
  a run and the checks of --init-from.
"""

import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as transforms

import bookkeeping

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def create_shared_run_dir(args, script, is_main, world_size, labeled_idx, unlabeled_idx, valid_idx):
    """A new run's directory: rank 0 picks the name (runs/<data>__<script>__<seed>__<unix time> or --run-name),
    creates and locks it with args.json and split.npz (removed again if the run fails before its first checkpoint);
    every rank learns the name, or the one-line error (a name taken, an unusable --runs-dir), by broadcast."""
    dataset_name = os.path.basename(os.path.normpath(args.data_dir))
    name = args.run_name or f"{dataset_name}__{script}__{args.seed}__{int(time.time())}"
    run_dir = [os.path.join(args.runs_dir, name)]
    if world_size > 1:
        dist.broadcast_object_list(run_dir, src=0)
    run_dir = run_dir[0]
    failed = [None]
    if is_main:
        failed[0] = bookkeeping.run_dir_problem(args.runs_dir, run_dir)
        if not failed[0]:
            bookkeeping.create_run_dir(args.runs_dir, os.path.basename(run_dir))
            bookkeeping.write_json(os.path.join(run_dir, "args.json"), vars(args) | {"world_size": world_size})
            np.savez(os.path.join(run_dir, "split.npz"), labeled=labeled_idx, unlabeled=unlabeled_idx, valid=valid_idx)
    if world_size > 1:
        dist.broadcast_object_list(failed, src=0)
    if failed[0]:
        bookkeeping.fail(failed[0])
    return run_dir
