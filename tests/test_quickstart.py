"""The README's Quickstart and CI agree, and the install is reproducible: exactly two commands, the second one run
verbatim by .ci/run inside a brand-new virtual environment, and every requirement pinned to one version."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = ["requirements.txt", "requirements-dev.txt", "benchmark/requirements.txt"]


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def quickstart_commands():
    section = read("README.md").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_two_commands_and_ci_runs_the_second_verbatim():
    install_and_train, install_and_test = quickstart_commands()
    assert install_and_train.startswith("pip install -r requirements.txt && python train_")
    assert install_and_test == "pip install -r requirements-dev.txt && python -m pytest -q"
    ci = [line.strip() for line in read(".ci/run").splitlines()]
    assert install_and_test in ci
    # ... after activating a virtual environment it made itself, under a temporary directory that it removes.
    venv = next(i for i, line in enumerate(ci) if re.search(r"-m venv ", line))
    activate = next(i for i, line in enumerate(ci) if line.startswith("source ") and "/bin/activate" in line)
    assert venv < activate < ci.index(install_and_test)
    assert any("mktemp -d" in line for line in ci[:venv]) and any("trap" in line and "rm -rf" in line for line in ci)


def test_every_requirement_is_pinned_to_one_version():
    for path in REQUIREMENTS:
        for line in read(path).splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-r "):
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.+]*", line), f"{path}: {line!r} is not pinned"
    assert "pytest==" in read("requirements-dev.txt") and "torch==2.14.1" in read("requirements.txt")
