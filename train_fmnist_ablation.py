"""NS3L negative-label selection ablation on Fashion-MNIST with a small CNN (NS3L paper, Section 5 / Table 5).

Chen, Shah, Kyrillidis, "Negative Sampling in Semi-Supervised Learning": 2,000 labeled and 58,000 unlabeled
Fashion-MNIST training images, a small CNN trained for 50 epochs, and the test error at the end of training for
each way of choosing the negative labels of an unlabeled image (loss: -log(1 - sum of their probabilities)):

  supervised    labeled data only
  uniform       P classes drawn uniformly (without replacement) from all classes, fresh at every draw
  nn-exclude    P classes drawn from all classes except the class of the nearest labeled neighbour
  nn-exclude-4  P classes drawn from all classes except the 4 classes whose labeled examples are nearest
  nn-furthest   the P classes whose nearest labeled example is furthest (fixed per image)
  threshold     NS3L: classes whose detached predicted probability is below T (Algorithm 1, section 4.1.2)
  oracle        P classes drawn uniformly from the wrong classes, using the hidden labels

    python train_fmnist_ablation.py --negatives threshold --threshold 0.03 --seed 1
    python train_fmnist_ablation.py --negatives oracle --num-negatives 3 --seed 1
    python benchmark/fmnist_table.py --seeds 1 2 3 4 5   # every row of Table 5 over 5 seeds

Nearest neighbours are Euclidean in raw pixel space against the labeled set, computed once before training in
chunks on the device (||u||^2 - 2 u.l + ||l||^2, float32); the time it takes is printed and stored in summary.json.

Choices the paper does not state (the defaults):
- "Epoch" = one pass over the labeled set: steps per epoch = ceil(num_labeled / batch_size), so 50 epochs are
  50 * 40 = 2,000 steps at the default 50 labeled + 50 unlabeled images per step. Every row makes the same number of
  optimiser steps on the same labeled split; the unlabeled stream is seen 2000 * 50 / 58000 = 1.7 times.
  (Oliver et al.'s 50 + 50 batches, which the paper's section 4.1 uses; one pass over the 58k unlabeled images per
  epoch would be 29x the compute and does not fit a CPU: --epoch-unit unlabeled reads "epoch" that way, for a GPU.)
- CNN: conv 5x5/2 (16) - ReLU - conv 3x3/2 (32) - ReLU - linear 128 - ReLU - linear, no BatchNorm (so the NS3L pass
  needs no frozen-statistics trick) and no dropout; about 0.4 ms per image per training step on one CPU core.
- Adam, learning rate 1e-3 (PyTorch/Keras default), no weight decay, constant; no data augmentation; inputs scaled
  to [-1, 1]. --ns3l-weight 1 (lambda_1 = 1, the paper's section 4.1.3 value for NS3L alone), no ramp-up.
- Labeled images are not in the unlabeled stream (2,000 / 58,000 as in the paper); no validation split by default
  (the paper's "validation error" is the test error at the end of training); --num-valid N holds one out.
- Reported: the mean test error over the ends of the last 10 epochs (--mean-of), where the paper reports one
  end-of-training number (summary.json keeps it, final_test_error). At a constant learning rate the test error of one
  run moves 0.2-0.6 points between consecutive epochs, more than some of the table's differences; the mean of 10 is
  the less noisy number to compare rows with.
- Every row of a seed sees the same labeled batches in the same order and the same initial weights: the labeled
  batches, the unlabeled batches and the random negatives each draw from their own generator, seeded from --seed,
  so a row that draws negatives (or unlabeled batches) does not move another stream. Paired differences between
  rows then measure the negatives, not a different batch order.
- --resume RUN_DIR continues a killed run from its checkpoint, written at the end of every epoch and of training
  (weights, Adam, both samplers, every RNG, the running sums and the evaluation record): under --torch-deterministic
  and the same thread count the resumed run equals the uninterrupted one bit for bit.
"""

import argparse
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bookkeeping
import common

SCRIPT = "train_fmnist_ablation"
RULES = ("supervised", "uniform", "nn-exclude", "nn-exclude-4", "nn-furthest", "threshold", "oracle")
NN_EXCLUDED = {"nn-exclude": 1, "nn-exclude-4": 4}  # how many nearest classes each rule rules out


