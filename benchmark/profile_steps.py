"""Where a training script spends its time: torch.profiler around a short run, the top operators by self time.

    python benchmark/profile_steps.py train_mixmatch.py                       # WRN-28-2, 6 steps, synthetic 32x32x3
    python benchmark/profile_steps.py train_vat.py --steps 10 -- --ns3l       # flags after -- go to the script
    python benchmark/profile_steps.py train_mixmatch.py --root /tmp/old_checkout   # the same on another checkout

The script runs in this process (runpy, as ``python script.py``) on a synthetic 32x32x3 .npz (benchmark/speed.py's),
with one evaluation at the end and one log line; the profile covers the whole run (start-up and that evaluation
included), so the training step dominates only when --steps is not tiny. Printed: the top --rows operators by self
CPU time (plus self CUDA time on a GPU), and the count of host-device synchronisations the profiler saw
(aten::item / aten::_local_scalar_dense, cudaStreamSynchronize / cudaDeviceSynchronize).
"""

import argparse
import os
import runpy
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import make_npz  # noqa: E402

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("script", help="train_supervised.py, train_vat.py, train_pi.py or train_mixmatch.py")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=ROOT, help="checkout whose script is profiled")
    args = parser.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="ns3l_profile_")
    npz = make_npz(os.path.join(workdir, "synthetic32.npz"), num_train=1000, num_test=100)
    script = os.path.join(args.root, args.script)
    sys.argv = [
        script,
        "--dataset",
        npz,
        "--num-labeled",
        "250",
        "--num-valid",
        "100",
        "--depth",
        str(args.depth),
        "--width",
        str(args.width),
        "--total-steps",
        str(args.steps),
        "--eval-every",
        str(args.steps),
        "--log-every",
        str(args.steps),
        "--runs-dir",
        workdir,
        "--run-name",
        "profile",
        *extra,
    ]
    sys.path.insert(0, args.root)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as error:
            if error.code not in (0, None):
                raise
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(averages.table(sort_by=sort, row_limit=args.rows))
    syncs = {e.key: e.count for e in averages if e.key in SYNC_OPS}
    print(
        f"host-device synchronisations over {args.steps} steps (incl. one log and one evaluation): "
        + (", ".join(f"{k} x{v}" for k, v in sorted(syncs.items())) or "none seen")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
