"""NS3L paper (ICML) Table 2: what to add to VAT — EntMin, Pseudo-Label or NS3L — on CIFAR-10 (4,000 labels) and
CIFAR-100 (10,000); Protocol A, WRN-28-2, 200k steps, 5 seeds. VAT, VAT + EntMin and VAT + NS3L are the same runs as
Table 1 (same commands and run names: point --runs-dir at Table 1's runs to reuse them).

VAT + PL: the paper "performs extensive hyperparameter tuning" and does not give the values; train_vat.py's
defaults are Oliver et al.'s Pseudo-Label alone (threshold 0.95, weight 1) at VAT's LR 3e-3 — expect to tune
--pl-weight / --lr to match 14.15.

    python benchmark/paper/table2_vat_combinations.py [--run | --report]
"""

import sys

from _paper import Config, main

SEEDS = [1, 2, 3, 4, 5]
ROWS = [
    ("vat", ["--"], {"cifar10": (14.72, 0.23), "cifar100": (44.38, 0.56)}),
    ("vat+entmin", ["--entmin"], {"cifar10": (14.34, 0.18), "cifar100": (43.92, 0.44)}),
    ("vat+pseudo-label", ["--pseudo-label"], {"cifar10": (14.15, 0.14), "cifar100": (43.93, 0.33)}),
    ("vat+ns3l", ["--ns3l"], {"cifar10": (13.94, 0.10), "cifar100": (43.70, 0.19)}),
]
DATA = {
    "cifar10": ["--dataset", "cifar10", "--num-labeled", "4000"],
    "cifar100": ["--dataset", "cifar100", "--num-labeled", "10000"],
}
SETTINGS = {
    setting: [
        Config(name, ["train_vat.py"] + data + [f for f in flags if f != "--"], paper[setting])
        for name, flags, paper in ROWS
    ]
    for setting, data in DATA.items()
}

if __name__ == "__main__":
    sys.exit(main("table2", "NS3L paper Table 2 (VAT + EntMin / PL / NS3L)", SETTINGS, SEEDS))
