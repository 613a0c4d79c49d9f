"""Training speed as ratios measured side by side: NS3L overhead per method, NS3L alone vs VAT, the share of a
training step spent producing the batch, and torch.compile / memory format per method.

    python benchmark/speed.py                      # everything but the compile group, 2 rounds (~22 min, 2-core CPU)
    python benchmark/speed.py --rounds 3 --steps 60 --depth 10 --width 2
    python benchmark/speed.py --only batch         # just the in-process batch-production share
    python benchmark/speed.py --only fixmatch --depth 28 --width 2   # RandAugment's share of a FixMatch step
    python benchmark/speed.py --only compile       # compiled vs eager x channels_last vs contiguous, WRN-28-2
    python benchmark/speed.py --compile --only inprocess pseudo-label vat pi mixmatch   # the targets, compiled
    python benchmark/speed.py --dry-run            # print the commands

Method. Every command of a group runs on the same synthetic 32x32x3 data set (an .npz written once, so every
script sees identical images) and the same WRN, one process at a time with OMP_NUM_THREADS=--threads, and the
commands of a group are alternated (A, B, C, A, B, C, ...) so that load drift on a shared machine hits all of them
alike. Each run's ``steps_per_second`` comes from its summary.json (training steps only; evaluation, start-up, data
loading and, with --compile, the compiling first step excluded). A ratio is computed within each round and the median
over rounds is reported, with the range. Overhead of X over Y = time per step of X / time per step of Y - 1 =
sps(Y) / sps(X) - 1.

The batch-production share is measured in this process: ``common``'s gather (BatchSampler + index into the uint8
images) -> normalise -> augment of a 50 labeled + 50 unlabeled batch, against a full NS3L training step of the
same WRN on the same batch (batch production included), alternated ``--batch-repeats`` times; share = median batch
time / median step time.

The compile group (``--only compile``) times one training step of each method (the scripts' own loss functions,
forward + backward + Adam) at the paper's batch sizes (Protocol A 50 + 50, MixMatch 64 + 2 x 64) on WRN-28-2 in
four combinations, each on its own copy of the same weights: contiguous / channels_last x eager / torch.compile,
all four once per iteration in a fresh random order, and reports images/s and the median per-iteration speed-up
over eager contiguous. The first call of each compiled step (compilation) is reported apart.

The FixMatch group (``--only fixmatch``) times train_fixmatch.py's step at the official batch (64 labeled + 7 x 64
unlabeled, weak and strong views: 960 images) on --depth / --width, alternated with the strong views' RandAugment +
Cutout alone and with the step + NS3L; RandAugment's share = its median time / the median step time.

Targets (issues 9, 15 and 17): NS3L overhead <= 3 %, NS3L alone >= 2x the steps/s of VAT, batch production < 5 % of a
step, RandAugment < 10 % of a FixMatch step (CPU); the MixMatch step with --compile and the faster memory format
>= 1.25x the images/s of both off (CPU).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"ns3l_overhead": 0.03, "ns3l_vs_vat": 2.0, "batch_share": 0.05, "randaugment_share": 0.10}


# ------------------------------------------------------------------------------------------------- ratio arithmetic
def overhead(sps_base, sps_with):
    """Extra time per step of the 'with' run over the base run: sps_base / sps_with - 1 (0.03 = 3 % slower)."""
    return sps_base / sps_with - 1.0


def speedup(sps_fast, sps_slow):
    """How many times more steps per second the first run makes."""
    return sps_fast / sps_slow


def paired(rounds, a, b, fn):
    """Apply fn(sps[a], sps[b]) within each round (a dict name -> sps) that has both; return the per-round values."""
    return [fn(r[a], r[b]) for r in rounds if r.get(a) and r.get(b)]


def summarise(values):
    """(median, min, max) of per-round ratios, or (None, None, None)."""
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


# ----------------------------------------------------------------------------------------------------- the groups
def make_npz(path, num_train=1000, num_test=100, size=32, channels=3, num_classes=10, seed=0):
    """A learnable synthetic image set (class prototypes + noise), uint8 NCHW, identical for every script."""
    rng = np.random.RandomState(seed)
    prototypes = rng.uniform(0, 255, size=(num_classes, channels, size // 4, size // 4)).repeat(4, 2).repeat(4, 3)

    def draw(n):
        labels = np.arange(n) % num_classes
        images = prototypes[labels] + rng.normal(0, 40, size=(n, channels, size, size))
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def groups(npz, steps, depth, width, compiled=False):
    """{group: {label: argv}}; the labels of one group are alternated and compared. ``compiled``: the WRN scripts
    run with --compile (their steps/s leaves the compiling first step out)."""
    common_flags = [
        "--dataset",
        npz,
        "--num-labeled",
        "200",
        "--num-valid",
        "100",
        "--depth",
        str(depth),
        "--width",
        str(width),
        "--total-steps",
        str(steps),
        "--eval-every",
        str(steps),
        "--log-every",
        str(steps),
        "--no-cuda",
    ] + (["--compile"] if compiled else [])
    protocol_a = common_flags + ["--rampup-steps", "0"]  # full unlabeled weights from step 0: all losses active
    return {
        "pseudo-label": {
            "PL": ["train_supervised.py", "--pseudo-label"] + protocol_a,
            "PL+NS3L": ["train_supervised.py", "--pseudo-label", "--ns3l"] + protocol_a,
        },
        "vat": {
            "VAT": ["train_vat.py"] + protocol_a,
            "VAT+NS3L": ["train_vat.py", "--ns3l"] + protocol_a,
            "NS3L": ["train_supervised.py", "--ns3l"] + protocol_a,
        },
        "pi": {"Pi": ["train_pi.py"] + protocol_a, "Pi+NS3L": ["train_pi.py", "--ns3l"] + protocol_a},
        "mixmatch": {
            "MixMatch": ["train_mixmatch.py"] + common_flags + ["--rampup-steps", "1"],
            "MixMatch+NS3L": ["train_mixmatch.py", "--ns3l"] + common_flags + ["--rampup-steps", "1"],
        },
        # The other scripts have no NS3L-off twin here; their steps/s is reported for completeness.
        "others": {
            "Supervised": ["train_supervised.py"] + protocol_a,
            "FMNIST-ablation(threshold)": [
                "train_fmnist_ablation.py",
                "--dataset",
                npz,
                "--num-labeled",
                "200",
                "--num-valid",
                "100",
                "--negatives",
                "threshold",
                "--total-steps",
                str(steps),
                "--eval-every",
                str(steps),
                "--log-every",
                str(steps),
                "--no-cuda",
            ],
            "XC(adversarial,planted)": [
                "train_xc.py",
                "--dataset",
                "planted",
                "--num-classes",
                "4096",
                "--method",
                "adversarial",
                "--total-steps",
                str(steps),
                "--eval-every",
                str(steps),
                "--log-every",
                str(steps),
                "--no-cuda",
            ],
        },
    }


# Which per-round ratios to print: (label, group, a, b, kind, target key)
RATIOS = [
    ("NS3L overhead on Pseudo-Label", "pseudo-label", "PL", "PL+NS3L", "overhead", "ns3l_overhead"),
    ("NS3L overhead on VAT", "vat", "VAT", "VAT+NS3L", "overhead", "ns3l_overhead"),
    ("NS3L overhead on Pi", "pi", "Pi", "Pi+NS3L", "overhead", "ns3l_overhead"),
    ("NS3L overhead on MixMatch", "mixmatch", "MixMatch", "MixMatch+NS3L", "overhead", "ns3l_overhead"),
    ("NS3L alone vs VAT (speed-up)", "vat", "NS3L", "VAT", "speedup", "ns3l_vs_vat"),
]


def run_once(argv, runs_dir, name, threads):
    """Run one command to completion; return its summary.json steps_per_second (None if it failed)."""
    script = os.path.join(ROOT, argv[0])
    command = [sys.executable, script] + argv[1:] + ["--runs-dir", runs_dir, "--run-name", name]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    summary = os.path.join(runs_dir, name, "summary.json")
    if result.returncode != 0 or not os.path.exists(summary):
        print(f"  ! {name} failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    with open(summary) as f:
        return json.load(f).get("steps_per_second")


def measure_scripts(selected, rounds, steps, depth, width, threads, workdir, compiled=False):
    """{group: [ {label: sps}, ... one dict per round ]}, commands alternated within each round."""
    npz = make_npz(os.path.join(workdir, "speed_synthetic.npz"))
    results = {}
    for group, commands in groups(npz, steps, depth, width, compiled).items():
        if group not in selected:
            continue
        results[group] = []
        for r in range(rounds if group != "others" else 1):
            measured = {}
            for label, argv in commands.items():
                name = f"{group}_{label}_{r}".replace("+", "p").replace("(", "_").replace(")", "").replace(",", "_")
                measured[label] = run_once(argv, os.path.join(workdir, "runs"), name, threads)
                print(f"  round {r + 1} {label:28s} {measured[label] or float('nan'):7.3f} steps/s", flush=True)
            results[group].append(measured)
    return results


# ----------------------------------------------------------------------------------------- batch production share
def measure_batch_share(repeats, depth, width, threads, batch_size=50, dataset="fashion_mnist"):
    """Median time to produce a labeled + unlabeled batch vs median time of a full NS3L step, alternated."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    import common
    import wrn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:
        data = common.load_dataset(dataset)
    except common.DataError:
        data = common.load_dataset("synthetic")
    split = common.make_ssl_split(
        data.y_train,
        data.num_classes,
        1000 if len(data.y_train) > 5000 else 40,
        min(1000, len(data.y_train) // 10),
        seed=1,
        num_labelable=data.num_labelable,
    )
    flip, shift, noise = common.augmentation_defaults(data.name)
    normalize = common.make_normalizer(data)
    labeled = common.BatchSampler(split.labeled, batch_size)
    unlabeled = common.BatchSampler(split.unlabeled, batch_size)
    model = wrn.WideResNet(data.num_classes, depth, width, data.channels, bn_momentum=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=6e-4)

    def produce():  # what train_supervised.py does per step: gather, normalise, augment (here per half)
        li, ui = next(labeled), next(unlabeled)
        x = torch.cat(
            [
                common.augment(normalize(data.x_train[li]), flip, shift, noise),
                common.augment(normalize(data.x_train[ui]), flip, shift, noise),
            ]
        )
        return x, data.y_train[li]

    def step():  # batch + forward + supervised CE + NS3L (threshold 0.04) + backward + Adam
        x, y = produce()
        logits = model(x)
        logits_l, logits_u = logits[: len(y)], logits[len(y) :]
        negatives = torch.softmax(logits_u.detach(), 1) < 0.04
        keep = torch.logsumexp(logits_u.masked_fill(negatives, float("-inf")), 1) - torch.logsumexp(logits_u, 1)
        loss = F.cross_entropy(logits_l, y) - keep.clamp_min(-18.42).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up (allocator, first-call overheads)
        step()
    batch_times, step_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        produce()
        batch_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - start)
    share = statistics.median(batch_times) / statistics.median(step_times)
    return {
        "dataset": data.name,
        "batch_ms": 1e3 * statistics.median(batch_times),
        "step_ms": 1e3 * statistics.median(step_times),
        "share": share,
    }


