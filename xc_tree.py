"""The auxiliary model of Bamler & Mandt 2020 ("Extreme Classification via Adversarial Softmax Approximation", ICLR
2020, Section 3): a probabilistic binary tree p_n(y|x) over the C labels on PCA-whitened features, fitted top-down
to the training data, from which train_xc.py draws adversarial negatives in O(k log C) and whose log-probabilities
remove the sampling bias at prediction (eq. 5). It is to train_xc.py what wrn.py is to the semi-supervised scripts.

- ``fit_tree(x, y, C)``: the fit (per node: dominant-eigenvector start, split by Delta_y of eq. 9, Newton ascent on
  the regularised node log-likelihood of eq. 8, re-split until stable), all nodes of one level at once.
- ``ProbabilisticTree``: ``sample`` (ancestral sampling), ``log_prob`` of given labels, ``log_prob_all`` of every
  label, ``state_dict`` / ``from_state_dict`` (saved as aux_tree.pt in the run directory).
"""

import math
import time

import torch
import torch.nn.functional as F

PADDING_BIAS = 1000.0  # sigma(+-1000) is exactly 1 / 0 in float32: padding leaves get probability zero (Section 3)


class ProbabilisticTree:
    """p_n(y|x) of paper Section 3: a complete binary tree over 2^D >= C leaves on PCA-whitened features z. Internal
    nodes are heap-indexed (root 1, children 2n and 2n + 1); node n goes right with probability
    sigmoid(theta[n, :k].z + theta[n, k]). Padding leaves (leaf_label -1) have probability zero."""

    def __init__(self, mean, projection, theta, leaf_label, fit_seconds=0.0):
        self.mean, self.projection, self.theta, self.leaf_label = mean, projection, theta, leaf_label
        self.num_leaves = len(leaf_label)
        self.depth = self.num_leaves.bit_length() - 1
        self.num_classes = int((leaf_label >= 0).sum())
        self.label_leaf = torch.empty(self.num_classes, dtype=torch.long, device=leaf_label.device)
        real = (leaf_label >= 0).nonzero().squeeze(1)
        self.label_leaf[leaf_label[real]] = real
        self.fit_seconds = fit_seconds

    def whiten(self, x):
        return (x - self.mean) @ self.projection

    def _logits(self, z, node):
        theta = self.theta[node]
        return (theta[..., :-1] * z).sum(-1) + theta[..., -1]

    def sample(self, z, num_samples):
        """num_samples labels per row of z and their log p_n, by ancestral sampling: O(num_samples k log C)."""
        node = torch.ones(z.shape[0], num_samples, dtype=torch.long, device=z.device)
        log_prob = torch.zeros(z.shape[0], num_samples, device=z.device)
        for _ in range(self.depth):
            logit = self._logits(z[:, None, :], node)
            right = torch.rand_like(logit) < torch.sigmoid(logit)
            log_prob += F.logsigmoid(torch.where(right, logit, -logit))
            node = 2 * node + right.long()
        return self.leaf_label[node - self.num_leaves], log_prob

    def log_prob(self, z, labels):
        """log p_n(labels | z) for labels of shape (B,) or (B, m): O(k log C) each."""
        heap = self.label_leaf[labels] + self.num_leaves
        zz = z if labels.dim() == 1 else z[:, None, :]
        log_prob = torch.zeros(labels.shape, device=z.device)
        for level in range(self.depth):
            logit = self._logits(zz, heap >> (self.depth - level))
            right = ((heap >> (self.depth - level - 1)) & 1).bool()
            log_prob += F.logsigmoid(torch.where(right, logit, -logit))
        return log_prob

    def log_prob_leaves(self, z):
        """log-probability of every leaf, padding included (B x 2^D), expanded level by level: O(2^D k) per row."""
        log_prob = torch.zeros(z.shape[0], 1, device=z.device)
        for level in range(self.depth):
            nodes = self.theta[2**level : 2 ** (level + 1)]
            logit = z @ nodes[:, :-1].T + nodes[:, -1]
            log_prob = torch.stack([log_prob + F.logsigmoid(-logit), log_prob + F.logsigmoid(logit)], -1).flatten(1)
        return log_prob

    def log_prob_all(self, z):
        """log p_n(y | z) for all C labels (B x C)."""
        return self.log_prob_leaves(z)[:, self.label_leaf]

    def to(self, device):
        return ProbabilisticTree(
            self.mean.to(device),
            self.projection.to(device),
            self.theta.to(device),
            self.leaf_label.to(device),
            self.fit_seconds,
        )

    def state_dict(self):
        return {
            "mean": self.mean.cpu(),
            "projection": self.projection.cpu(),
            "theta": self.theta.cpu(),
            "leaf_label": self.leaf_label.cpu(),
            "fit_seconds": torch.tensor(self.fit_seconds),
        }

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["mean"], state["projection"], state["theta"], state["leaf_label"], float(state["fit_seconds"]))


