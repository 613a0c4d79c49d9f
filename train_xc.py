"""Extreme classification with adversarial negative sampling (Bamler & Mandt 2020, "Extreme Classification via
Adversarial Softmax Approximation", ICLR 2020).

A linear softmax classifier xi_y(x) = x.w_y + b_y over C labels is trained by negative sampling (paper eq. 6). The
negatives come from an auxiliary probabilistic binary tree p_n(y|x) fitted to the data on PCA-whitened features
(Section 3), so that drawing a negative costs O(k log C). The bias of the non-uniform sampling is removed at
prediction time: score_y = xi_y(x) + log p_n(y|x) (eq. 5). Baselines: uniform and frequency negatives, NCE with the
tree as base distribution, and the full softmax (O(C K) per step).

The auxiliary tree is in xc_tree.py; every default is matched to the authors' code (mandt-lab/
adversarial-negative-sampling) file by file in docs/fidelity.md, with the deviations that remain.

    python train_xc.py --dataset planted --num-classes 16384 --method adversarial
    python train_xc.py --dataset trn_ft_mat_dense.txt --labels trn_lbl_mat.txt \
        --test-data tst_ft_mat_dense.txt --test-labels tst_lbl_mat.txt            # the authors' XML-CNN files
    python train_xc.py --dataset train.txt --test-data test.txt                    # XC repository one-file format
    python train_xc.py --resume runs/<run> --total-steps 100000                    # continue or extend a run

Flags (parse_args lists them one per line; defaults' sources in docs/fidelity.md):
- Data. --dataset 'planted' is this project's planted-hierarchy benchmark (common.PlantedHierarchy); --data-seed
  seeds it and the held-out split, so different --seed train on the same data (file data: 0 is the authors' split,
  binarize-labels.py:68-72, 20 % validation / 80 % test). --labels / --test-labels: the label matrices ('N C' header,
  'l:1 ...' lines) of a feature matrix ('N K' header, dense rows or 'f:v' tokens): the authors' XML-CNN pair
  trn_ft_mat_dense.txt + trn_lbl_mat.txt, or the repository's trn_X_Xf.txt + trn_X_Y.txt. --planted-train-size: the
  fixed sample the tree and the label counts are fitted on (the main model sees fresh samples every step).
  --eval-size: validation points evaluated; test points only for planted (file data: the whole test split, as the
  authors evaluate it, unless --test-size).
- Optimisation. --lr / --reg default per method to the paper's Table 1 (--table1-column: the Amazon-670K or
  Wikipedia-500K column; they differ for uniform and NCE), softmax to Appendix A.2. --init glorot is the authors'
  Glorot-uniform (supervised_model.py:23-30: w ~ U(+-sqrt(6 / (C + K))), b ~ U(+-sqrt(3 / C))); zero starts NCE's b at
  -log C. --sampling epochs: a fresh permutation every epoch, the last partial batch dropped (the authors' saved runs:
  1646 steps per epoch on Wikipedia-500K); replacement: i.i.d. --bias-init inverse-aux (adversarial): b_y starts at
  -mean log p_n(y|x) over y's training points, the authors' only saved adversarial configuration
  (load_and_evaluate_model.py:35); other methods keep --init's start (abstract_main_model.py:499).
- Tree. --pca-dim k after standardising every feature (the authors' pca.ipynb); --tree-split halves: two equal halves
  (paper Section 3; fit_aux_model.jl:161-162), packed: the left child first (this project's earlier layout);
  --tree-reg: the node prior (lambda_n / 2) x (real labels under the node) x ||(w, b)||^2 (fit_aux_model.jl:128, 134,
  294-298); --tree-max-rounds caps the re-splits (the paper re-splits until no label changes side).
- Time. --time-budget counts tree fit + training, evaluation excluded; --clock process uses this process's CPU time,
  which a shared machine's load does not inflate; --resume takes --total-steps, --time-budget and --cuda again.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import bookkeeping
import common
from xc_tree import ProbabilisticTree, fit_tree

METHODS = ("adversarial", "uniform", "frequency", "nce", "softmax")
# (learning rate, regulariser lambda of eq. 6) per --table1-column. Negative-sampling methods: paper Table 1 (the
# Amazon-670K column is the default: there the uniform baseline got the larger learning rate, i.e. the stronger
# baselines); softmax: Appendix A.2 (EURLex-4K) in both. All constant learning rates, as the authors' saved runs
# (load_and_evaluate_model.py:38 and :81, lr_exponent 0.0).
# fmt: off
PAPER_DEFAULTS = {
    "amazon": {"adversarial": (0.01, 1e-3), "uniform": (0.01, 3e-4), "frequency": (0.003, 1e-5), "nce": (0.01, 1e-3),
               "softmax": (0.3, 3e-4)},
    "wikipedia": {"adversarial": (0.01, 1e-3), "uniform": (0.001, 1e-4), "frequency": (0.003, 1e-5),
                  "nce": (0.01, 3e-3), "softmax": (0.3, 3e-4)},
}
# fmt: on
ADAGRAD_INIT = 1e-8  # the authors' --adagrad_init (optimizer.py:48, :91), on their loss summed over the batch


def parse_args(argv=None):
    """The flags, one per line; where a default comes from is in the module docstring (Flags) and docs/fidelity.md."""
    flags = "Flags (" + __doc__.split("Flags (", 1)[1]  # where the defaults come from, under the flags in --help
    parser = bookkeeping.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=flags)
    pos, nonneg, rate = bookkeeping.positive_int, bookkeeping.nonnegative_int, bookkeeping.nonnegative_float
    onoff = argparse.BooleanOptionalAction
    g = parser.add_argument_group("experiment")
    g.add_argument(
        "--seed", type=bookkeeping.seed, default=1, help="seed of the training run (batches, negatives, init)"
    )
    g.add_argument("--data-seed", type=int, default=0, help="seed of the planted problem and the held-out split")
    g.add_argument("--runs-dir", default="runs", help="parent directory of run directories")
    g.add_argument("--resume", type=bookkeeping.existing_path, metavar="RUN_DIR", help="continue RUN_DIR (its tree)")
    g.add_argument("--run-name", type=bookkeeping.run_name, help="default <dataset>__xc__<seed>__<unix time>")
    bookkeeping.add_tracking_args(g)  # --track, --wandb-project-name, --wandb-entity
    g.add_argument("--cuda", action=onoff, default=True, help="use CUDA when available")
    g.add_argument("--torch-deterministic", action=onoff, default=True, help="torch.backends.cudnn.deterministic")
    g.add_argument("--threads", type=nonneg, default=0, help="torch CPU threads (0 = torch's default)")
    g.add_argument("--clock", default="wall", choices=("wall", "process"), help="the time axis' clock (see Flags)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="planted", help="'planted', an .npz, or an XC-repository text file")
    g.add_argument("--labels", help="label matrix of --dataset when that is a feature matrix (see Flags)")
    g.add_argument("--test-data", help="held-out file in --dataset's format; 20%% validation / 80%% test")
    g.add_argument("--test-labels", help="label matrix of --test-data (with --labels)")
    g.add_argument("--num-classes", type=pos, default=2**14, help="planted: labels C (docs/xc.md: 2^10..2^17)")
    g.add_argument("--num-features", type=pos, default=32, help="planted: feature dimension K")
    g.add_argument("--planted-train-size", type=pos, help="planted: the tree's fixed fitting sample (default 16 C)")
    g.add_argument("--eval-size", type=pos, default=2000, help="held-out points per split evaluated (see Flags)")
    g.add_argument("--test-size", type=pos, help="file data: cap the test split (default: all of it)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--method", default="adversarial", choices=METHODS, help="negatives (paper Section 5 baselines)")
    g.add_argument("--total-steps", type=pos, default=3000, help="training steps (3000 at C = 2^12: docs/xc.md)")
    g.add_argument("--time-budget", type=rate, default=0.0, help="stop after tree fit + training seconds; 0 = none")
    g.add_argument("--batch-size", type=pos, default=1000, help="positives per step (authors' saved run)")
    g.add_argument("--num-negatives", type=pos, default=10, help="negatives per positive (authors' saved run)")
    g.add_argument("--table1-column", choices=("amazon", "wikipedia"), default="amazon", help="--lr/--reg column")
    g.add_argument("--lr", type=bookkeeping.positive_float, help="Adagrad LR (default per method: paper Table 1)")
    g.add_argument("--reg", type=rate, help="lambda of eq. 6 (default per method: paper Table 1)")
    g.add_argument("--init", choices=("glorot", "zero"), default="glorot", help="start of w, b (supervised_model.py)")
    g.add_argument("--sampling", choices=("epochs", "replacement"), default="epochs", help="file data's batches")
    g.add_argument("--bias-init", choices=("inverse-aux", "zero"), default="inverse-aux", help="adversarial's b")
    g = parser.add_argument_group("auxiliary tree")
    g.add_argument("--aux-model", help="reuse a tree saved by an earlier run (aux_tree.pt) instead of fitting one")
    g.add_argument("--pca-dim", type=pos, default=16, help="k, the tree's whitened PCA dimension (paper Section 5)")
    g.add_argument("--tree-split", choices=("halves", "packed"), default="halves", help="a node's initial split")
    g.add_argument("--tree-reg", type=rate, default=0.1, help="lambda_n (paper Section 5; fit_aux_model.jl:128)")
    g.add_argument("--tree-newton-steps", type=pos, default=4, help="Newton steps per node between two re-splits")
    g.add_argument("--tree-max-rounds", type=pos, default=4, help="cap on re-split rounds per level")
    g = parser.add_argument_group("cadence")
    g.add_argument("--eval-every", type=pos, default=500, help="evaluate every N steps (and at the end)")
    g.add_argument("--eval-every-seconds", type=rate, default=0.0, help="also every X s of training time; 0 = off")
    g.add_argument("--log-every", type=pos, default=100, help="log training scalars every N steps")
    args = parser.parse_args(argv)

    if args.dataset == "planted" and args.num_classes < 2:
        parser.error(f"--num-classes must be >= 2, got {args.num_classes}")
    default_lr, default_reg = PAPER_DEFAULTS[args.table1_column][args.method]
    args.lr = default_lr if args.lr is None else args.lr
    args.reg = default_reg if args.reg is None else args.reg
    return args


# ---------------------------------------------------------------------------------------------- main model and losses
class LinearScores(nn.Module):
    """xi_y(x) = x.w_y + b_y (paper Section 5). Rows live in sparse embeddings, so a negative-sampling step
    produces sparse gradients and torch.optim.Adagrad touches only the O(batch x negatives) rows it sampled."""

    def __init__(self, num_classes, num_features, init="glorot"):
        super().__init__()
        self.weight = nn.Embedding(num_classes, num_features, sparse=True)
        self.bias = nn.Embedding(num_classes, 1, sparse=True)
        with torch.no_grad():
            if init == "glorot":  # TF1 xavier_initializer: U(+-sqrt(6 / (fan_in + fan_out))); a vector has fan C, C
                self.weight.weight.uniform_(
                    -math.sqrt(6 / (num_classes + num_features)), math.sqrt(6 / (num_classes + num_features))
                )
                self.bias.weight.uniform_(-math.sqrt(3 / num_classes), math.sqrt(3 / num_classes))
            else:
                self.weight.weight.zero_()
                self.bias.weight.zero_()

    def forward(self, x, labels):
        """Scores of the given labels (B x m) for the rows of x (B x K): O(B m K)."""
        return torch.einsum("bk,bmk->bm", x, self.weight(labels)) + self.bias(labels).squeeze(-1)

    def all_scores(self, x):
        """Scores of all C labels (B x C): O(B C K), for evaluation and the full softmax (dense gradient)."""
        return x @ self.weight.weight.T + self.bias.weight.T


@torch.no_grad()
def inverse_aux_bias(tree, x, y, num_classes, chunk=65536):
    """The authors' bias start (initialize_to_inverse_aux): b_y = -(mean over y's training points of log p_n(y|x)),
    fit_aux_model.jl:322-340 (avg_lls) and main_model/supervised_model.py:28-33 (bias = -avg_lls). Then
    xi_y + log p_n(y|x) starts near 0 on average for the points of y: the corrected scores start close to uniform.
    Labels without a training point start at 0."""
    total = torch.zeros(num_classes, device=x.device)
    for i in range(0, len(y), chunk):
        total.index_add_(0, y[i : i + chunk], tree.log_prob(tree.whiten(x[i : i + chunk]), y[i : i + chunk]))
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.where(counts > 0, -total / counts.clamp_min(1), torch.zeros_like(total))


def negative_sampling_loss(pos_scores, neg_scores, pos_log_pn, neg_log_pn, reg):
    """Paper eq. 6, mean over positives, negatives averaged per positive: softplus(-xi+) + lambda (xi+ + log
    p_n(y+|x))^2 + mean_n [softplus(xi-) + lambda (xi- + log p_n(y-|x))^2]. Uniform / frequency negatives pass log p_n
    = 0."""
    positive = F.softplus(-pos_scores) + reg * (pos_scores + pos_log_pn) ** 2
    negative = F.softplus(neg_scores) + reg * (neg_scores + neg_log_pn) ** 2
    return (positive + negative.mean(1)).mean()


def nce_loss(pos_scores, neg_scores, pos_log_pn, neg_log_pn, reg):
    """NCE with the tree as base distribution (Bamler & Mandt 2020's NCE baseline): the classifier sees xi - log p_n,
    so xi itself models the unnormalised log-probability and is used uncorrected at prediction; lambda xi^2 as
    regulariser."""
    positive = F.softplus(pos_log_pn - pos_scores) + reg * pos_scores**2
    negative = F.softplus(neg_scores - neg_log_pn) + reg * neg_scores**2
    return (positive + negative.mean(1)).mean()


def softmax_loss(logits, labels, reg):
    """Full softmax cross-entropy (eq. 1) plus lambda xi+^2 on the true class's score only, as the authors' code
    (supervised_model.py:214-221; the paper, Appendix A.2, says only "a quadratic regularizer")."""
    positive = logits.gather(1, labels[:, None]).squeeze(1)
    return F.cross_entropy(logits, labels) + reg * (positive**2).mean()


def prediction_metrics(scores, labels):
    """Sums over the rows of: log-likelihood of the softmax over all C scores, top-1 hits, top-5 hits."""
    log_likelihood = (scores.gather(1, labels[:, None]).squeeze(1) - scores.logsumexp(1)).sum()
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {
        "log_likelihood": float(log_likelihood),
        "hits1": float((top5[:, 0] == labels).sum()),
        "hits5": float((top5 == labels[:, None]).any(1).sum()),
    }


@torch.no_grad()
def evaluate(model, x, y, correction, chunk_size):
    """Predictive log-likelihood per point, accuracy = P@1 and P@5 (single label: hits@5 / 5) in %, of the
    bias-corrected scores xi + correction(x) (eq. 5) and, if there is a correction, of the raw scores."""
    totals = {}
    for start in range(0, len(y), chunk_size):
        xb, yb = x[start : start + chunk_size], y[start : start + chunk_size]
        raw = model.all_scores(xb)
        variants = {"": raw} if correction is None else {"": raw + correction(xb), "raw_": raw}
        for prefix, scores in variants.items():
            for key, value in prediction_metrics(scores, yb).items():
                totals[prefix + key] = totals.get(prefix + key, 0.0) + value
    metrics = {}
    for prefix in sorted({key[: -len("log_likelihood")] for key in totals if key.endswith("log_likelihood")}):
        metrics[prefix + "log_likelihood"] = totals[prefix + "log_likelihood"] / len(y)
        metrics[prefix + "accuracy"] = 100.0 * totals[prefix + "hits1"] / len(y)
        metrics[prefix + "precision_at_5"] = 100.0 * totals[prefix + "hits5"] / len(y) / 5
        metrics[prefix + "hits_at_5"] = 100.0 * totals[prefix + "hits5"] / len(y)
    return metrics


def load_dataset(args):
    """Returns (name, x_train, y_train, {"valid": (x, y), "test": (x, y)}, num_classes, planted or None) on the CPU
    (common.load_xc_dataset); a data problem is one line and exit 1."""
    try:
        return common.load_xc_dataset(
            args.dataset, args.labels, args.test_data, args.test_labels, args.data_seed, args.eval_size,
            args.test_size, args.num_classes, args.num_features, args.planted_train_size,
        )  # fmt: skip
    except common.DataError as error:
        bookkeeping.fail(str(error))


def load_tree(path, num_classes, num_features):
    try:
        tree = ProbabilisticTree.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # missing, truncated, not a tree: one line
        bookkeeping.fail(f"cannot read the auxiliary tree {path} ({type(error).__name__})")
    if tree.num_classes != num_classes or tree.mean.shape[0] != num_features:
        bookkeeping.fail(
            f"the auxiliary tree {path} is for C = {tree.num_classes}, K = {tree.mean.shape[0]}; the data "
            f"have C = {num_classes}, K = {num_features}"
        )
    return tree


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    checkpoint = None
    if args.resume:
        checkpoint = bookkeeping.load_checkpoint(args.resume, "train_xc.py")
        args = bookkeeping.resume_args(
            args, checkpoint, argv, overrides=("total_steps", "time_budget", "cuda"), legacy=False
        )
        if args.time_budget > 0 and checkpoint["train_seconds"] + checkpoint["aux_fit_seconds"] >= args.time_budget:
            bookkeeping.fail(
                f"--resume {args.resume}: the run already used its --time-budget of {args.time_budget:g} s; "
                f"pass a larger one to extend it"
            )
    torch.sparse.check_sparse_tensor_invariants.disable()  # explicit opt-out (silences a warning per Adagrad step)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    dataset_name, x_train, y_train, heldout, num_classes, planted = load_dataset(args)
    if planted is None and args.sampling == "epochs" and args.batch_size > len(y_train):
        bookkeeping.fail(
            f"--batch-size {args.batch_size} exceeds the {len(y_train)} training points (--sampling epochs)"
        )
    needs_tree = args.method in ("adversarial", "nce")
    if needs_tree and checkpoint is None and args.aux_model is None and args.pca_dim > x_train.shape[1]:
        bookkeeping.fail(f"--pca-dim {args.pca_dim} exceeds the {x_train.shape[1]} features of the data", code=2)
    tree = None
    if checkpoint is not None and needs_tree:  # the resumed run reuses its own fitted tree
        tree = load_tree(Path(args.resume) / "aux_tree.pt", num_classes, x_train.shape[1])
    elif needs_tree and args.aux_model is not None:
        tree = load_tree(args.aux_model, num_classes, x_train.shape[1])

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    x_train, y_train = x_train.to(device), y_train.to(device)
    heldout = {split: (x.to(device), y.to(device)) for split, (x, y) in heldout.items()}
    planted = planted.to(device) if planted is not None else None
    num_features = x_train.shape[1]
    print(
        f"{dataset_name}: N = {len(y_train)}, K = {num_features}, C = {num_classes}, method {args.method}, device "
        f"{device}"
    )

    # ALGO LOGIC: the auxiliary model p_n(y|x) (Section 3); its fitting time counts towards the wall-clock axis
    counts = torch.bincount(y_train, minlength=num_classes).float()
    log_frequency = ((counts + 1) / (counts + 1).sum()).log()  # frequency negatives are drawn from counts + 1
    frequency_cdf = (counts + 1).cumsum(0) / (counts + 1).sum()
    time_offset = 0.0
    if needs_tree:
        if tree is None:
            tree = fit_tree(
                x_train,
                y_train,
                num_classes,
                args.pca_dim,
                args.tree_reg,
                args.tree_newton_steps,
                args.tree_max_rounds,
                clock,
                args.tree_split,
            )
            print(f"auxiliary tree: depth {tree.depth}, fitted in {tree.fit_seconds:.1f} s")
        else:
            print(
                f"auxiliary tree: reused {args.resume or args.aux_model} (fitted in {tree.fit_seconds:.1f} s, counted "
                f"on the time axis)"
            )
        tree_state = tree.state_dict() if checkpoint is None else None  # saved with the run directory (below)
        tree = tree.to(device)
        time_offset = tree.fit_seconds
    correction = {
        "adversarial": lambda xb: tree.log_prob_all(tree.whiten(xb)),  # eq. 5
        "frequency": lambda xb: log_frequency.expand(len(xb), -1),
    }.get(args.method)

    model = LinearScores(num_classes, num_features, args.init).to(device)
    if args.method == "nce" and args.init == "zero":  # NCE scores are log-probabilities: start at uniform, else
        nn.init.constant_(model.bias.weight, -math.log(num_classes))  # never-sampled labels (score 0) outrank the rest
    elif args.method == "adversarial" and args.bias_init == "inverse-aux":
        with torch.no_grad():
            model.bias.weight.copy_(inverse_aux_bias(tree, x_train, y_train, num_classes)[:, None])
    # Our loss is the authors' divided by the batch size; Adagrad is invariant to that up to its initial accumulator,
    # which is scaled by batch_size^-2 to match theirs exactly.
    optimizer = torch.optim.Adagrad(
        model.parameters(), lr=args.lr, initial_accumulator_value=ADAGRAD_INIT / args.batch_size**2
    )
    run_start = time.time()
    chunk_size = max(1, 2**23 // num_classes)
    if planted is not None:  # the ceiling: exact Bayes posterior on the same held-out points
        bayes = {split: prediction_metrics(planted.bayes_scores(x), y) for split, (x, y) in heldout.items()}
        bayes = {
            f"bayes_{split}_{name}": value / len(heldout[split][1]) * (1 if name == "log_likelihood" else 100)
            for split, metrics in bayes.items()
            for name, value in metrics.items()
            if name != "hits5"
        }
        bayes = {key.replace("hits1", "accuracy"): value for key, value in bayes.items()}
        print(
            f"Bayes posterior (ceiling): test log-likelihood {bayes['bayes_test_log_likelihood']:.3f}, accuracy "
            f"{bayes['bayes_test_accuracy']:.1f} %"
        )
    else:
        bayes = {}
    history, best = [], {"valid_error": math.inf}
    step, train_seconds = 0, 0.0
    order, position = torch.empty(0, dtype=torch.long, device=device), 0  # --sampling epochs: permutation, cursor
    if checkpoint is not None:
        with bookkeeping.restoring(args.resume):  # a checkpoint that does not fit: one line, nothing kept
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            step, train_seconds, history, best = (
                checkpoint["step"],
                checkpoint["train_seconds"],
                checkpoint["history"],
                checkpoint["best"],
            )
            order, position = checkpoint["order"].to(device), checkpoint["position"]
            run_start = checkpoint["run_start"]
    run_dir, writer = bookkeeping.open_run(args, "xc", checkpoint=checkpoint, dataset_name=dataset_name)  # only now
    run_dir = Path(run_dir)
    if checkpoint is not None:
        with open(run_dir / "eval_history.jsonl", "w") as handle:  # drop the rows a crashed leg wrote after its
            handle.writelines(json.dumps(row) + "\n" for row in history)  # checkpoint
        print(f"resumed {run_dir} at step {step}")
    elif needs_tree:  # the run directory always holds its tree, so --resume never needs --aux-model's file
        bookkeeping.save_checkpoint(str(run_dir / "aux_tree.pt"), tree_state)

    def run_evaluation(step, elapsed):
        walltime = run_start + elapsed
        row = {"step": step, "seconds": elapsed}
        for split, (x, y) in heldout.items():
            for name, value in evaluate(model, x, y, correction, chunk_size).items():
                row[f"{split}_{name}"] = value
                writer.add_scalar(f"eval/{split}_{name}", value, step, walltime=walltime)
        writer.add_scalar("eval/seconds", elapsed, step, walltime=walltime)
        writer.flush()
        history.append(row)
        with open(run_dir / "eval_history.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if 100 - row["valid_accuracy"] < best["valid_error"]:
            best.update(valid_error=100 - row["valid_accuracy"], test_error=100 - row["test_accuracy"], step=step)
        raw = (
            f", raw {row['test_raw_log_likelihood']:.3f} / {row['test_raw_accuracy']:.1f} %"
            if "test_raw_accuracy" in row
            else ""
        )
        print(
            f"eval step {step} ({elapsed:.1f} s): test log-likelihood {row['test_log_likelihood']:.3f}, "
            f"accuracy {row['test_accuracy']:.2f} %, P@5 {row['test_precision_at_5']:.2f} %{raw}"
        )
        bookkeeping.save_checkpoint(
            str(run_dir / "checkpoint.pt"),
            {
                "script": "train_xc.py",
                "args": vars(args),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "train_seconds": elapsed - time_offset,
                "aux_fit_seconds": time_offset,
                "run_start": run_start,
                "history": history,
                "best": best,
                "order": order.cpu(),
                "position": position,
                "rng": bookkeeping.rng_state(),
            },
        )

    if checkpoint is None:
        run_evaluation(0, time_offset)
    else:
        bookkeeping.set_rng_state(checkpoint["rng"])  # last: everything above that draws random numbers is set up again
    last_eval_seconds = time_offset + train_seconds
    segment_start = clock()
    while step < args.total_steps:
        # ALGO LOGIC: positives (fresh planted samples or a random minibatch), negatives, loss, sparse Adagrad step
        if planted is not None:
            x, y = planted.sample(args.batch_size)
        elif args.sampling == "replacement":
            index = torch.randint(len(y_train), (args.batch_size,), device=device)
            x, y = x_train[index], y_train[index]
        else:  # shuffled epochs: a fresh permutation when the current one has no full batch left
            if position + args.batch_size > len(order):
                order, position = torch.randperm(len(y_train), device=device), 0
            index = order[position : position + args.batch_size]
            position += args.batch_size
            x, y = x_train[index], y_train[index]
        if args.method == "softmax":
            loss = softmax_loss(model.all_scores(x), y, args.reg)
        else:
            shape = (args.batch_size, args.num_negatives)
            if needs_tree:
                z = tree.whiten(x)
                negatives, neg_log_pn = tree.sample(z, args.num_negatives)
                pos_log_pn = tree.log_prob(z, y)
            else:  # uniform / frequency: log p_n = 0 in the loss (Bamler & Mandt's baselines)
                if args.method == "uniform":
                    negatives = torch.randint(num_classes, shape, device=device)
                else:
                    negatives = torch.searchsorted(frequency_cdf, torch.rand(shape, device=device)).clamp_max(
                        num_classes - 1
                    )
                pos_log_pn, neg_log_pn = torch.zeros(args.batch_size, device=device), torch.zeros(shape, device=device)
            scores = model(x, torch.cat([y[:, None], negatives], 1))
            loss_fn = nce_loss if args.method == "nce" else negative_sampling_loss
            loss = loss_fn(scores[:, 0], scores[:, 1:], pos_log_pn, neg_log_pn, args.reg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1

        elapsed = time_offset + train_seconds + clock() - segment_start
        out_of_time = args.time_budget > 0 and elapsed >= args.time_budget
        # LOGGING
        if step % args.log_every == 0 or step == args.total_steps or out_of_time:
            walltime = run_start + elapsed
            steps_per_second = step / max(elapsed - time_offset, 1e-9)
            loss_value = loss.item()
            bookkeeping.write_scalars(
                writer,
                step,
                {
                    "losses/loss": loss_value,
                    "charts/learning_rate": args.lr,
                    "charts/SPS": steps_per_second,
                    "charts/elapsed_seconds": elapsed,
                },
                walltime=walltime,
            )
            print(bookkeeping.progress_line(step, args.total_steps, steps_per_second, loss=loss_value), flush=True)
        # EVAL (its time is excluded from the training clock)
        if (
            step % args.eval_every == 0
            or step == args.total_steps
            or out_of_time
            or (args.eval_every_seconds > 0 and elapsed - last_eval_seconds >= args.eval_every_seconds)
        ):
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += clock() - segment_start
            last_eval_seconds = time_offset + train_seconds
            run_evaluation(step, last_eval_seconds)
            segment_start = clock()
        if out_of_time:
            break

    final = history[-1]
    summary = {
        "steps": step,
        "steps_per_second": step / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "aux_fit_seconds": time_offset,
        "total_seconds": time_offset + train_seconds,
        "final_valid_error": 100 - final["valid_accuracy"],
        "final_test_error": 100 - final["test_accuracy"],
        "best_valid_error": best["valid_error"],
        "test_error_at_best_valid": best["test_error"],
        **{f"final_{key}": value for key, value in final.items() if key not in ("step", "seconds")},
        **bayes,
    }
    bookkeeping.write_summary(
        writer, str(run_dir), summary, args, reported=("final_test_log_likelihood", "final_test_error")
    )
    print(
        f"done: {step} steps in {train_seconds:.1f} s (+ {time_offset:.1f} s tree fit), test log-likelihood "
        f"{final['test_log_likelihood']:.3f}, accuracy {final['test_accuracy']:.2f} %, P@5 "
        f"{final['test_precision_at_5']:.2f} %; {run_dir}"
    )


if __name__ == "__main__":
    main()
