"""Tests for train_vat.py: r_adv (norm, no gradient, power iteration, fp32 under autocast), BatchNorm statistics
untouched, KL properties, the paper's defaults, end-to-end runs of VAT / + EntMin / + PL / + NS3L on synthetic data
(event tags, finite values, loss composition, summary.json, resume) and bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_vat  # noqa: E402
import wrn  # noqa: E402

SCRIPT = os.path.join(ROOT, "train_vat.py")
TINY = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--bn-momentum", "0.1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # tiny runs; CI cores are shared
SUMMARY_KEYS = {
    "steps",
    "steps_per_second",
    "final_valid_error",
    "final_test_error",
    "best_valid_error",
    "test_error_at_best_valid",
    "args",
}


def tiny_wrn(seed=0):
    torch.manual_seed(seed)
    return wrn.WideResNet(10, depth=10, width=1, in_channels=3, bn_momentum=0.1).train()


class OneDirection(nn.Module):
    """Logits depend on the input only through s = <x, u>: the most sensitive direction is +-u everywhere.
    ||u|| = 1000 makes the logits sensitive enough that a probe of norm xi = 1e-6 moves them well above fp32
    rounding (and far below bf16 rounding)."""

    def __init__(self, shape, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        u = torch.randn(shape, generator=generator)
        self.u = nn.Parameter(1000.0 * u / u.norm())
        self.head = nn.Linear(1, 5)

    def forward(self, x):
        return self.head((x * self.u).flatten(1).sum(1, keepdim=True))

    def inputs(self, n):
        """Random inputs with s = <x, u> ~ N(0, 1), so the logits stay O(1), and small enough that the sum in s
        does not cancel away the probe's contribution in fp32."""
        return 1e-3 * torch.randn(n, *self.u.shape)


