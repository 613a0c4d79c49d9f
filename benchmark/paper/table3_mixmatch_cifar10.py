"""NS3L paper (ICML) Table 3: MixMatch and MixMatch + NS3L on CIFAR-10 with 250 and 4,000 labels (Protocol B,
the official google-research/mixmatch settings; WRN-28-2, batch 64 + 64, K = 2, T = 0.5, alpha = 0.75,
lambda_u = 75, Adam 0.002, EMA 0.999, wd 0.02; NS3L T = 0.05, lambda1 = 5 at 250 and 10 at 4,000 — all
train_mixmatch.py defaults). Length: the NS3L paper's "300 epochs" of the official 64-kimg epoch = 307,200 steps of
64 (the default, written out below; the MixMatch paper's own runs used 2^20). Validation: 5,000 images (the NS3L
paper's 45,000 training images). Reported number: median test error of the last 20 evaluations (one per 1024 steps),
mean ± std over 5 seeds.

    python benchmark/paper/table3_mixmatch_cifar10.py [--run | --report]
"""

import sys

from _paper import Config, main

SEEDS = [1, 2, 3, 4, 5]
PAPER = {
    "250": {"mixmatch": (14.49, 1.60), "mixmatch+ns3l": (12.48, 1.21)},
    "4000": {"mixmatch": (7.05, 0.10), "mixmatch+ns3l": (6.92, 0.12)},
}
DATA = ["--dataset", "cifar10", "--num-valid", "5000", "--total-steps", str(300 * 1024)]
SETTINGS = {
    f"cifar10-{labels}": [
        Config("mixmatch", ["train_mixmatch.py", *DATA, "--num-labeled", labels], PAPER[labels]["mixmatch"]),
        Config(
            "mixmatch+ns3l",
            ["train_mixmatch.py", *DATA, "--num-labeled", labels, "--ns3l"],
            PAPER[labels]["mixmatch+ns3l"],
        ),
    ]
    for labels in PAPER
}

if __name__ == "__main__":
    sys.exit(
        main("table3", "NS3L paper Table 3 (MixMatch, CIFAR-10)", SETTINGS, SEEDS, metric="median_last20_test_error")
    )