def parse_args(argv=None):
    pos, nonneg, rate, unit, onoff = (
        bookkeeping.positive_int,
        bookkeeping.nonnegative_int,
        bookkeeping.nonnegative_float,
        bookkeeping.open_unit,
        argparse.BooleanOptionalAction,
    )
    parser = bookkeeping.ArgumentParser(description=__doc__.split("\n")[0])
    g = parser.add_argument_group("experiment")
    bookkeeping.add_run_args(g)  # --seed, --runs-dir, --run-name, --resume
    g.add_argument("--cuda", action=onoff, default=True, help="use CUDA when available")
    g.add_argument("--torch-deterministic", action=onoff, default=False, help="deterministic kernels "
                   "(torch.use_deterministic_algorithms, cuDNN deterministic, no benchmark): bit-reproducible on the "
                   "same machine and software, slower on GPU")  # fmt: skip
    g.add_argument("--eval-every", type=pos, default=None, help="steps between test evaluations (default: 10 epochs); "
                   "checkpoints are written every epoch")  # fmt: skip
    g.add_argument("--log-every", type=pos, default=100, help="steps between logged scalars")
    g.add_argument("--mean-of", type=pos, default=10, help="the reported number is the mean test error at the ends of "
                   "this many last epochs (the paper: the end)")  # fmt: skip
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="fashion_mnist", help=f"{', '.join(common.DATASET_NAMES)} or a path to an .npz "
                   "(x_train, y_train, x_test, y_test)")  # fmt: skip
    g.add_argument("--data-dir", default="data", help="torchvision data root (else Debian's dataset-fashion-mnist)")
    g.add_argument("--download", action="store_true", help="let torchvision download the data set")
    g.add_argument("--num-labeled", type=pos, default=2000, help="labeled images (paper Table 5: 2,000)")
    g.add_argument("--num-valid", type=nonneg, default=0, help="validation images held out of train (paper: none)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=pos, default=50, help="epochs of --epoch-unit (paper Table 5: 50)")
    g.add_argument("--epoch-unit", choices=("labeled", "unlabeled"), default="labeled", help="what an epoch passes "
                   "over, which the paper does not define: 'labeled' (the 2,000 labeled images; 2,000 steps for 50 "
                   "epochs) or 'unlabeled' (the 58,000 unlabeled images; 29x the steps)")  # fmt: skip
    g.add_argument("--total-steps", type=pos, default=None, help="overrides --epochs: optimiser steps")
    g.add_argument("--batch-size", type=pos, default=50, help="labeled images per step (Oliver et al.: 50)")
    g.add_argument("--unlabeled-batch-size", type=pos, default=50, help="unlabeled images per step (Oliver et al.: 50)")
    g.add_argument("--lr", type=bookkeeping.positive_float, default=0.001, help="Adam learning rate (framework "
                   "default; paper: not given)")  # fmt: skip
    g.add_argument("--hidden", type=pos, default=128, help="width of the CNN's hidden linear layer")
    g = parser.add_argument_group("ns3l")
    g.add_argument("--negatives", choices=RULES, default="threshold", help="how negative labels are chosen (row)")
    g.add_argument("--num-negatives", type=pos, default=1, help="P: negatives per unlabeled image (uniform, nn-*, "
                   "oracle; ignored by threshold/supervised)")  # fmt: skip
    g.add_argument("--threshold", type=unit, default=0.03, help="T for --negatives threshold (Table 5: 0.03, 0.05)")
    g.add_argument("--ns3l-weight", type=rate, default=1.0, help="lambda_1 (paper section 4.1.3: 1)")
    g.add_argument("--nn-chunk", type=pos, default=4096, help="unlabeled images per nearest-neighbour block")
    args = parser.parse_args(argv)

    try:
        common.dataset_key(args.dataset)
    except common.DataError as error:
        parser.error(str(error))
    return args


def max_negatives(rule, num_classes):
    """The largest P a rule can draw without repeating a class (the pool it draws from)."""
    return {"uniform": num_classes, "nn-furthest": num_classes, "oracle": num_classes - 1}.get(
        rule, num_classes - NN_EXCLUDED.get(rule, 0)
    )


class SmallCNN(nn.Module):
    """Two strided convolutions and two linear layers: about 0.2M parameters, fast on a CPU core."""

    def __init__(self, num_classes, in_channels=1, image_size=28, hidden=128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def ns3l_loss(logits, negatives):
    """Mean over rows of -log(1 - sum_{k in negatives} p_k) (paper eq. for the NS3L loss / Algorithm 1), stable form
    log(1 - sum_neg p) = logsumexp(logits of non-negatives) - logsumexp(logits), clamped at 1e-8 like the authors'.
    A row with no negatives contributes 0; a row whose negatives are every class hits the clamp (18.4)."""
    logits = logits.float()
    log_keep = torch.logsumexp(logits.masked_fill(negatives, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)
    return -log_keep.clamp_min(math.log(1e-8)).mean()


def class_distances(unlabeled, labeled, labeled_y, num_classes, chunk=4096):
    """(N_u, K): Euclidean distance from each unlabeled row to the nearest labeled row of each class (inf for a class
    with no labeled row). Inputs are float (N, D) on one device; computed in blocks of ``chunk`` unlabeled rows."""
    labeled_sq = (labeled * labeled).sum(1)
    out = []
    for start in range(0, len(unlabeled), chunk):
        block = unlabeled[start : start + chunk]
        squared = (block * block).sum(1, keepdim=True) - 2.0 * block @ labeled.T + labeled_sq  # (B, N_l)
        per_class = torch.full((len(block), num_classes), float("inf"), device=block.device)
        per_class.scatter_reduce_(1, labeled_y.expand(len(block), -1), squared, reduce="amin")
        out.append(per_class.clamp_min(0).sqrt())
    return torch.cat(out)


def draw_from(allowed, num_negatives, generator=None):
    """Bool (B, K): ``num_negatives`` distinct classes per row drawn uniformly from the True entries of ``allowed``
    (random keys, disallowed classes pushed below every allowed one, top-P). Needs P <= allowed count per row."""
    keys = torch.rand(allowed.shape, device=allowed.device, generator=generator).masked_fill(~allowed, -1.0)
    chosen = keys.topk(num_negatives, dim=1).indices
    return torch.zeros_like(allowed).scatter_(1, chosen, True)


def select_negatives(
    rule,
    num_negatives,
    num_classes,
    *,
    logits=None,
    threshold=None,
    class_rank=None,
    hidden_labels=None,
    generator=None,
):
    """Negative labels (bool (B, K)) of one unlabeled batch under ``rule``.
    class_rank: (B, K) classes sorted by distance of their nearest labeled example, nearest first (nn-* rules);
    hidden_labels: the true classes (oracle only); logits: this batch's predictions (threshold only, detached)."""
    if rule == "threshold":
        return torch.softmax(logits.detach().float(), dim=1) < threshold
    batch = (
        len(class_rank) if class_rank is not None else len(hidden_labels) if hidden_labels is not None else len(logits)
    )
    device = (class_rank if class_rank is not None else hidden_labels if hidden_labels is not None else logits).device
    allowed = torch.ones(batch, num_classes, dtype=torch.bool, device=device)
    if rule == "uniform":
        pass
    elif rule == "oracle":
        allowed.scatter_(1, hidden_labels[:, None], False)
    elif rule in NN_EXCLUDED:
        allowed.scatter_(1, class_rank[:, : NN_EXCLUDED[rule]], False)
    elif rule == "nn-furthest":
        return torch.zeros_like(allowed).scatter_(1, class_rank[:, num_classes - num_negatives :], True)
    else:
        raise ValueError(f"no negatives for rule {rule!r}")
    return draw_from(allowed, num_negatives, generator)


def mean_error(evaluations):
    """Mean test error of [(step, error)], NaN for none."""
    return sum(error for _, error in evaluations) / len(evaluations) if evaluations else float("nan")


def main():
    args = parse_args()
    checkpoint = None
    if args.resume:
        checkpoint = bookkeeping.load_checkpoint(args.resume, SCRIPT)
        args = bookkeeping.resume_args(args, checkpoint, sys.argv[1:], overrides=("total_steps", "cuda"), legacy=False)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    bookkeeping.seed_everything(args.seed, args.torch_deterministic)

    # Data: every failure here is one line and happens before anything is written.
    try:
        data = common.load_dataset(args.dataset, args.data_dir, args.download, device)
        split = common.make_ssl_split(
            data.y_train,
            data.num_classes,
            args.num_labeled,
            args.num_valid,
            args.seed,
            data.num_labelable,
            include_labeled=False,
        )
    except common.DataError as error:
        bookkeeping.fail(str(error))
    if args.negatives not in ("supervised", "threshold") and args.num_negatives > max_negatives(
        args.negatives, data.num_classes
    ):
        bookkeeping.fail(
            f"--num-negatives {args.num_negatives} is too many for --negatives {args.negatives} with "
            f"{data.num_classes} classes (at most {max_negatives(args.negatives, data.num_classes)})"
        )
    if args.negatives != "supervised" and (len(split.unlabeled) == 0 or (data.y_train[split.unlabeled] < 0).any()):
        bookkeeping.fail("the unlabeled images need hidden labels (oracle rule, wrong-negative diagnostics)")
    steps_per_epoch = (
        math.ceil(args.num_labeled / args.batch_size)
        if args.epoch_unit == "labeled"
        else math.ceil(len(split.unlabeled) / args.unlabeled_batch_size)
    )
    args.total_steps = args.total_steps or args.epochs * steps_per_epoch
    args.eval_every = args.eval_every or 10 * steps_per_epoch
    normalize = common.Normalizer("scale")  # x / 127.5 - 1

    # NEGATIVE PREPROCESSING: pixel-space nearest labeled example of every class, once, for the nn-* rules.
    unlabeled_idx = split.unlabeled.to(device)
    rank_of = None  # row in the unlabeled set -> classes by distance, nearest first
    nn_seconds, nn_stats = None, {}
    if args.negatives.startswith("nn-"):
        tick = time.perf_counter()
        labeled_idx = split.labeled.to(device)
        flat_l = data.x_train[labeled_idx].flatten(1).float()
        distances = class_distances(
            data.x_train[unlabeled_idx].flatten(1).float(),
            flat_l,
            data.y_train[labeled_idx],
            data.num_classes,
            args.nn_chunk,
        )
        rank_of = distances.argsort(dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        nn_seconds = time.perf_counter() - tick
        hidden = data.y_train[unlabeled_idx]
        nearest = rank_of[:, :4]
        nn_stats = {
            "nn_1nn_accuracy": 100.0 * (nearest[:, 0] == hidden).float().mean().item(),
            "nn_true_in_4_nearest": 100.0 * (nearest == hidden[:, None]).any(1).float().mean().item(),
            "nn_true_is_furthest": 100.0 * (rank_of[:, -1] == hidden).float().mean().item(),
        }
        print(
            f"nearest-neighbour preprocessing: {len(unlabeled_idx)} x {len(labeled_idx)} distances in "
            f"{nn_seconds:.2f} s; 1-NN accuracy {nn_stats['nn_1nn_accuracy']:.2f}%, true class among the 4 "
            f"nearest {nn_stats['nn_true_in_4_nearest']:.2f}%, true class furthest "
            f"{nn_stats['nn_true_is_furthest']:.2f}%",
            flush=True,
        )
    position = torch.full((len(data.x_train),), -1, dtype=torch.long, device=device)
    position[unlabeled_idx] = torch.arange(len(unlabeled_idx), device=device)  # x_train index -> unlabeled row

    model = SmallCNN(data.num_classes, data.channels, data.image_size, args.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # constant LR, no weight decay
    # Three random streams, each its own generator from --seed: a row's draws in one never move another's batches.
    streams = [torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + k + 1) for k in range(3)]
    labeled_batches = common.BatchSampler(split.labeled.to(device), args.batch_size, generator=streams[0])
    unlabeled_batches = common.BatchSampler(unlabeled_idx, args.unlabeled_batch_size, generator=streams[1])
    negatives_rng = streams[2]
    uses_unlabeled = args.negatives != "supervised"

    sums = {}  # running sums of logged scalars, kept on the device

    def accumulate(name, value):
        sums[name] = sums.get(name, 0.0) + value.detach().float()

    totals = {
        "negatives": torch.zeros((), device=device),
        "wrong": torch.zeros((), device=device),
        "rows": torch.zeros((), device=device),
        "rows_hit": torch.zeros((), device=device),
    }

    valid_error, test_error, best_valid, test_at_best = None, float("nan"), None, None
    last_epochs = []  # (step, test error) at the ends of the last --mean-of epochs
    first_mean_step = (math.ceil(args.total_steps / steps_per_epoch) - args.mean_of) * steps_per_epoch
    start_step, last_log_step = 0, 0
    clock = bookkeeping.TrainClock(device)  # training time and steps, without evaluation and checkpoints
    if checkpoint is not None:
        with bookkeeping.restoring(args.resume):  # a checkpoint that does not fit: one line, nothing kept
            clock = bookkeeping.restore_run(
                checkpoint,
                device,
                model=model,
                optimizer=optimizer,
                labeled_sampler=labeled_batches,
                unlabeled_sampler=unlabeled_batches,
            )
            start_step, last_log_step = checkpoint["step"], checkpoint["last_log_step"]
            sums = {name: value.to(device) for name, value in checkpoint["sums"].items()}  # the open log interval
            totals = {name: value.to(device) for name, value in checkpoint["totals"].items()}
            valid_error, test_error = checkpoint["valid_error"], checkpoint["test_error"]
            best_valid, test_at_best = checkpoint["best_valid"], checkpoint["test_at_best"]
            nn_seconds = checkpoint["nn_seconds"]  # the first leg's preprocessing time
            # a run extended with --total-steps keeps only the epoch ends that are among its new last epochs (an old
            # final evaluation off the epoch grid is dropped)
            last_epochs = [
                tuple(e)
                for e in checkpoint.get("last_epochs", [])
                if e[0] > first_mean_step and (e[0] % steps_per_epoch == 0 or e[0] == args.total_steps)
            ]
            common.restore_generator(negatives_rng, checkpoint.get("negatives_rng"), "the random negatives")
            print(f"resumed {args.resume} at step {start_step}")
    run_dir, writer = bookkeeping.open_run(args, SCRIPT, split, checkpoint)  # made (or reopened) only now
    if checkpoint is None and nn_seconds is not None:  # a resumed run keeps its first leg's time (restored above)
        writer.add_scalar("charts/nn_preprocess_seconds", nn_seconds, 0)
    model.train()
    clock.start()
    for step in range(start_step, args.total_steps):
        # ALGO LOGIC: one forward pass over [labeled; unlabeled], cross-entropy + lambda_1 * NS3L
        labeled = next(labeled_batches)
        x, y = normalize(data.x_train[labeled]), data.y_train[labeled]
        if uses_unlabeled:
            unlabeled = next(unlabeled_batches)
            x = torch.cat([x, normalize(data.x_train[unlabeled])])
        logits = model(x)
        logits_l, logits_u = logits[: len(y)], logits[len(y) :]
        loss_sup = F.cross_entropy(logits_l, y)
        loss = loss_sup
        accumulate("losses/supervised", loss_sup)
        if uses_unlabeled:
            hidden = data.y_train[unlabeled]  # hidden labels: the oracle rule and diagnostics only
            negatives = select_negatives(
                args.negatives,
                args.num_negatives,
                data.num_classes,
                logits=logits_u,
                threshold=args.threshold,
                class_rank=rank_of[position[unlabeled]] if rank_of is not None else None,
                hidden_labels=hidden,
                generator=negatives_rng,
            )
            loss_ns3l = ns3l_loss(logits_u, negatives)
            loss = loss + args.ns3l_weight * loss_ns3l
            hit = negatives.gather(1, hidden[:, None]).squeeze(1)  # the true class was chosen as a negative
            totals["negatives"] += negatives.sum()
            totals["wrong"] += hit.sum()
            totals["rows"] += len(hit)
            totals["rows_hit"] += hit.sum()
            accumulate("losses/ns3l", loss_ns3l)
            accumulate("charts/negatives_per_sample", negatives.sum(1).float().mean())
            accumulate("charts/wrong_negative_share", hit.sum() / negatives.sum().clamp_min(1))
        accumulate("losses/total", loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step()

        done = step + 1
        # LOGGING: means since the last log; SPS over training time only
        if done % args.log_every == 0 or done == args.total_steps:
            sps = clock.lap()
            means = bookkeeping.interval_means(sums, done - last_log_step)
            bookkeeping.write_scalars(writer, done, means | {"charts/learning_rate": args.lr, "charts/SPS": sps})
            print(
                bookkeeping.progress_line(
                    done, args.total_steps, sps, epoch=done / steps_per_epoch, loss=means["losses/total"]
                ),
                flush=True,
            )
            sums, last_log_step = {}, done
        # EVAL: the paper's table reports the final test error; the validation split, when there is one, is logged
        end_of_epoch = done % steps_per_epoch == 0 or done == args.total_steps
        in_mean = end_of_epoch and done > first_mean_step
        on_grid = done % args.eval_every == 0 or done == args.total_steps  # the --eval-every grid
        if on_grid or in_mean:
            clock.pause()
            test_error = bookkeeping.error_rate(model, data.x_test, data.y_test, normalize)
            message = f"eval step {done}: test error {test_error:.2f}%"
            if in_mean:
                last_epochs.append((done, test_error))
                message += f", mean of the last {len(last_epochs)} epochs {mean_error(last_epochs):.2f}%"
            if len(split.valid):
                valid_idx = split.valid.to(device)
                valid_error = bookkeeping.error_rate(model, data.x_train[valid_idx], data.y_train[valid_idx], normalize)
                if on_grid and (best_valid is None or valid_error < best_valid):
                    best_valid, test_at_best = valid_error, test_error
                message += f", valid error {valid_error:.2f}%"
            bookkeeping.write_scalars(
                writer,
                done,
                {
                    "eval/test_error": test_error,
                    "eval/valid_error": float("nan") if valid_error is None else valid_error,
                }
                | ({"eval/mean_last_test_error": mean_error(last_epochs)} if in_mean else {}),
            )
            print(message, flush=True)
            clock.start()
        # CHECKPOINT: at the end of every epoch and of training, everything a bit-identical --resume needs
        if done % steps_per_epoch == 0 or done == args.total_steps:
            clock.pause()
            bookkeeping.save_run(
                run_dir,
                SCRIPT,
                args,
                done,
                clock,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                labeled_sampler=labeled_batches.state_dict(),
                unlabeled_sampler=unlabeled_batches.state_dict(),
                last_log_step=last_log_step,
                sums=sums,
                totals=totals,
                valid_error=valid_error,
                test_error=test_error,
                best_valid=best_valid,
                test_at_best=test_at_best,
                nn_seconds=nn_seconds,
                last_epochs=last_epochs,
                negatives_rng=negatives_rng.get_state(),
            )
            clock.start()

    wrong_share = (100.0 * totals["wrong"] / totals["negatives"]).item() if totals["negatives"] > 0 else None
    summary = bookkeeping.write_summary(
        writer,
        run_dir,
        {
            "steps": args.total_steps,
            "epochs": args.total_steps / steps_per_epoch,
            **clock.summary(),
            "mean_last_test_error": mean_error(last_epochs),
            "mean_of": len(last_epochs),  # epochs in the mean (fewer when the run has fewer)
            "final_test_error": test_error,
            "final_valid_error": valid_error,
            "best_valid_error": best_valid,
            "test_error_at_best_valid": test_at_best,
            "negatives": args.negatives,
            "wrong_negative_share": wrong_share,  # % of chosen negative labels that were the true class
            "rows_with_wrong_negative": (100.0 * totals["rows_hit"] / totals["rows"]).item()
            if totals["rows"] > 0
            else None,  # % of unlabeled images whose negatives contained the true class
            "negatives_per_sample": (totals["negatives"] / totals["rows"]).item() if totals["rows"] > 0 else None,
            "nn_preprocess_seconds": nn_seconds,
            **nn_stats,
        },
        args,
        reported=("mean_last_test_error",),
    )
    share = f"{wrong_share:.2f}%" if wrong_share is not None else "n/a"
    print(
        f"done: {args.negatives} {args.total_steps} steps, mean test error of the last {len(last_epochs)} epochs "
        f"{mean_error(last_epochs):.2f}% (final {test_error:.2f}%), wrong negatives "
        f"{share}, {summary['steps_per_second'] or 0:.1f} steps/s -> {run_dir}"
    )


if __name__ == "__main__":
    main()