# ----------------------------------------------------------------------------------------------- perturbation
def test_r_adv_has_norm_eps_per_sample_and_no_gradient():
    model = tiny_wrn()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        logits = model(x)
    for eps in (6.0, 0.5):
        r_adv = train_vat.adversarial_perturbation(model, x, logits, eps=eps)
        assert r_adv.shape == x.shape and not r_adv.requires_grad and r_adv.grad_fn is None
        assert torch.allclose(r_adv.flatten(1).norm(dim=1), torch.full((6,), eps), rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the r search leaves no gradient on the weights


def test_every_pass_augments_afresh_after_the_perturbation_is_added():
    """Oliver et al. augment inside the network: the probe sees augment(x + d), the adversarial pass augment(x + r)."""
    torch.manual_seed(0)
    model = tiny_wrn()
    x = torch.randn(4, 3, 8, 8)
    seen = []

    def augment(t):
        seen.append(t.detach().clone())
        return t + 0.1 * torch.randn_like(t)  # fresh noise on every call

    with torch.no_grad():
        logits = model(augment(x))
    seen.clear()
    _, _, r_adv = train_vat.vat_loss(model, x, logits, eps=2.0, iterations=2, augment=augment)
    assert len(seen) == 3  # two probe passes and the adversarial pass, each augmented on its own
    probe_norms = (seen[0] - x).flatten(1).norm(dim=1)
    assert torch.allclose(probe_norms, torch.full((4,), 1e-6), rtol=0.2)  # fp32 rounding of x + d - x
    assert torch.allclose(seen[2], x + r_adv) and torch.allclose(
        (seen[2] - x).flatten(1).norm(dim=1), torch.full((4,), 2.0)
    )


def test_l2_normalize_keeps_tiny_gradients_unit_norm():
    tiny = torch.randn(3, 2, 4, 4) * 1e-11  # the size of a KL gradient at xi = 1e-6
    assert torch.allclose(train_vat.l2_normalize(tiny).flatten(1).norm(dim=1), torch.ones(3), rtol=1e-5)


def test_power_iteration_recovers_the_only_sensitive_direction():
    shape = (3, 6, 6)
    model = OneDirection(shape)
    x = model.inputs(8)
    with torch.no_grad():
        logits = model(x)
    torch.manual_seed(1)
    r_adv = train_vat.adversarial_perturbation(model, x, logits, eps=2.0, xi=1e-6, iterations=1)
    u = model.u.detach().flatten()
    cosine = (r_adv.flatten(1) @ u) / (r_adv.flatten(1).norm(dim=1) * u.norm())
    assert cosine.abs().min() > 0.999
    # a random direction in 108 dimensions is nearly orthogonal to u: the search did the work
    random = torch.randn(8, u.numel())
    assert ((random @ u) / (random.norm(dim=1) * u.norm())).abs().max() < 0.5


def test_power_iteration_runs_in_fp32_under_bf16_autocast():
    shape = (3, 6, 6)
    model = OneDirection(shape)
    x = model.inputs(8)
    with torch.no_grad():
        clean = model(x)  # fp32 target, as the script passes (recomputed in fp32 when its clean pass ran in bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_adv = train_vat.adversarial_perturbation(model, x, clean, eps=2.0, xi=1e-6)
    assert r_adv.dtype == torch.float32
    u = model.u.detach().flatten()
    cosine = (r_adv.flatten(1) @ u) / (r_adv.flatten(1).norm(dim=1) * u.norm())
    assert cosine.abs().min() > 0.999  # in bf16 the xi = 1e-6 probe vanishes and g is zero or noise


# ------------------------------------------------------------------------------------------------ batch norm
def test_vat_loss_leaves_bn_running_statistics_bit_identical():
    model = tiny_wrn()
    x = torch.randn(6, 3, 8, 8)
    logits = model(x)  # the clean pass: it updates the statistics
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    kl, logits_adv, r_adv = train_vat.vat_loss(model, x, logits, eps=6.0, iterations=2)
    kl.mean().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model(x + r_adv)  # an ordinary training pass does move them: the check above can fail
    assert not all(torch.equal(before[k], model.state_dict()[k]) for k in before)


# --------------------------------------------------------------------------------------------------------- KL
def test_kl_matches_definition_and_is_zero_at_zero_perturbation():
    torch.manual_seed(0)
    a, b = torch.randn(4, 5) * 2, torch.randn(4, 5) * 2
    p, q = a.softmax(1), b.softmax(1)
    assert torch.allclose(train_vat.kl_divergence(a, b), (p * (p / q).log()).sum(1), atol=1e-6)
    assert torch.equal(train_vat.kl_divergence(a, a), torch.zeros(4))
    model = tiny_wrn()
    x = torch.randn(6, 3, 8, 8)
    logits = model(x)
    kl_zero, _, r_zero = train_vat.vat_loss(model, x, logits, eps=0.0)
    assert torch.equal(r_zero, torch.zeros_like(x)) and kl_zero.abs().max() < 1e-6
    kl, _, _ = train_vat.vat_loss(model, x, logits, eps=6.0)
    assert kl.min() > 1e-6


def test_vat_target_carries_no_gradient():
    model = tiny_wrn()
    x = torch.randn(6, 3, 8, 8)
    logits = model(x)
    logits.retain_grad()
    kl, _, _ = train_vat.vat_loss(model, x, logits, eps=6.0)
    kl.mean().backward()
    assert logits.grad is None  # p(x) is a constant target
    assert model.fc.weight.grad.abs().sum() > 0  # the gradient reaches the weights through p(x + r_adv)


# --------------------------------------------------------------------------------------------------- defaults
def test_hidden_label_stats_by_hand():
    """3 unlabeled rows, hidden labels 0, 2 and -1 (no label). Negatives: row 0 {0, 1} (its true class: a false
    negative), row 1 {1}, row 2 {0, 1, 2}: 2 negatives per row, 1 false negative among the 2 labeled rows. Pseudo-label
    mask on rows 0 and 1 with targets 0 and 1: mask rate 2/3, 1 right of the 2 confident labeled rows."""
    y_hidden = torch.tensor([0, 2, -1])
    negatives = torch.tensor([[True, True, False], [False, True, False], [True, True, True]])
    stats = train_vat.hidden_label_stats(y_hidden, negatives, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 1, 2]))
    expected = {
        "charts/ns3l_negatives_per_sample": 2.0,
        "charts/ns3l_false_negative_rate": 0.5,
        "charts/pl_mask_rate": 2 / 3,
        "charts/pl_accuracy": 0.5,
    }
    assert {k: round(v.item(), 6) for k, v in stats.items()} == {k: round(v, 6) for k, v in expected.items()}
    assert train_vat.hidden_label_stats(y_hidden) == {}  # neither NS3L nor Pseudo-Label on


def test_paper_defaults():
    vat = train_vat.parse_args(["--dataset", "cifar10"])
    assert (vat.lr, vat.vat_weight, vat.vat_eps, vat.vat_xi, vat.vat_iterations) == (3e-3, 0.3, 6.0, 1e-6, 1)
    both = train_vat.parse_args(["--dataset", "svhn", "--ns3l"])
    assert (both.lr, both.vat_weight, both.ns3l_weight, both.vat_eps) == (6e-4, 0.3, 0.3, 1.0)
    c100 = train_vat.parse_args(["--dataset", "cifar100", "--ns3l"])
    assert (c100.lr, c100.vat_weight, c100.ns3l_weight) == (3e-3, 0.6, 0.3)
    assert train_vat.parse_args(["--dataset", "cifar10", "--entmin"]).lr == 3e-3


