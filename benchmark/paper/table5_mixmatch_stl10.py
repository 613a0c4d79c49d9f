"""NS3L paper (ICML) Table 5: MixMatch and MixMatch + NS3L on STL-10 with 1,000 labels and the 100,000 unlabeled
images (Protocol B: 96x96, 4 WRN stages, flip + pad-12 crop, lambda_u = 50, NS3L T = 0.05, lambda1 = 2 —
train_mixmatch.py's STL-10 defaults), 5 seeds. The paper trained "significantly fewer epochs" than MixMatch's 2^20
steps without saying how many; 2^18 steps is our choice (pass --total-steps to change it).
The workshop paper's Table 5 (Fashion-MNIST negative-selection ablation) is reproduced by benchmark/fmnist_table.py.

    python benchmark/paper/table5_mixmatch_stl10.py [--run | --report]
"""

import sys

from _paper import Config, main

SEEDS = [1, 2, 3, 4, 5]
STEPS = str(2**18)
SETTINGS = {
    "stl10-1000": [
        Config(
            "mixmatch",
            ["train_mixmatch.py", "--dataset", "stl10", "--num-labeled", "1000", "--total-steps", STEPS],
            (22.20, 0.89),
        ),
        Config(
            "mixmatch+ns3l",
            ["train_mixmatch.py", "--dataset", "stl10", "--num-labeled", "1000", "--total-steps", STEPS, "--ns3l"],
            (21.74, 0.33),
        ),
    ]
}

if __name__ == "__main__":
    sys.exit(
        main("table5", "NS3L paper Table 5 (MixMatch, STL-10)", SETTINGS, SEEDS, metric="median_last20_test_error")
    )
