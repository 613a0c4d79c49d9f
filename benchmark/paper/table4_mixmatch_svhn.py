"""NS3L paper (ICML) Table 4: MixMatch and MixMatch + NS3L on SVHN with 250 and 1,000 labels (Protocol B:
lambda_u = 250, crop only, NS3L T = 0.05, lambda1 = 2 — train_mixmatch.py's SVHN defaults), 5 seeds; 307,200
steps (the NS3L paper's 300 epochs of 64 kimg) and 7,325 validation images (the paper's 65,682 / 64,932 unlabeled
images at 250 / 1,000 labels), both the defaults, written out below.

    python benchmark/paper/table4_mixmatch_svhn.py [--run | --report]
"""

import sys

from _paper import Config, main

SEEDS = [1, 2, 3, 4, 5]
PAPER = {
    "250": {"mixmatch": (3.75, 0.09), "mixmatch+ns3l": (3.38, 0.08)},
    "1000": {"mixmatch": (3.28, 0.11), "mixmatch+ns3l": (3.14, 0.11)},
}
DATA = ["--dataset", "svhn", "--num-valid", "7325", "--total-steps", str(300 * 1024)]
SETTINGS = {
    f"svhn-{labels}": [
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
    sys.exit(main("table4", "NS3L paper Table 4 (MixMatch, SVHN)", SETTINGS, SEEDS, metric="median_last20_test_error"))
