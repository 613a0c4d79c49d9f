"""Supervised baseline, plus Pseudo-Label, Entropy Minimisation and NS3L as flags (Protocol A).

Follows the NS3L paper (Chen et al., "Negative Sampling in Semi-Supervised Learning", ICML 2020) section 4, which
follows Oliver et al. 2018 ("Realistic evaluation of deep SSL") with 200k steps, ramp-up 50k and LR decay at 130k:
WRN-28-2, Adam (no weight decay), batches of 50 labeled + 50 unlabeled images (100 labeled images when no unlabeled
term is on: Oliver et al.'s dataset_mode=labeled, train_model.py:85-90 and lib/data_provider.py:130-132, added
for the fully supervised runs in their PR #7, whose run files spell it --dataset_model; the PyTorch port's
train.py:71-75 trains supervised on 100 labeled images), labeled and unlabeled sets disjoint
(NS3L paper 4.1 counts; --include-labeled for Oliver et al.'s TF stream), test error at the lowest validation error.
NS3L (paper Algorithm 1, section 4.3): the classes whose detached predicted probability on an unlabeled image is below
the threshold T are its negatives, and the loss is -log(1 - sum of their probabilities).

    python train_supervised.py --dataset cifar10 --num-labeled 4000 --ns3l
    python train_supervised.py --dataset digits --ns3l      # a CPU run of a few minutes (digits defaults, --help)

Deviations and choices (also in the README):
- The NS3L loss reuses the training forward pass of the unlabeled batch (paper Algorithm 1 / section 4.3). The
  authors' released function (johnchenresearch/NS3L ns3l.py:21-27) instead runs a new forward pass with BatchNorm
  statistics frozen; with perrying's WRN, which augments inside forward (lib/wrn.py:89-91), that pass sees a fresh
  augmentation of the same images: --ns3l-extra-pass does exactly that.
- One forward pass over [labeled; unlabeled] (one set of BatchNorm batch statistics), as Oliver et al. do.
- Pseudo-Label and NS3L weights are ramped by exp(-5 (1 - t)^2); the entropy penalty is not (Oliver et al.).
- Pseudo-Label loss: mean over all unlabeled rows of mask * cross-entropy to the argmax (Oliver et al.).
"""

import math
import sys

import torch
import torch.nn.functional as F

import bookkeeping
import common
import wrn

SCRIPT = "train_supervised"

# ------------------------------------------------------------------------------------------- defaults per data set
# One row per --dataset: a flag left unset takes its row's value in resolve_defaults(), the one place defaults are
# resolved. The paper's data sets: 200k steps, LR decay at 130k, ramp-up 50k (NS3L paper 4.1, the shortening of
# Oliver et al.'s train_model.py:53-55), WRN-28-2, BN momentum 0.001 (TF 1's default decay 0.999 in Oliver et
# al.'s lib/networks.py:98-103), evaluation every 5k steps, and section 4.1's splits (CIFAR-10 4,000 labels, SVHN 1,000,
# CIFAR-100 10,000; validation 5,000 / 7,325 as Oliver et al.'s build_label_map.py). digits and synthetic get a CPU
# run (this project's choice, a few minutes on two cores): WRN-10-2, 2,000 steps, BN momentum 0.01.
# The tables, kept as tables by the formatter:
# fmt: off
PAPER = dict(num_labeled=4000, num_valid=5000, total_steps=200_000, lr_decay_step=130_000, rampup_steps=50_000,
             eval_every=5000, depth=28, bn_momentum=0.001)
