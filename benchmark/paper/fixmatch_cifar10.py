"""FixMatch (RA) and FixMatch (RA) + NS3L on CIFAR-10 with 40, 250 and 4,000 labels, beside the FixMatch paper's
Table 2 (Sohn et al. 2020, "FixMatch (RA)" row, error rate mean ± std over 5 folds). Every setting is a
train_fixmatch.py default (the official google-research/fixmatch code: WRN-28-2, 64 labeled + 7 x 64 unlabeled,
tau 0.95, lambda_u 1, SGD Nesterov 0.9, LR 0.03 with the 7/16 cosine, wd 5e-4, EMA 0.999, 2^20 steps, RandAugment +
Cutout, 1 validation image); NS3L: T = 0.05, lambda_1 = 1 (a small CPU sweep selected on validation,
docs/fixmatch_l1_sweep.md: no paper gives FixMatch + NS3L values, so that row has no reference number). Reported
number: the median test error of the last 20 evaluations (one per 1,024 steps, README and scripts/extract_accuracy.py
of the official code), mean ± std over 5 seeds.
A run is 2^20 steps of 960 images: about a day on one modern GPU.

    python benchmark/paper/fixmatch_cifar10.py [--run | --report]
"""

import sys

from _paper import Config, main

SEEDS = [1, 2, 3, 4, 5]
PAPER = {"40": (13.81, 3.37), "250": (5.07, 0.65), "4000": (4.26, 0.05)}  # FixMatch paper, Table 2, FixMatch (RA)
SETTINGS = {
    f"cifar10-{labels}": [
        Config("fixmatch", ["train_fixmatch.py", "--dataset", "cifar10", "--num-labeled", labels], PAPER[labels]),
        Config(
            "fixmatch+ns3l",
            ["train_fixmatch.py", "--dataset", "cifar10", "--num-labeled", labels, "--ns3l"],
            note="no published number",
        ),
    ]
    for labels in PAPER
}

if __name__ == "__main__":
    sys.exit(
        main(
            "fixmatch", "FixMatch paper Table 2 (FixMatch (RA), CIFAR-10)", SETTINGS, SEEDS, metric="median_test_error"
        )
    )
