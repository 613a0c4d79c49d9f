"""NS3L paper (ICML) Table 1: Supervised, Pseudo-Label, NS3L, VAT, VAT + EntMin, Pi, Pi + NS3L, VAT + NS3L on
CIFAR-10 (4,000 labels), SVHN (1,000) and CIFAR-100 (10,000); Protocol A (Oliver et al.), WRN-28-2, 200k steps,
ramp-up 50k, LR x0.2 at 130k, 5 seeds = 5 labeled splits, test error at the best validation error.

Every hyperparameter is the scripts' default, which is the paper's (section 4.4): NS3L T = 0.04 (0.004 on
CIFAR-100), lambda1 = 1, LR 6e-4; VAT + NS3L LR 6e-4, lambda1 = lambda2 = 0.3 (CIFAR-100: LR 3e-3, lambda2 = 0.6);
Pi + NS3L as NS3L. Also defaults: the supervised baseline trains on 100 labeled images per step (Oliver et al.'s
dataset_mode=labeled), the others on 50 labeled + 50 unlabeled; labeled and unlabeled sets are disjoint (the paper's
4,000 + 41,000 counts); VAT's loss is KL(p(x + r_adv) || p(x)) (Oliver et al.'s direction). One GPU run of WRN-28-2 for
200k steps takes a few hours; a VAT step costs about three NS3L steps (clean, search and perturbed passes; CPU ratio in
docs/benchmarks.md).

    python benchmark/paper/table1_protocol_a.py                  # print the 120 commands and the paper's numbers
    python benchmark/paper/table1_protocol_a.py --run --setting cifar10 -- --data-dir data --download
    python benchmark/paper/table1_protocol_a.py --report
"""

import sys

from _paper import Config, main

SEEDS = [1, 2, 3, 4, 5]
ROWS = [  # (name, argv after the dataset flags, {setting: (paper mean, std)})
    (
        "supervised",
        ["train_supervised.py"],
        {"cifar10": (20.76, 0.28), "svhn": (12.39, 0.53), "cifar100": (48.26, 0.25)},
    ),
    (
        "pseudo-label",
        ["train_supervised.py", "--pseudo-label"],
        {"cifar10": (17.56, 0.29), "svhn": (7.70, 0.22), "cifar100": (46.91, 0.31)},
    ),
    (
        "ns3l",
        ["train_supervised.py", "--ns3l"],
        {"cifar10": (16.03, 0.05), "svhn": (6.52, 0.22), "cifar100": (46.34, 0.37)},
    ),
    ("vat", ["train_vat.py"], {"cifar10": (14.72, 0.23), "svhn": (6.20, 0.11), "cifar100": (44.38, 0.56)}),
    (
        "vat+entmin",
        ["train_vat.py", "--entmin"],
        {"cifar10": (14.34, 0.18), "svhn": (6.10, 0.02), "cifar100": (43.92, 0.44)},
    ),
    ("pi", ["train_pi.py"], {"cifar10": (17.12, 0.19), "svhn": (8.48, 0.15), "cifar100": (47.87, 0.34)}),
    ("pi+ns3l", ["train_pi.py", "--ns3l"], {"cifar10": (16.06, 0.21), "svhn": (7.98, 0.18), "cifar100": (46.98, 0.41)}),
    (
        "vat+ns3l",
        ["train_vat.py", "--ns3l"],
        {"cifar10": (13.94, 0.10), "svhn": (5.51, 0.14), "cifar100": (43.70, 0.19)},
    ),
]
DATA = {
    "cifar10": ["--dataset", "cifar10", "--num-labeled", "4000"],
    "svhn": ["--dataset", "svhn", "--num-labeled", "1000"],
    "cifar100": ["--dataset", "cifar100", "--num-labeled", "10000"],
}
SETTINGS = {
    setting: [Config(name, argv[:1] + data + argv[1:], paper[setting]) for name, argv, paper in ROWS]
    for setting, data in DATA.items()
}

if __name__ == "__main__":
    sys.exit(main("table1", "NS3L paper Table 1 (Protocol A, WRN-28-2)", SETTINGS, SEEDS))