CPU = dict(total_steps=2000, lr_decay_step=1500, rampup_steps=500, eval_every=500, depth=10, bn_momentum=0.01)
DEFAULTS = {
    "cifar10": PAPER,
    "cifar100": PAPER | dict(num_labeled=10_000),
    "svhn": PAPER | dict(num_labeled=1000, num_valid=7325),
    "stl10": PAPER | dict(num_labeled=1000, num_valid=1000),
    "fashion_mnist": PAPER | dict(num_labeled=1000),
    "mnist": PAPER | dict(num_labeled=100),
    "npz": PAPER | dict(num_labeled=1000, num_valid=1000),
    "digits": CPU | dict(num_labeled=100, num_valid=200),
    "synthetic": CPU | dict(num_labeled=40, num_valid=50),
}
SOURCES = {"cifar10, cifar100, svhn": "NS3L paper section 4.1 / Oliver et al. 2018 (docs/fidelity.md, file and line)",
           "stl10, fashion_mnist, mnist, npz": "the paper's schedule; the split sizes are this project's",
           "digits, synthetic": "a CPU run, this project's choice (a few minutes on two cores)",
           "every data set": "lr 3e-3 (3e-4 with --pseudo-label, 6e-4 with --ns3l), batch 50 + 50 (100 labeled "
                             "without an unlabeled term), T = 0.4 / classes: NS3L paper 4.4, Oliver et al. Table 5"}
# fmt: on
TABLE = "per --dataset, see the table below"


def parse_args(argv=None):
    pos, nonneg, rate, unit = (
        bookkeeping.positive_int,
        bookkeeping.nonnegative_int,
        bookkeeping.nonnegative_float,
        bookkeeping.open_unit,
    )
    parser = bookkeeping.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=bookkeeping.defaults_epilog(DEFAULTS, SOURCES)
    )
    g = parser.add_argument_group("experiment")
    bookkeeping.add_run_args(g)  # --seed, --runs-dir, --run-name, --resume
    bookkeeping.add_device_args(g)
    g.add_argument("--eval-every", type=pos, help=f"steps between evaluations and checkpoints ({TABLE})")
    g.add_argument("--log-every", type=pos, default=100, help="steps between logged scalars")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help=f"{', '.join(common.DATASET_NAMES)} or a path to an .npz "
                   "(x_train, y_train, x_test, y_test)")  # fmt: skip
    g.add_argument("--data-dir", default="data", help="torchvision data root")
    g.add_argument("--download", action="store_true", help="let torchvision download the data set")
    g.add_argument("--svhn-extra", action="store_true", help="SVHN: add the 531k 'extra' images to the unlabeled "
                   "stream")  # fmt: skip
    g.add_argument("--num-labeled", type=pos, help=f"labeled images ({TABLE})")
    g.add_argument("--num-valid", type=pos, help="validation images held out of train; the reported test error is "
                   f"taken at the best validation error ({TABLE})")  # fmt: skip
    g.add_argument("--include-labeled", action="store_true", help="also put the labeled images in the unlabeled "
                   "stream, as Oliver et al.'s TF data provider does (default: disjoint sets, as the NS3L paper counts "
                   "them and the PyTorch port builds them)")  # fmt: skip
    g = parser.add_argument_group("optimisation")
    g.add_argument("--total-steps", type=pos, help=f"training steps ({TABLE})")
    g.add_argument("--batch-size", type=pos, help="labeled images per step (default: 50, with 50 unlabeled, when "
                   "--pseudo-label / --entmin / --ns3l is on; 100 for the supervised baseline, Oliver et al.'s "
                   "dataset_mode=labeled)")  # fmt: skip
    g.add_argument("--unlabeled-batch-size", type=pos, help="unlabeled images per step (default: = --batch-size)")
    g.add_argument("--lr", type=bookkeeping.positive_float, help="Adam learning rate (default, NS3L paper / Oliver et "
                   "al.: 3e-3 supervised, 6e-4 with --ns3l, 3e-4 with --pseudo-label)")  # fmt: skip
    g.add_argument("--lr-decay-step", type=nonneg, help=f"step of the LR decay ({TABLE})")
    g.add_argument("--lr-decay-factor", type=rate, default=0.2, help="LR multiplier at --lr-decay-step (Oliver et al.)")
    g.add_argument("--rampup-steps", type=nonneg, help=f"exp(-5(1-t)^2) ramp of the unlabeled weights ({TABLE})")
    g.add_argument("--depth", type=bookkeeping.wrn_depth, help=f"WRN depth, 6n + 4 ({TABLE})")
    g.add_argument("--width", type=pos, default=2, help="WRN widening factor")
    g.add_argument("--bn-momentum", type=bookkeeping.momentum, help="BatchNorm running-stat momentum; 0.001 = TF's "
                   f"decay 0.999 ({TABLE})")  # fmt: skip
    g = parser.add_argument_group("pseudo-label / entropy minimisation")
    g.add_argument("--pseudo-label", action="store_true", help="add Pseudo-Label (Lee 2013)")
    g.add_argument("--pl-threshold", type=unit, default=0.95, help="confidence for a pseudo-label (Oliver et al.)")
    g.add_argument("--pl-weight", type=rate, default=1.0, help="Pseudo-Label weight (Oliver et al.)")
    g.add_argument("--entmin", action="store_true", help="add entropy minimisation on unlabeled predictions")
    g.add_argument("--entmin-weight", type=rate, default=0.1, help="entropy weight (Oliver et al., VAT + EntMin)")
    g = parser.add_argument_group("ns3l")
    g.add_argument("--ns3l", action="store_true", help="add the NS3L loss (paper Algorithm 1)")
    g.add_argument("--ns3l-weight", type=rate, default=1.0, help="lambda_1 (NS3L paper 4.4: 1)")
    g.add_argument("--threshold", type=unit, help="T: classes below it are negatives (default 0.4 / num_classes: 0.04 "
                   "for 10, 0.004 for 100)")  # fmt: skip
    g.add_argument("--ns3l-extra-pass", action="store_true", help="compute NS3L on a new forward pass of the whole "
                   "batch, freshly augmented, with frozen BN statistics (authors' released ns3l.py); costs one more "
                   "forward pass per step")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        key = common.dataset_key(args.dataset)
    except common.DataError as error:
        parser.error(str(error))
    return resolve_defaults(args, key, common.DATASETS[key]["num_classes"])


