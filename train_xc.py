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

AUTHORS_SPLIT_SEED = 36528475  # binarize-labels.py:68 (their validation / test split of the held-out points)


def parse_args(argv=None):
    parser = bookkeeping.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = parser.add_argument_group("experiment")
    g.add_argument(
        "--seed", type=bookkeeping.seed, default=1, help="seed of the training run (batches, negatives, init)"
    )
    g.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the planted problem and of the held-out split, so different --seed train on the same data (file "
        "data: 0 is the authors' split)",
    )
    g.add_argument("--runs-dir", default="runs", help="parent directory of run directories")
    g.add_argument(
        "--resume",
        type=bookkeeping.existing_path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (its arguments, its tree; --total-steps, "
        "--time-budget and --cuda may be given again)",
    )
    g.add_argument(
        "--run-name",
        type=bookkeeping.run_name,
        default=None,
        help="run directory name (default <dataset>__xc__<seed>__<unix time>)",
    )
    bookkeeping.add_tracking_args(g)  # --track, --wandb-project-name, --wandb-entity
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA when available")
    g.add_argument(
        "--torch-deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.backends.cudnn.deterministic",
    )
    g.add_argument(
        "--threads", type=bookkeeping.nonnegative_int, default=0, help="torch CPU threads (0 = torch's default)"
    )
    g.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "process"),
        help="clock of the time axis and --time-budget: wall (the paper's) or this process's CPU time, which a shared "
        "machine's load does not inflate",
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="planted",
        help="'planted' (this project's planted-hierarchy benchmark, see PlantedHierarchy), an .npz with x_train, "
        "y_train, x_test, y_test, or a training file in the Extreme Classification Repository text format",
    )
    g.add_argument(
        "--labels",
        default=None,
        help="label matrix of --dataset ('N C' header, 'l:1 ...' lines) when --dataset is a feature matrix ('N K' "
        "header, dense rows or 'f:v' tokens): the authors' XML-CNN pair trn_ft_mat_dense.txt + trn_lbl_mat.txt, "
        "or the repository's trn_X_Xf.txt + trn_X_Y.txt",
    )
    g.add_argument(
        "--test-data",
        default=None,
        help="held-out file in the same format as --dataset (required with a text --dataset); split 20%% validation / "
        "80%% test with the authors' seed (binarize-labels.py:68-72)",
    )
    g.add_argument("--test-labels", default=None, help="label matrix of --test-data (with --labels)")
    g.add_argument(
        "--num-classes",
        type=bookkeeping.positive_int,
        default=2**14,
        help="planted: number of labels C (docs/xc.md uses 2^10..2^17)",
    )
    g.add_argument("--num-features", type=bookkeeping.positive_int, default=32, help="planted: feature dimension K")
    g.add_argument(
        "--planted-train-size",
        type=bookkeeping.positive_int,
        default=None,
        help="planted: size of the fixed sample the tree and the label counts are fitted on (default 16 x C); the main "
        "model sees fresh samples every step",
    )
    g.add_argument(
        "--eval-size",
        type=bookkeeping.positive_int,
        default=2000,
        help="points of the fixed held-out sample per split: validation always; test only for planted (file data: the "
        "whole test split, as the authors evaluate it, unless --test-size)",
    )
    g.add_argument(
        "--test-size",
        type=bookkeeping.positive_int,
        default=None,
        help="file data: cap the test split at this many points (default: all of it)",
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--method", default="adversarial", choices=METHODS, help="negative sampling scheme (paper Section 5 baselines)"
    )
    g.add_argument(
        "--total-steps",
        type=bookkeeping.positive_int,
        default=3000,
        help="training steps (3000 at C = 2^12: docs/xc.md)",
    )
    g.add_argument(
        "--time-budget",
        type=bookkeeping.nonnegative_float,
        default=0.0,
        help="stop when tree fit + training time (evaluation excluded) exceeds this many seconds; 0 = no limit",
    )
    g.add_argument(
        "--batch-size", type=bookkeeping.positive_int, default=1000, help="positives per step (authors' saved run)"
    )
    g.add_argument(
        "--num-negatives", type=bookkeeping.positive_int, default=10, help="negatives per positive (authors' saved run)"
    )
    g.add_argument(
        "--table1-column",
        choices=("amazon", "wikipedia"),
        default="amazon",
        help="which column of the paper's Table 1 gives the default --lr / --reg per method (they differ for uniform "
        "and NCE)",
    )
    g.add_argument(
        "--lr",
        type=bookkeeping.positive_float,
        default=None,
        help="Adagrad learning rate (default per method: paper Table 1, --table1-column; softmax Appendix A.2)",
    )
    g.add_argument(
        "--reg",
        type=bookkeeping.nonnegative_float,
        default=None,
        help="lambda of eq. 6 (default per method as for --lr)",
    )
    g.add_argument(
        "--init",
        choices=("glorot", "zero"),
        default="glorot",
        help="start of w and b: the authors' Glorot-uniform (supervised_model.py:23-30: w ~ U(+-sqrt(6 / (C + K))), "
        "b ~ U(+-sqrt(3 / C)), near zero) or exact zeros (then NCE's b starts at -log C, so labels it never "
        "sampled do not outrank trained ones)",
    )
    g.add_argument(
        "--sampling",
        choices=("epochs", "replacement"),
        default="epochs",
        help="file data: minibatches from a fresh permutation every epoch, the last partial batch dropped (what the "
        "authors' saved runs did: 1646 steps per epoch on Wikipedia-500K), or i.i.d. with replacement",
    )
    g.add_argument(
        "--bias-init",
        choices=("inverse-aux", "zero"),
        default="inverse-aux",
        help="adversarial: start b_y at -mean log p_n(y|x) over y's training points, the authors' only saved "
        "adversarial configuration (load_and_evaluate_model.py:35, initialize_to_inverse_aux); 'zero' "
        "keeps --init's. Other methods keep --init's start (initialize_to_inverse_aux defaults to off, "
        "abstract_main_model.py:499)",
    )
    g = parser.add_argument_group("auxiliary tree")
    g.add_argument(
        "--aux-model", default=None, help="reuse a tree saved by an earlier run (aux_tree.pt) instead of fitting one"
    )
    g.add_argument(
        "--pca-dim",
        type=bookkeeping.positive_int,
        default=16,
        help="k, whitened PCA dimension of the tree (paper Section 5), after standardising every feature (the authors' "
        "pca.ipynb)",
    )
    g.add_argument(
        "--tree-split",
        choices=("halves", "packed"),
        default="halves",
        help="labels of a node: two equal halves (paper Section 3; the authors' initial split, "
        "fit_aux_model.jl:161-162), or fill the left child first (this project's earlier layout)",
    )
    g.add_argument(
        "--tree-reg",
        type=bookkeeping.nonnegative_float,
        default=0.1,
        help="lambda_n (paper Section 5); the node prior is (lambda_n / 2) x (real labels under the node) x ||(w, "
        "b)||^2, as the authors' fit_aux_model.jl:128,134,294-298",
    )
    g.add_argument(
        "--tree-newton-steps",
        type=bookkeeping.positive_int,
        default=4,
        help="Newton steps per node between two re-splits",
    )
    g.add_argument(
        "--tree-max-rounds",
        type=bookkeeping.positive_int,
        default=4,
        help="cap on re-split rounds per level (the paper re-splits until no label changes side)",
    )
    g = parser.add_argument_group("cadence")
    g.add_argument(
        "--eval-every", type=bookkeeping.positive_int, default=500, help="evaluate every N steps (and at the end)"
    )
    g.add_argument(
        "--eval-every-seconds",
        type=bookkeeping.nonnegative_float,
        default=0.0,
        help="also evaluate every X seconds of training time; 0 = off",
    )
    g.add_argument("--log-every", type=bookkeeping.positive_int, default=100, help="log training scalars every N steps")
    args = parser.parse_args(argv)

    if args.dataset == "planted" and args.num_classes < 2:
        parser.error(f"--num-classes must be >= 2, got {args.num_classes}")
    default_lr, default_reg = PAPER_DEFAULTS[args.table1_column][args.method]
    args.lr = default_lr if args.lr is None else args.lr
    args.reg = default_reg if args.reg is None else args.reg
    return args