def _pca_whitening(x, dim):
    """The authors' preprocessing of the tree's features (pca.ipynb, fit_pca / reduce_dim of
    mandt-lab/adversarial-negative-sampling): centre, divide every feature by its standard deviation (PCA of the
    correlation matrix, eigendecomposed in float64), keep the top `dim` components and whiten them to unit variance.
    Returns (mean, projection) with z = (x - mean) @ projection."""
    mean = x.mean(0)
    centred = x - mean
    covariance = (centred.T @ centred).double() / len(x)
    std = covariance.diagonal().sqrt().clamp_min(1e-12)  # constant features: a zero row / column, never selected
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance / (std[:, None] * std[None, :]))
    dim = min(dim, x.shape[1])
    top_values, top_vectors = eigenvalues[-dim:].flip(0), eigenvectors[:, -dim:].flip(1)
    return mean, (top_vectors / top_values.clamp_min(1e-12).sqrt() / std[:, None]).float()


class _GroupedRows:
    """Rows grouped by node and zero-padded to blocks of `width` rows that each belong to one node. Per-point work
    (logits, gradients, Hessians) is then a batched matmul over blocks, and the per-node sums are index_add_ over
    N / width blocks instead of over N rows."""

    def __init__(self, rows, node, num_nodes, width=32):
        order = torch.argsort(node, stable=True)
        lengths = torch.bincount(node, minlength=num_nodes)
        padded = (lengths + width - 1) // width * width
        start, padded_start = torch.cumsum(lengths, 0) - lengths, torch.cumsum(padded, 0) - padded
        sorted_node = node[order]
        self.position = torch.empty_like(order)  # row i sits at position[i] of the padded layout
        self.position[order] = (
            padded_start[sorted_node] + torch.arange(len(node), device=node.device) - start[sorted_node]
        )
        self.blocks = torch.zeros(int(padded.sum()), rows.shape[1], device=rows.device)
        self.blocks[self.position] = rows
        self.blocks = self.blocks.view(-1, width, rows.shape[1])
        self.block_node = torch.repeat_interleave(torch.arange(num_nodes, device=node.device), padded // width)
        self.num_nodes, self.width = num_nodes, width

    def pad(self, values):
        """Per-row values (N) in the padded layout (num_blocks x width), zero on padding rows."""
        out = torch.zeros(self.blocks.shape[0] * self.width, dtype=values.dtype, device=values.device)
        out[self.position] = values
        return out.view(-1, self.width)

    def logits(self, node_theta):
        return torch.bmm(self.blocks, node_theta[self.block_node][:, :, None]).squeeze(2)

    def node_sum(self, block_values):
        """Per-node sums of per-block values (num_blocks x ...)."""
        out = torch.zeros(
            (self.num_nodes,) + block_values.shape[1:], dtype=block_values.dtype, device=block_values.device
        )
        return out.index_add_(0, self.block_node, block_values)

    def weighted_sum(self, weight):
        """Per-node sums of weight_i row_i."""
        return self.node_sum(torch.bmm(weight[:, None, :], self.blocks).squeeze(1))

    def outer_sum(self, weight):
        """Per-node sums of weight_i row_i row_i^T."""
        return self.node_sum(torch.bmm((self.blocks * weight[:, :, None]).transpose(1, 2), self.blocks))


def fit_tree(
    x, y, num_classes, pca_dim=16, reg=0.1, newton_steps=4, max_rounds=4, clock=time.perf_counter, split_mode="halves"
):
    """Fit p_n top-down (paper Section 3), all nodes of one level at once. Per node: w = dominant eigenvector of the
    covariance of the per-label feature sums, b = 0; split the node's labels by Delta_y (eq. 9): the right child gets
    the ceil(r / 2) of its r real labels with the largest Delta_y ("two equally sized halves"; with split_mode
    "packed", only the labels that do not fit in the left child's 2^(D-l-1) leaves); Newton ascent (with step
    halving, which plain Newton needs on nearly separable nodes) on the node log-likelihood of eq. 8 minus
    (reg / 2) |Y_node| ||theta||^2 (the authors' prior, fit_aux_model.jl:128,134,294-298); re-split by Delta_y
    until no label changes side. Each child's real labels fill the start of its leaf block, padding the rest; a node
    whose child holds no real label always goes to the other child (b = -+1000, Section 3)."""
    start_time = clock()
    device = x.device
    mean, projection = _pca_whitening(x, pca_dim)
    z = (x - mean) @ projection
    z1 = torch.cat([z, torch.ones(len(z), 1, device=device)], 1)  # (z, 1): theta = (w, b)
    dim = z1.shape[1]
    depth = max(1, math.ceil(math.log2(num_classes)))
    num_leaves = 2**depth
    # row y: (sum_{x in D_y} z, n_y), so Delta_y of eq. 9 is label_sums[y] . theta
    label_sums = torch.zeros(num_classes, dim, device=device).index_add_(0, y, z1)
    theta = torch.zeros(num_leaves, dim, device=device)
    label_slot = torch.arange(num_classes, device=device)  # label -> leaf slot (0 .. 2^D - 1)
    eye = torch.eye(dim, device=device, dtype=torch.float64)
    for level in range(depth):
        num_nodes, block = 2**level, num_leaves >> level
        half = block // 2
        label_node = label_slot // block
        num_real = torch.bincount(label_node, minlength=num_nodes)
        # real labels that go right: half of them (rounded up), or in "packed" mode what the left child cannot hold
        num_right = num_real - num_real // 2 if split_mode == "halves" else (num_real - half).clamp_min(0)
        points = _GroupedRows(z1, label_node[y], num_nodes)
        labels = _GroupedRows(label_sums[:, :-1], label_node, num_nodes)
        is_point = points.pad(torch.ones(len(y), device=device))
        node_reg = 0.5 * reg * num_real.clamp_min(1).float()  # (lambda_n / 2) |Y_node|: fit_aux_model.jl:294-298

        # initial w: dominant eigenvector of the covariance of the label sums under each node; b = 0
        count = num_real.clamp_min(1).float()
        is_label = labels.pad(torch.ones(num_classes, device=device))
        first = labels.weighted_sum(is_label) / count[:, None]
        covariance = labels.outer_sum(is_label) / count[:, None, None]
        covariance = (covariance - first[:, :, None] * first[:, None, :]).double()
        node_theta = torch.cat(
            [torch.linalg.eigh(covariance)[1][:, :, -1].float(), torch.zeros(num_nodes, 1, device=device)], 1
        )

        def split(node_theta):
            """True for the labels that go right: the num_right[node] labels with the largest Delta_y (eq. 9)."""
            delta = (label_sums * node_theta[label_node]).sum(1)
            order = torch.argsort(-delta, stable=True)
            order = order[torch.argsort(label_node[order], stable=True)]
            first_of_node = torch.cumsum(num_real, 0) - num_real
            rank = torch.empty_like(order)
            rank[order] = torch.arange(num_classes, device=device) - first_of_node[label_node[order]]
            return rank < num_right[label_node], rank

        def objective(node_theta, side, logit=None):  # eq. 8 minus the regulariser, per node
            logit = points.logits(node_theta) if logit is None else logit
            log_likelihood = (F.logsigmoid(side * logit) * is_point).sum(1).double()
            return points.node_sum(log_likelihood) - node_reg * (node_theta**2).sum(1)

        goes_right, rank = split(node_theta)
        for _ in range(max_rounds):
            side = points.pad(goes_right[y].float() * 2 - 1)  # zeta of eq. 8 (0 on padding rows)
            for _ in range(newton_steps):
                logit = points.logits(node_theta)
                gradient = points.weighted_sum(side * torch.sigmoid(-side * logit)) - 2 * node_reg[:, None] * node_theta
                hessian = points.outer_sum(torch.sigmoid(logit) * torch.sigmoid(-logit) * is_point).double()
                hessian = hessian + (2 * node_reg.double()[:, None, None] + 1e-6) * eye  # 1e-6: nodes without points
                step = (
                    torch.cholesky_solve(gradient.double()[:, :, None], torch.linalg.cholesky(hessian))
                    .squeeze(2)
                    .float()
                )
                if float(step.abs().max()) < 1e-5:  # converged (to float32 precision) at every node
                    break
                current = objective(node_theta, side, logit)
                tolerance = 1e-6 * (current.abs() + 1)  # float32 rounding noise of the objective
                accepted = torch.zeros(num_nodes, dtype=torch.bool, device=device)
                new_theta = node_theta.clone()
                for halving in range(12):
                    candidate = node_theta + 0.5**halving * step
                    better = ~accepted & (objective(candidate, side) >= current - tolerance)
                    new_theta[better], accepted = candidate[better], accepted | better
                    if bool(accepted.all()):
                        break
                node_theta = new_theta
            new_right, rank = split(node_theta)
            changed = bool((new_right != goes_right).any())
            goes_right = new_right
            if not changed:
                break

        # a node whose right (left) child holds only padding always goes left (right): w = 0, b = -+1000 (Section 3)
        for forced, sign in ((num_right == 0, -1.0), ((num_right == num_real) & (num_real > 0), 1.0)):
            node_theta[forced] = 0.0
            node_theta[forced, -1] = sign * PADDING_BIAS
        theta[num_nodes : 2 * num_nodes] = node_theta
        # move the labels: within each node's block, left-goers fill the left child's leaves, right-goers the right's
        block_start = label_node * block
        label_slot = torch.where(goes_right, block_start + half + rank, block_start + rank - num_right[label_node])
    leaf_label = torch.full((num_leaves,), -1, dtype=torch.long, device=device)
    leaf_label[label_slot] = torch.arange(num_classes, device=device)
    if x.is_cuda:
        torch.cuda.synchronize()
    return ProbabilisticTree(mean, projection, theta, leaf_label, clock() - start_time)