def resolve_defaults(args, key, num_classes):
    """Every flag left unset: its data set's row of DEFAULTS, then the values that depend on the method. Called again
    once the data are loaded, when an .npz's number of classes (and so T) becomes known; a resumed run's saved
    arguments are all set already."""
    bookkeeping.fill_defaults(args, DEFAULTS, key)
    if args.batch_size is None:  # Oliver et al.: batch 100, half unlabeled unless dataset_mode=labeled
        args.batch_size = 50 if args.ns3l or args.pseudo_label or args.entmin else 100
    if args.unlabeled_batch_size is None:
        args.unlabeled_batch_size = args.batch_size
    if args.lr is None:  # the paper's learning rates (NS3L section 4.4, Oliver et al. Table 5)
        args.lr = 3e-4 if args.pseudo_label else 6e-4 if args.ns3l else 3e-3
    if args.threshold is None and num_classes:  # T = 0.04 for 10 classes, divided by 10 for CIFAR-100 (section 4.4)
        args.threshold = 0.4 / num_classes
    return args


def ns3l_negatives(logits, threshold):
    """Negative labels: classes whose predicted probability is below ``threshold`` (detached; no gradient)."""
    return torch.softmax(logits.detach().float(), dim=1) < threshold


def ns3l_loss(logits, negatives):
    """Mean over rows of -log(1 - sum_{k in negatives} p_k), in the stable form
    log(1 - sum_neg p) = logsumexp(logits of non-negatives) - logsumexp(logits), clamped at 1e-8 like the authors'."""
    logits = logits.float()
    log_keep = torch.logsumexp(logits.masked_fill(negatives, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)
    return -log_keep.clamp_min(math.log(1e-8)).mean()


def pseudo_label_loss(logits, threshold):
    """Cross-entropy to the argmax for rows whose max probability exceeds ``threshold``, averaged over all rows."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    confidence, targets = probs.max(dim=1)
    mask = (confidence > threshold).float()  # strict, as tf.greater in Oliver et al.
    return (F.cross_entropy(logits.float(), targets, reduction="none") * mask).mean(), mask, targets


def entropy_loss(logits):
    """Mean entropy -sum_k p_k log p_k of the predictions (gradient flows through p)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1).mean()