# ------------------------------------------------------------------------------------------------ end to end
VARIANTS = {
    "vat": [],
    "entmin": ["--entmin"],
    "pl": ["--pseudo-label", "--pl-threshold", "0.1"],
    "ns3l": ["--ns3l"],
    "miyato": ["--vat-kl", "miyato"],
}
EXPECTED = {
    "vat": set(),
    "miyato": set(),
    "entmin": {"losses/entropy"},
    "pl": {"losses/pseudo_label", "charts/pl_mask_rate"},
    "ns3l": {"losses/ns3l", "charts/ns3l_negatives_per_sample", "charts/ns3l_false_negative_rate"},
}
OPTIONAL = set().union(*EXPECTED.values()) | {"charts/pl_accuracy"}


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def launch(args):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four variants side by side (one thread each), 4 steps, every step logged, no ramp."""
    runs_dir = str(tmp_path_factory.mktemp("vat_runs"))
    common_args = [
        *TINY,
        "--total-steps",
        "4",
        "--eval-every",
        "2",
        "--log-every",
        "1",
        "--rampup-steps",
        "0",
        "--runs-dir",
        runs_dir,
    ]
    procs = {name: launch([*common_args, "--run-name", name, *flags]) for name, flags in VARIANTS.items()}
    bad_dir = os.path.join(runs_dir, "bad_runs")
    procs["bad"] = launch([*TINY, "--runs-dir", bad_dir, "--vat-eps", "0"])  # a bad value: nothing may be written
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = (proc.returncode, out, err, bad_dir if name == "bad" else os.path.join(runs_dir, name))
    return results


@pytest.mark.parametrize("name", list(VARIANTS))
def test_end_to_end(runs, name):
    code, out, err, run_dir = runs[name]
    assert code == 0, err
    scalars = read_scalars(run_dir)
    base = {
        "losses/supervised",
        "losses/vat",
        "losses/total",
        "charts/vat_r_adv_norm",
        "charts/learning_rate",
        "charts/SPS",
        "charts/unlabeled_weight_ramp",
        "eval/valid_error",
        "eval/test_error",
        "eval/test_error_at_best_valid",
    }
    assert base | EXPECTED[name] <= set(scalars)
    assert not (set(scalars) & OPTIONAL) - EXPECTED[name] - ({"charts/pl_accuracy"} if name == "pl" else set())
    assert all(len(v) > 0 and all(torch.isfinite(torch.tensor(v))) for v in scalars.values())
    assert len(scalars["losses/vat"]) == 4 and min(scalars["losses/vat"]) > 0
    eps = json.load(open(os.path.join(run_dir, "args.json")))["vat_eps"]
    assert all(abs(n - eps) < 1e-4 * eps for n in scalars["charts/vat_r_adv_norm"])
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert SUMMARY_KEYS <= set(summary) and summary["steps"] == 4 and summary["steps_per_second"] > 0
    for key in ("final_valid_error", "final_test_error", "best_valid_error", "test_error_at_best_valid"):
        assert 0.0 <= summary[key] <= 100.0
    assert os.path.isfile(os.path.join(run_dir, "checkpoint.pt")) and os.path.isfile(
        os.path.join(run_dir, "split.json")
    )


def test_ns3l_term_is_zero_when_off_and_nonzero_when_on(runs):
    """total - supervised - vat_weight * vat (ramp 1) is the NS3L term: 0 without --ns3l, 0.3 * ns3l with it."""
    for name in ("vat", "ns3l"):
        scalars = read_scalars(runs[name][3])
        residual = [
            t - s - 0.3 * v
            for t, s, v in zip(scalars["losses/total"], scalars["losses/supervised"], scalars["losses/vat"])
        ]
        if name == "vat":
            assert max(abs(r) for r in residual) < 1e-5
        else:
            assert min(residual) > 1e-4
            assert all(abs(r - 0.3 * n) < 1e-5 for r, n in zip(residual, scalars["losses/ns3l"]))


def test_vat_kl_flag_reaches_the_loss(runs):
    """Same seed, same first batch and r search: only the loss direction differs, so the first VAT losses differ."""
    default, miyato = (read_scalars(runs[name][3])["losses/vat"] for name in ("vat", "miyato"))
    assert default[0] != pytest.approx(miyato[0], rel=1e-3)
    assert json.load(open(os.path.join(runs["vat"][3], "args.json")))["vat_kl"] == "oliver"


def test_resume_continues_the_run(runs):
    run_dir = runs["vat"][3]
    proc = launch(["--resume", run_dir, "--total-steps", "6"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resumed" in out and json.load(open(os.path.join(run_dir, "summary.json")))["steps"] == 6
    assert len(read_scalars(run_dir)["losses/vat"]) == 6


@pytest.mark.parametrize(
    "bad",
    [["--vat-eps", "0"], ["--vat-eps", "-1"], ["--vat-iterations", "0"], ["--vat-xi", "0"], ["--vat-weight", "-0.1"]],
)
def test_bad_inputs_rejected_with_one_line(capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        train_vat.parse_args([*TINY, *bad])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and bad[0] in lines[0]


def test_bad_input_writes_nothing(runs):
    code, out, err, runs_dir = runs["bad"]
    assert code != 0 and "--vat-eps" in err and "Traceback" not in err
    assert not os.path.exists(runs_dir)