# ------------------------------------------------------------------------------------ FixMatch: RandAugment share
def measure_fixmatch(repeats, depth, width, threads, batch_size=64, uratio=7, size=32):
    """FixMatch's training step rebuilt from train_fixmatch.py's own functions (uint8 gather, weak views, the strong
    view's RandAugment + Cutout, one pass over [labeled; weak; strong], losses, SGD, EMA) at the official batch
    (64 + 7 x 64, two views each), alternated with the strong-view RandAugment alone on a batch of the same size, and
    the step with --ns3l. Share = median RandAugment time / median step time (the step includes it)."""
    import copy

    import torch

    sys.path.insert(0, ROOT)
    import common
    import train_fixmatch as fm
    import wrn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    prototypes = rng.uniform(0, 255, size=(10, 3, size // 4, size // 4)).repeat(4, 2).repeat(4, 3)
    labels = np.arange(4 * batch_size * uratio) % 10
    images = np.clip(prototypes[labels] + rng.normal(0, 40, size=(len(labels), 3, size, size)), 0, 255)
    x_all, y_all = torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels)
    model = wrn.WideResNet(10, depth, width, 3, conv_bias=True, bn_momentum=0.001).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.SGD(fm.optimizer_groups(model, 5e-4), lr=0.03, momentum=0.9, nesterov=True)
    normalize = common.Normalizer("scale")
    labeled = common.BatchSampler(torch.arange(len(y_all) // 8), batch_size)
    unlabeled = common.BatchSampler(torch.arange(len(y_all)), batch_size * uratio)

    def strong_only():
        idx = next(unlabeled)
        start = time.perf_counter()
        common.rand_augment(common.augment(x_all[idx], True, size // 8), 2, 10, probability=0.5, cutout=size // 2)
        return time.perf_counter() - start

    def step(ns3l):
        start = time.perf_counter()
        li, ui = next(labeled), next(unlabeled)
        weak_u = common.augment(x_all[ui], True, size // 8)
        strong = common.rand_augment(common.augment(x_all[ui], True, size // 8), 2, 10, probability=0.5, cutout=16)
        batch = torch.cat([common.augment(x_all[li], True, size // 8), weak_u, strong])
        logits = model(normalize(batch).contiguous(memory_format=torch.channels_last))
        n, u = len(li), len(ui)
        loss_xe, loss_xeu, probs, _, _ = fm.fixmatch_losses(
            logits[:n], y_all[li], logits[n : n + u], logits[n + u :], 0.95
        )
        loss = loss_xe + loss_xeu
        if ns3l:
            loss = loss + fm.ns3l_loss(logits[n + u :], fm.ns3l_negatives(probs, 0.05))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        fm.ema_update_(ema, model, 0.999)
        return time.perf_counter() - start

    variants = {"randaugment": strong_only, "FixMatch": lambda: step(False), "FixMatch+NS3L": lambda: step(True)}
    for fn in variants.values():  # warm-up
        fn()
    times = {label: [] for label in variants}
    order = list(variants)
    shuffler = np.random.RandomState(1)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for label in order:
            times[label].append(variants[label]())
    medians = {label: statistics.median(t) for label, t in times.items()}
    ns3l = [b / a - 1.0 for a, b in zip(times["FixMatch"], times["FixMatch+NS3L"])]
    return {
        "depth": depth,
        "width": width,
        "images_per_step": batch_size * (1 + 2 * uratio),
        "randaugment_ms": 1e3 * medians["randaugment"],
        "step_ms": 1e3 * medians["FixMatch"],
        "ns3l_step_ms": 1e3 * medians["FixMatch+NS3L"],
        "share": medians["randaugment"] / medians["FixMatch"],
        "ns3l_overhead": statistics.median(ns3l),
    }


def format_fixmatch(result):
    return (
        f"FixMatch, WRN-{result['depth']}-{result['width']}, {result['images_per_step']} images per step: "
        f"RandAugment + Cutout of the strong views {result['randaugment_ms']:.1f} ms of a {result['step_ms']:.0f} ms "
        f"step = {100 * result['share']:.1f} % (target < {100 * TARGETS['randaugment_share']:.0f} %: "
        f"{'met' if result['share'] < TARGETS['randaugment_share'] else 'MISSED'}); NS3L overhead per step "
        f"{100 * result['ns3l_overhead']:+.1f} % (median of per-iteration ratios; step with NS3L "
        f"{result['ns3l_step_ms']:.0f} ms)"
    )


# ------------------------------------------------------------------------- in-process, step-alternated overheads
def step_functions(net, batch_size, x_all, y_all, memory_format=None):
    """{label: (loss function, ns3l flag)}: one training step of each variant rebuilt from the scripts' own loss
    functions, every forward pass through ``net`` (a model or its torch.compile wrapper), inputs in
    ``memory_format`` (default contiguous)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    import train_mixmatch
    import train_pi
    import train_supervised
    import train_vat

    memory_format = memory_format or torch.contiguous_format

    def batch():
        idx = torch.randperm(len(x_all))[: 2 * batch_size]
        return x_all[idx].contiguous(memory_format=memory_format), y_all[idx[:batch_size]]

    def pl(ns3l):
        x, y = batch()
        logits = net(x)
        logits_l, logits_u = logits[:batch_size], logits[batch_size:]
        loss = F.cross_entropy(logits_l, y) + train_supervised.pseudo_label_loss(logits_u, 0.95)[0]
        if ns3l:
            loss = loss + train_supervised.ns3l_loss(logits_u, train_supervised.ns3l_negatives(logits_u, 0.04))
        return loss

    def ns3l_only(_=None):
        x, y = batch()
        logits = net(x)
        logits_u = logits[batch_size:]
        return F.cross_entropy(logits[:batch_size], y) + train_supervised.ns3l_loss(
            logits_u, train_supervised.ns3l_negatives(logits_u, 0.04)
        )

    def vat(ns3l):
        x, y = batch()
        logits = net(x)
        kl = train_vat.vat_loss(net, x, logits, 6.0)[0]
        loss = F.cross_entropy(logits[:batch_size], y) + 0.3 * kl[batch_size:].mean()
        if ns3l:
            logits_u = logits[batch_size:]
            loss = loss + 0.3 * train_vat.ns3l_loss(logits_u, train_vat.ns3l_negatives(logits_u, 0.04))
        return loss

    def pi(ns3l):
        x, y = batch()
        logits = net(x)
        target = train_pi.target_pass(net, x)
        logits_u = logits[batch_size:]
        loss = F.cross_entropy(logits[:batch_size], y) + 20 * train_pi.consistency_loss(logits_u, target[batch_size:])
        if ns3l:
            loss = loss + train_pi.ns3l_loss(logits_u, train_pi.ns3l_negatives(logits_u, 0.04))
        return loss

    def mixmatch(ns3l):  # K = 2 views of the unlabeled half, label guess, mixup, interleaved forward
        x, y = batch()
        x_l, views = x[:batch_size], [x[batch_size:], x[batch_size:].flip(3)]
        guessed = train_mixmatch.guess_labels(net, views, 0.5)
        targets = torch.cat([F.one_hot(y, 10).float(), guessed, guessed])
        mixed_inputs, mixed_targets, _, _ = train_mixmatch.mixup(torch.cat([x_l] + views), targets, 0.75)
        logits = torch.cat(
            train_mixmatch.interleaved_forward(net, list(mixed_inputs.split(batch_size)), memory_format=memory_format)
        )
        loss_xe, loss_l2u = train_mixmatch.mixmatch_losses(
            logits[:batch_size], mixed_targets[:batch_size], logits[batch_size:], mixed_targets[batch_size:]
        )
        loss = loss_xe + 75 * loss_l2u
        if ns3l:
            loss = loss + train_mixmatch.ns3l_loss(logits, train_mixmatch.ns3l_negatives(mixed_targets, 0.05))
        return loss

    return {
        "PL": (pl, False),
        "PL+NS3L": (pl, True),
        "NS3L": (ns3l_only, None),
        "VAT": (vat, False),
        "VAT+NS3L": (vat, True),
        "Pi": (pi, False),
        "Pi+NS3L": (pi, True),
        "MixMatch": (mixmatch, False),
        "MixMatch+NS3L": (mixmatch, True),
    }


def timed_step(fn, flag, optimizer):
    """Seconds of one training step: the loss of ``fn(flag)``, its backward and the optimiser step."""
    start = time.perf_counter()
    loss = fn(flag)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def measure_inprocess(repeats, depth, width, threads, batch_size=50, compiled=False, memory_format=None):
    """Step-by-step alternation inside one process (no start-up, no cross-run drift): the training step of each
    script rebuilt from the script's own functions (train_supervised / train_vat / train_pi / train_mixmatch), on
    the same WRN and the same 32x32x3 batches. Returns {label: median step seconds} and the per-pair medians of
    per-iteration ratios. ``compiled``: every pass through torch.compile(model) (the --compile path). A diagnostic
    for the subprocess numbers, which a loaded machine makes noisy."""
    import torch

    sys.path.insert(0, ROOT)
    import train_supervised
    import wrn

    memory_format = memory_format or torch.contiguous_format
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = wrn.WideResNet(10, depth, width, 3, bn_momentum=0.01).to(memory_format=memory_format)
    net = torch.compile(model, dynamic=False) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=6e-4)
    x_all = torch.rand(4 * batch_size, 3, 32, 32) * 2 - 1
    y_all = torch.randint(0, 10, (4 * batch_size,))
    variants = step_functions(net, batch_size, x_all, y_all, memory_format)

    def timed(fn, flag):
        return timed_step(fn, flag, optimizer)

    def loss_only():  # the NS3L work alone: negatives + loss + its backward on the unlabeled logits of a batch
        logits_u = torch.randn(batch_size, 10, requires_grad=True)
        start = time.perf_counter()
        train_supervised.ns3l_loss(logits_u, train_supervised.ns3l_negatives(logits_u, 0.04)).backward()
        return time.perf_counter() - start

    for fn, flag in variants.values():  # warm-up (and, compiled, every graph's compilation)
        timed(fn, flag)
    times = {label: [] for label in variants}
    times["NS3L-loss-only"] = []
    order = list(variants)
    shuffler = np.random.RandomState(0)
    for _ in range(repeats):
        shuffler.shuffle(order)  # a fresh order every iteration: no variant always runs after the same one
        for label in order:
            fn, flag = variants[label]
            times[label].append(timed(fn, flag))
        times["NS3L-loss-only"].append(statistics.median(loss_only() for _ in range(5)))
    return {label: statistics.median(t) for label, t in times.items()}, times


# Images per step at the paper's batch sizes: Protocol A 50 labeled + 50 unlabeled (Oliver et al., the scripts'
# defaults with an unlabeled term), MixMatch 64 labeled + 2 views x 64 unlabeled (official FLAGS.batch 64, nu 2).
PAPER_BATCH = {"PL": 50, "NS3L": 50, "VAT": 50, "Pi": 50, "MixMatch": 64}
IMAGES_PER_STEP = {"PL": 100, "NS3L": 100, "VAT": 100, "Pi": 100, "MixMatch": 192}


def measure_compile(
    repeats,
    depth,
    width,
    threads,
    methods=("PL", "VAT", "Pi", "MixMatch"),
    formats=("contiguous", "channels_last"),
    batch_sizes=None,
):
    """Compiled vs eager and channels_last vs contiguous, in-process and alternated: for each method, one training
    step (the scripts' own loss functions, forward + backward + Adam) in each (memory format, eager / compiled)
    combination on its own copy of one WRN, every combination once per iteration in a fresh random order.
    Returns {method: {"format/mode": {"median_s", "images_per_second", "first_call_s"}}} and per-iteration ratios
    against eager contiguous. Compile time (the first call of each compiled step) is reported, not timed."""
    import copy

    import torch

    sys.path.insert(0, ROOT)
    import wrn

    torch.set_num_threads(threads)
    batch_sizes = batch_sizes or PAPER_BATCH
    results, ratios = {}, {}
    for method in methods:
        batch_size = batch_sizes[method]
        torch.manual_seed(0)
        base = wrn.WideResNet(10, depth, width, 3, bn_momentum=0.01, conv_bias=method == "MixMatch")
        x_all = torch.rand(4 * batch_size, 3, 32, 32) * 2 - 1
        y_all = torch.randint(0, 10, (4 * batch_size,))
        combos = {}
        for fmt in formats:
            memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            for mode in ("eager", "compiled"):
                model = copy.deepcopy(base).to(memory_format=memory_format)
                net = torch.compile(model, dynamic=False) if mode == "compiled" else model
                fn, flag = step_functions(net, batch_size, x_all, y_all, memory_format)[method]
                combos[f"{fmt}/{mode}"] = (fn, flag, model, torch.optim.Adam(model.parameters(), lr=6e-4))

        def timed(label):
            fn, flag, _, optimizer = combos[label]
            return timed_step(fn, flag, optimizer)

        first = {label: timed(label) for label in combos}  # compiles; then one more warm-up call each
        for label in combos:
            timed(label)
        times = {label: [] for label in combos}
        order = list(combos)
        shuffler = np.random.RandomState(1)
        for _ in range(repeats):
            shuffler.shuffle(order)
            for label in order:
                times[label].append(timed(label))
        results[method] = {
            label: {
                "median_s": statistics.median(t),
                "images_per_second": IMAGES_PER_STEP[method] / statistics.median(t),
                "first_call_s": first[label],
            }
            for label, t in times.items()
        }
        reference = times[f"{formats[0]}/eager"]
        ratios[method] = {label: statistics.median(r / s for r, s in zip(reference, t)) for label, t in times.items()}
        print(format_compile({method: results[method]}, {method: ratios[method]}, depth, width), flush=True)
    return results, ratios


def format_compile(results, ratios, depth, width):
    lines = []
    for method, combos in results.items():
        reference = next(iter(combos))
        lines.append(
            f"{method} step, WRN-{depth}-{width}, {IMAGES_PER_STEP[method]} images per step (speed-up: median "
            f"of per-iteration ratios to {reference}):"
        )
        for label, r in combos.items():
            lines.append(
                f"  {label:24s} {1e3 * r['median_s']:8.0f} ms  {r['images_per_second']:7.1f} images/s  "
                f"x{ratios[method][label]:.2f}  (first call {r['first_call_s']:.1f} s)"
            )
    return "\n".join(lines)


def format_inprocess(medians, times):
    lines = [
        "in-process, step-alternated (median of per-iteration ratios; the script's own loss functions):",
        f"  NS3L negatives + loss + backward alone: {1e3 * medians['NS3L-loss-only']:.2f} ms = "
        f"{100 * medians['NS3L-loss-only'] / medians['PL']:.2f} % of a Pseudo-Label step",
    ]
    for base, other, kind in (
        ("PL", "PL+NS3L", "overhead"),
        ("VAT", "VAT+NS3L", "overhead"),
        ("Pi", "Pi+NS3L", "overhead"),
        ("MixMatch", "MixMatch+NS3L", "overhead"),
        ("NS3L", "VAT", "speedup"),
    ):
        if base not in times or other not in times:  # a report from before a variant was measured
            continue
        ratios = [b / a for a, b in zip(times[base], times[other])]
        med = statistics.median(ratios)
        if kind == "overhead":
            lines.append(
                f"  NS3L overhead on {base}: {100 * (med - 1):+.1f} % ({1e3 * medians[base]:.0f} ms vs "
                f"{1e3 * medians[other]:.0f} ms per step)"
            )
        else:
            lines.append(
                f"  NS3L alone vs VAT: {med:.2f}x ({1e3 * medians[base]:.0f} ms vs {1e3 * medians[other]:.0f} ms)"
            )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- report
def verdict(kind, value, target):
    ok = value <= target if kind == "overhead" else value >= target
    return "met" if ok else "MISSED"


def format_report(results, batch=None, load=None):
    lines = []
    if load is not None:
        lines.append(f"load average at start / end: {load[0]:.1f} / {load[1]:.1f} (2-core machine shared with others)")
    for label, group, a, b, kind, key in RATIOS:
        if group not in results:
            continue
        fn = overhead if kind == "overhead" else speedup
        med, low, high = summarise(paired(results[group], a, b, fn))
        if med is None:
            lines.append(f"{label}: no complete round")
            continue
        if kind == "overhead":
            lines.append(
                f"{label}: {100 * med:+.1f} % per step (rounds: {100 * low:+.1f} .. {100 * high:+.1f} %; "
                f"target <= {100 * TARGETS[key]:.0f} %: {verdict(kind, med, TARGETS[key])})"
            )
        else:
            lines.append(
                f"{label}: {med:.2f}x (rounds: {low:.2f} .. {high:.2f}x; target >= {TARGETS[key]:.0f}x: "
                f"{verdict(kind, med, TARGETS[key])})"
            )
    for group, rounds in results.items():
        for label in rounds[0] if rounds else []:
            values = [r[label] for r in rounds if r.get(label)]
            if values:
                lines.append(
                    f"  {group:12s} {label:28s} median {statistics.median(values):7.3f} steps/s "
                    f"over {len(values)} run(s)"
                )
    if batch is not None:
        lines.append(
            f"batch production ({batch['dataset']}, 50 + 50): {batch['batch_ms']:.2f} ms of a "
            f"{batch['step_ms']:.1f} ms NS3L step = {100 * batch['share']:.1f} % (target < "
            f"{100 * TARGETS['batch_share']:.0f} %: {'met' if batch['share'] < TARGETS['batch_share'] else 'MISSED'})"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of each group")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / torch threads of every run")
    parser.add_argument("--batch-repeats", type=int, default=30, help="alternations for the batch share")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=["pseudo-label", "vat", "pi", "mixmatch", "others", "batch", "inprocess", "compile", "fixmatch"],
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the script groups and the in-process steps run compiled (--compile), channels_last",
    )
    parser.add_argument(
        "--compile-methods",
        nargs="+",
        default=["PL", "VAT", "Pi", "MixMatch"],
        choices=sorted(PAPER_BATCH),
        help="methods of the compile group",
    )
    parser.add_argument("--compile-depth", type=int, default=28, help="WRN depth of the compile group")
    parser.add_argument("--compile-width", type=int, default=2, help="WRN width of the compile group")
    parser.add_argument("--compile-repeats", type=int, default=5, help="alternations of the compile group")
    parser.add_argument(
        "--fixmatch-repeats", type=int, default=10, help="alternations of the FixMatch group (official batch 64 + 448)"
    )
    parser.add_argument("--workdir", default=None, help="where the npz and the runs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.threads, args.batch_repeats) < 1:
        parser.error("--rounds, --steps, --threads and --batch-repeats must be >= 1")
    selected = set(args.only or ["pseudo-label", "vat", "pi", "mixmatch", "others", "batch", "inprocess", "fixmatch"])
    # the compile group (WRN-28-2 at the paper's batch sizes, compiles every step) runs only when asked for
    if args.dry_run:
        workdir = args.workdir or "<workdir>"
        for group, commands in groups(
            os.path.join(workdir, "speed_synthetic.npz"), args.steps, args.depth, args.width, args.compile
        ).items():
            if group in selected:
                for label, command in commands.items():
                    print(f"[{group}] {label}: python {' '.join(command)}")
        return 0
    script_groups = selected - {"batch", "inprocess", "compile", "fixmatch"}
    workdir = args.workdir or (tempfile.mkdtemp(prefix="ns3l_speed_") if script_groups else None)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    load_start = os.getloadavg()[0]
    print(
        f"speed benchmark: depth {args.depth} width {args.width}, {args.steps} steps per run, {args.rounds} "
        f"round(s), OMP_NUM_THREADS={args.threads}, load average {load_start:.1f}; work dir {workdir or '-'}",
        flush=True,
    )
    batch = None
    if "batch" in selected:
        batch = measure_batch_share(args.batch_repeats, args.depth, args.width, args.threads)
    inprocess = None
    if "inprocess" in selected:
        import torch

        inprocess = measure_inprocess(
            args.batch_repeats,
            args.depth,
            args.width,
            args.threads,
            compiled=args.compile,
            memory_format=torch.channels_last if args.compile else None,
        )
        print(format_inprocess(*inprocess), flush=True)
    fixmatch = None
    if "fixmatch" in selected:
        fixmatch = measure_fixmatch(args.fixmatch_repeats, args.depth, args.width, args.threads)
        print(format_fixmatch(fixmatch), flush=True)
    compiled = None
    if "compile" in selected:
        compiled = measure_compile(
            args.compile_repeats, args.compile_depth, args.compile_width, args.threads, args.compile_methods
        )
    results = (
        {}
        if not script_groups
        else measure_scripts(
            selected, args.rounds, args.steps, args.depth, args.width, args.threads, workdir, args.compile
        )
    )
    text = format_report(results, batch, (load_start, os.getloadavg()[0]))
    if inprocess is not None:
        text += "\n" + format_inprocess(*inprocess)
    if fixmatch is not None:
        text += "\n" + format_fixmatch(fixmatch)
    if compiled is not None:
        text += "\n" + format_compile(*compiled, args.compile_depth, args.compile_width)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "results": results,
                    "batch": batch,
                    "inprocess": inprocess and inprocess[0],
                    "compile": compiled,
                    "fixmatch": fixmatch,
                    "args": vars(args),
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