def hidden_label_stats(y_hidden, negatives=None, pl_mask=None, pl_targets=None):
    """Diagnostics from the hidden labels of the unlabeled batch, which never enter a loss (-1 = no label, skipped):
    NS3L's negatives per image and the rate at which an image's true class was among its negatives; Pseudo-Label's
    mask rate and the accuracy of its confident pseudo-labels. Returns {tag: device scalar}."""
    known, stats = y_hidden >= 0, {}
    if negatives is not None:
        hit = negatives.gather(1, y_hidden.clamp_min(0)[:, None]).squeeze(1) & known
        stats["charts/ns3l_negatives_per_sample"] = negatives.sum(1).float().mean()
        stats["charts/ns3l_false_negative_rate"] = hit.sum() / known.sum().clamp_min(1)
    if pl_mask is not None:
        confident = pl_mask.bool() & known
        stats["charts/pl_mask_rate"] = pl_mask.mean()
        stats["charts/pl_accuracy"] = ((pl_targets == y_hidden) & confident).sum() / confident.sum().clamp_min(1)
    return stats


def rampup(step, rampup_steps):
    """Oliver et al.'s sigmoid-shaped ramp exp(-5 (1 - t)^2), t = step / rampup_steps, 1 after the ramp."""
    if rampup_steps == 0 or step >= rampup_steps:
        return 1.0
    t = step / rampup_steps
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))


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
        shift = common.augmentation_defaults(args.dataset)[1]  # augment's reflect padding folds offsets < a side only
        common.require_image_size(data, shift + 1, f"the random translation by up to {shift} px (reflect padding)")
        args = resolve_defaults(args, data.name, data.num_classes)  # an .npz's T, now that its classes are known
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
    bookkeeping.warn_bn_momentum(args.bn_momentum, args.total_steps)
    flip, shift, noise_std = common.augmentation_defaults(args.dataset)
    normalize = common.make_normalizer(data)
    uses_unlabeled = args.ns3l or args.pseudo_label or args.entmin

    model = wrn.WideResNet(data.num_classes, args.depth, args.width, data.channels, bn_momentum=args.bn_momentum).to(
        device, memory_format=memory_format
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # default betas, no weight decay (Oliver et al.)
    labeled_batches = common.BatchSampler(split.labeled.to(device), args.batch_size)
    unlabeled_batches = common.BatchSampler(split.unlabeled.to(device), args.unlabeled_batch_size)
    start_step, best_valid, test_at_best = 0, float("inf"), float("nan")
    clock = bookkeeping.TrainClock(device)  # training time and steps, without evaluation (and compilation)
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
            start_step, best_valid, test_at_best = (checkpoint[k] for k in ("step", "best_valid", "test_at_best"))
            print(f"resumed {args.resume} at step {start_step}")
    run_dir, writer = bookkeeping.open_run(args, SCRIPT, split, checkpoint)  # made (or reopened) only now

    def augment(images):  # normalised images -> one stochastic view (fresh flip / shift / noise per sample and call)
        return common.augment(images, flip, shift, noise_std).contiguous(memory_format=memory_format)

    sums = {}  # running sums of logged scalars, kept on the device so the loop never waits for the GPU

    def accumulate(name, value):
        sums[name] = sums.get(name, 0.0) + value.detach().float()

    valid_x, valid_y = data.x_train[split.valid.to(device)], data.y_train[split.valid.to(device)]
    valid_error = test_error = float("nan")
    net = bookkeeping.compile_model(model, args, device)  # the training passes; evaluation and checkpoints use model
    model.train()
    last_log_step = start_step
    clock.start()
    for step in range(start_step, args.total_steps):
        # ALGO LOGIC: Adam with one step decay (x0.2 at 130k) and the ramped unlabeled weight
        lr = args.lr * (args.lr_decay_factor if step >= args.lr_decay_step else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ramp = rampup(step, args.rampup_steps)
        labeled_idx = next(labeled_batches)
        y, indices = data.y_train[labeled_idx], labeled_idx
        if uses_unlabeled:
            unlabeled_idx = next(unlabeled_batches)
            indices = torch.cat([labeled_idx, unlabeled_idx])
        images = normalize(data.x_train[indices])  # gathered on the device, before augmentation
        with amp:
            logits = net(augment(images)).float()
        logits_l, logits_u = logits[: len(y)], logits[len(y) :]
        loss_sup = F.cross_entropy(logits_l, y)
        loss = loss_sup
        accumulate("losses/supervised", loss_sup)
        negatives = mask = targets = None  # what the diagnostics read
        if args.ns3l:
            negatives = ns3l_negatives(logits_u, args.threshold)
            ns3l_logits = logits_u
            if args.ns3l_extra_pass:
                # the whole batch again, as the authors' ns3l.py, with a fresh augmentation (theirs runs inside
                # the network's forward); BN running statistics untouched; the loss uses its unlabeled rows
                with amp, wrn.no_bn_update(net):
                    ns3l_logits = net(augment(images)).float()[len(y) :]
            loss_ns3l = ns3l_loss(ns3l_logits, negatives)
            loss = loss + args.ns3l_weight * ramp * loss_ns3l
            accumulate("losses/ns3l", loss_ns3l)
        if args.pseudo_label:
            loss_pl, mask, targets = pseudo_label_loss(logits_u, args.pl_threshold)
            loss = loss + args.pl_weight * ramp * loss_pl
            accumulate("losses/pseudo_label", loss_pl)
        if args.entmin:
            loss_ent = entropy_loss(logits_u)
            loss = loss + args.entmin_weight * loss_ent
            accumulate("losses/entropy", loss_ent)
        accumulate("losses/total", loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step(compiled=net is not model)  # a compiled leg's first step compiles: timed apart
        if uses_unlabeled:  # DIAGNOSTICS, outside the algorithm: what the unlabeled batch's hidden labels say
            for name, value in hidden_label_stats(data.y_train[unlabeled_idx], negatives, mask, targets).items():
                accumulate(name, value)

        done = step + 1
        # LOGGING: means since the last log; SPS over training time only
        if done % args.log_every == 0 or done == args.total_steps:
            sps = clock.lap()
            means = bookkeeping.interval_means(sums, done - last_log_step)
            bookkeeping.write_scalars(
                writer,
                done,
                means | {"charts/learning_rate": lr, "charts/unlabeled_weight_ramp": ramp, "charts/SPS": sps},
            )
            print(bookkeeping.progress_line(done, args.total_steps, sps, loss=means["losses/total"], lr=lr), flush=True)
            sums, last_log_step = {}, done
        # EVAL (Protocol A, Oliver et al. 2018 section 4.1): the reported number is the test error at the lowest
        # validation error so far (the first evaluation sets it)
        if done % args.eval_every == 0 or done == args.total_steps:
            clock.pause()
            valid_error = bookkeeping.error_rate(model, valid_x, valid_y, normalize, memory_format=memory_format)
            test_error = bookkeeping.error_rate(model, data.x_test, data.y_test, normalize, memory_format=memory_format)
            if valid_error < best_valid:
                best_valid, test_at_best = valid_error, test_error
            bookkeeping.write_scalars(
                writer,
                done,
                {
                    "eval/valid_error": valid_error,
                    "eval/test_error": test_error,
                    "eval/test_error_at_best_valid": test_at_best,
                },
            )
            print(
                f"eval step {done}: valid error {valid_error:.2f}% test error {test_error:.2f}% "
                f"(test at best valid {test_at_best:.2f}%)",
                flush=True,
            )
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
                best_valid=best_valid,
                test_at_best=test_at_best,
            )
            clock.start()

    summary = bookkeeping.write_summary(
        writer,
        run_dir,
        {
            "steps": args.total_steps,
            **clock.summary(),
            "final_valid_error": valid_error,
            "final_test_error": test_error,
            "best_valid_error": best_valid,
            "test_error_at_best_valid": test_at_best,
        },
        args,
        reported=("test_error_at_best_valid", "best_valid_error"),
    )
    print(
        f"done: {args.total_steps - start_step} steps, test error at best valid {test_at_best:.2f}% (best valid "
        f"{best_valid:.2f}%), final test {test_error:.2f}%, {summary['steps_per_second'] or 0:.1f} steps/s -> {run_dir}"
    )


if __name__ == "__main__":
    main()