# ---------------------------------------------------------------------------------------------- data
def reindex_by_frequency(y_train, y_heldout):
    """Label ids sorted by descending training frequency (ties by id); held-out points whose label never occurs in
    training are dropped (Bamler & Mandt 2020, 'Extreme Classification via Adversarial Softmax
    Approximation', ICLR, experiments section). Returns new y_train, new y_heldout, mask of kept held-out points, C."""
    ids, counts = np.unique(y_train, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    mapping = {int(label): new for new, label in enumerate(ids[order])}
    keep = np.array([int(label) in mapping for label in y_heldout], dtype=bool)
    new_train = np.array([mapping[int(label)] for label in y_train], dtype=np.int64)
    new_heldout = np.array([mapping[int(label)] for label in y_heldout[keep]], dtype=np.int64)
    return new_train, new_heldout, keep, len(ids)


class PlantedHierarchy:
    """Synthetic labels with a planted hierarchy (this project's CPU-sized check of the paper's claim): C labels on the
    leaves of a complete binary tree of depth D = ceil(log2 C), randomly permuted; class mean mu_y = sum_{l=1..D} r^l
    g_(ancestor at depth l), g ~ N(0, I_K), r = 0.4^(1/D); x ~ N(mu_y, I); prior pi_y proportional to (y + 1)^-0.5. The
    Bayes posterior is linear with w*_y = mu_y, b*_y = log pi_y - |mu_y|^2 / 2, the ceiling on reachable
    log-likelihood."""

    def __init__(self, num_classes, num_features, generator):
        depth = max(1, math.ceil(math.log2(num_classes)))
        ratio = 0.4 ** (1.0 / depth)
        leaves = torch.arange(2**depth)
        means = torch.zeros(2**depth, num_features)
        for level in range(1, depth + 1):
            offsets = torch.randn(2**level, num_features, generator=generator)
            means += ratio**level * offsets[leaves >> (depth - level)]
        self.means = means[torch.randperm(2**depth, generator=generator)[:num_classes]]
        prior = (torch.arange(num_classes, dtype=torch.float64) + 1.0) ** -0.5
        self.log_prior = (prior / prior.sum()).log().float()
        self.cdf = (prior / prior.sum()).cumsum(0).float()

    def to(self, device):
        self.means, self.log_prior, self.cdf = self.means.to(device), self.log_prior.to(device), self.cdf.to(device)
        return self

    def sample(self, num_points, generator=None):
        uniform = torch.rand(num_points, device=self.cdf.device, generator=generator)
        labels = torch.searchsorted(self.cdf, uniform).clamp_max(len(self.cdf) - 1)
        noise = torch.randn(num_points, self.means.shape[1], device=self.cdf.device, generator=generator)
        return self.means[labels] + noise, labels

    def bayes_scores(self, x):
        return x @ self.means.T + self.log_prior - 0.5 * (self.means**2).sum(1)


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


def heldout_split(num_points, data_seed):
    """The authors' split of the held-out points (those whose label occurs in training) into validation and test
    (binarize-labels.py:68-72): a np.random.RandomState(36528475) permutation, the first round(0.2 n) for
    validation. --data-seed shifts the seed; 0 gives the authors' split."""
    order = np.random.RandomState(AUTHORS_SPLIT_SEED + data_seed).permutation(num_points)
    num_valid = min(max(1, round(0.2 * num_points)), num_points - 1)
    return order[:num_valid], order[num_valid:]


def read_file_pair(args, features_path, labels_path):
    """(features, labels) of one split, from one XC-repository file or a feature file + label file."""
    if labels_path is None:
        features, labels, _ = common.read_xc_repository(features_path)
    else:
        features = common.read_xc_features(features_path)
        labels, _ = common.read_xc_labels(labels_path)
        if len(labels) != len(features):
            raise common.DataError(f"{labels_path}: {len(labels)} points, but {features_path} has {len(features)}")
    keep = labels >= 0  # points without a label are dropped (the authors' files have none)
    return features[keep], labels[keep]


def load_dataset(args):
    """Returns (name, x_train, y_train, {"valid": (x, y), "test": (x, y)}, num_classes, planted or None) on the CPU.
    For planted, (x_train, y_train) is the fixed sample the tree and label counts are fitted on."""
    generator = torch.Generator().manual_seed(args.data_seed)
    if args.dataset == "planted":
        planted = PlantedHierarchy(args.num_classes, args.num_features, generator)
        x_train, y_train = planted.sample(args.planted_train_size or 16 * args.num_classes, generator)
        heldout = {split: planted.sample(args.eval_size, generator) for split in ("valid", "test")}
        return "planted", x_train, y_train, heldout, args.num_classes, planted
    path = Path(args.dataset)
    for name, value in (
        ("--dataset", args.dataset),
        ("--labels", args.labels),
        ("--test-data", args.test_data),
        ("--test-labels", args.test_labels),
    ):
        if value is not None and not Path(value).is_file():
            bookkeeping.fail(f"{name} {value}: file not found (--dataset takes 'planted', an .npz, or XC text files)")
    if path.suffix == ".npz":
        try:
            x_train, y_train, x_test, y_test = common.read_npz(str(path))
        except common.DataError as error:
            bookkeeping.fail(str(error))
    else:
        if args.test_data is None:
            bookkeeping.fail("a text-format --dataset needs --test-data (the held-out file in the same format)")
        if (args.labels is None) != (args.test_labels is None):
            bookkeeping.fail("--labels and --test-labels go together (feature file + label file for each split)")
        try:
            x_train, y_train = read_file_pair(args, args.dataset, args.labels)
            x_test, y_test = read_file_pair(args, args.test_data, args.test_labels)
        except (common.DataError, UnicodeDecodeError) as error:
            bookkeeping.fail(str(error) if isinstance(error, common.DataError) else f"{path}: not a text file")
        if x_test.shape[1] != x_train.shape[1]:
            bookkeeping.fail(
                f"{args.test_data}: K = {x_test.shape[1]} differs from the training file's K = {x_train.shape[1]}"
            )
    try:  # the rules every loader's arrays follow (common.validate_arrays): finite features, whole labels >= 0, ...
        x_train, y_train, x_test, y_test = common.validate_arrays(path, x_train, y_train, x_test, y_test, features=True)
    except common.DataError as error:
        bookkeeping.fail(str(error))
    y_train, y_test, keep, num_classes = reindex_by_frequency(y_train, y_test)
    x_test = x_test[keep]
    if num_classes < 2 or len(y_test) < 2:
        bookkeeping.fail(f"{path}: need at least 2 labels and 2 held-out points with labels seen in training")
    valid, test = heldout_split(len(y_test), args.data_seed)

    def to_tensor(idx):
        return torch.as_tensor(x_test[idx], dtype=torch.float32), torch.as_tensor(y_test[idx])

    # The authors evaluate the whole test split and subsample only validation (their evaluation scripts).
    heldout = {"valid": to_tensor(valid[: args.eval_size]), "test": to_tensor(test[: args.test_size])}
    return (
        path.stem,
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(y_train),
        heldout,
        num_classes,
        None,
    )


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
