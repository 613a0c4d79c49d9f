"""Evaluate a saved run of any WRN script (train_supervised / vat / pi / mixmatch / fixmatch / freematch), finished or
interrupted: rebuild the model from the arguments in its checkpoint, load the weights the method reports (the EMA
model for MixMatch, FixMatch and FreeMatch, the trained model for Protocol A), and print the test error and the error
per class, in exact fp32, eval mode, without gradients.

    python benchmark/evaluate.py runs/digits__train_supervised__1__1733500000
    python benchmark/evaluate.py runs/paper/fixmatch/cifar10-40/fixmatch__seed1 --data-dir /data --json

The data come as the run loaded them (--dataset, --svhn-extra, FixMatch's and FreeMatch's --pad-to) from --data-dir
(default: the run's own), on the run's device unless --cuda / --no-cuda says otherwise. The weights are the
checkpoint's, i.e. those of the last evaluation; for a finished run evaluated on the device and software it ran on, the
test error equals summary.json's final_test_error (checked on the CPU; Protocol A's reported number is the test error at
the best validation error, an earlier checkpoint that is not kept)."""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import bookkeeping  # noqa: E402
import common  # noqa: E402
import wrn  # noqa: E402

SCRIPTS = ("train_supervised", "train_vat", "train_pi", "train_mixmatch", "train_fixmatch", "train_freematch")
EMA = ("train_mixmatch", "train_fixmatch", "train_freematch")  # the methods that report their EMA model
PADDED = ("train_fixmatch", "train_freematch")  # --pad-to


def parse_args(argv=None):
    parser = bookkeeping.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=bookkeeping.existing_path, help="a run directory with a checkpoint.pt")
    parser.add_argument("--data-dir", default=None, help="where the data set is (default: the run's --data-dir)")
    parser.add_argument(
        "--cuda",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use CUDA when available (default: as the run)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    return parser.parse_args(argv)


def read_run(run_dir):
    """(script, checkpoint) of a run directory: the checkpoint of one of SCRIPTS, or one line and exit 1."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        bookkeeping.fail(f"{run_dir}: no checkpoint.pt in that directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        script = checkpoint["script"]
    except Exception as error:
        bookkeeping.fail(f"{run_dir}: checkpoint.pt is corrupt or unreadable ({type(error).__name__})")
    if script not in SCRIPTS:
        bookkeeping.fail(f"{run_dir}: checkpoint.pt was written by {script}, not one of the WRN scripts")
    if not isinstance(checkpoint.get("args"), dict) or not isinstance(checkpoint.get("step"), int):
        bookkeeping.fail(f"{run_dir}: checkpoint.pt has no saved arguments or step")
    return script, checkpoint


def build(script, args, data):
    """The script's model for ``data`` and its input normalisation, as the training run built them."""
    if script == "train_freematch":  # USB's WRN layout and per-data-set mean / std
        module = __import__(script)
        return module.make_model(data.num_classes, args, data.channels), module.input_normalizer(
            data.name, data.channels, data.x_test.device
        )
    if script in EMA:
        module = __import__(script)  # the official-code models: conv biases, leaky ReLU, their own stage count
        return module.make_model(data.num_classes, args, data.channels), common.Normalizer("scale")
    model = wrn.WideResNet(data.num_classes, args.depth, args.width, data.channels, bn_momentum=args.bn_momentum)
    return model, common.make_normalizer(data)


@torch.no_grad()
def predictions(model, images, normalize, memory_format=torch.contiguous_format, batch=1000):
    """Predicted classes of uint8 ``images`` in inference mode and exact fp32 (TF32 and autocast off), in the batches
    and memory format of the runs' own evaluation (bookkeeping.error_rate), so the same arithmetic."""
    model.eval()
    out = []
    with bookkeeping.exact_fp32(images.device.type):
        for start in range(0, len(images), batch):
            x = normalize(images[start : start + batch]).contiguous(memory_format=memory_format)
            out.append(model(x).argmax(1))
    return torch.cat(out)


def main(argv=None):
    options = parse_args(argv)
    script, checkpoint = read_run(options.run_dir)
    args = argparse.Namespace(**checkpoint["args"])
    cuda = getattr(args, "cuda", True) if options.cuda is None else options.cuda
    device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    try:
        data_dir = options.data_dir or args.data_dir
        data = common.load_dataset(args.dataset, data_dir, False, device, getattr(args, "svhn_extra", False))
        if script in PADDED and args.pad_to:
            data.x_train, data.x_test = (common.pad_images(x, args.pad_to) for x in (data.x_train, data.x_test))
    except common.DataError as error:
        bookkeeping.fail(str(error))
    except AttributeError as error:  # a checkpoint of an older version lacks a setting
        bookkeeping.fail(f"{options.run_dir}: the checkpoint lacks what this version needs (AttributeError: {error})")
    weights = "ema_model" if script in EMA else "model"
    try:
        model, normalize = build(script, args, data)
        _, memory_format = bookkeeping.precision(args, device)  # the run's memory format (its arithmetic's rounding)
        model.load_state_dict(checkpoint[weights])
    except (AttributeError, KeyError, TypeError) as error:  # a checkpoint of an older version lacks a setting
        bookkeeping.fail(
            f"{options.run_dir}: the checkpoint lacks what this version needs ({type(error).__name__}: {error})"
        )
    except RuntimeError as error:
        bookkeeping.fail(f"{options.run_dir}: the {weights} weights do not fit the model ({type(error).__name__})")
    model = model.to(device, memory_format=memory_format)
    predicted = predictions(model, data.x_test, normalize, memory_format).cpu()
    truth = data.y_test.cpu()
    wrong = predicted != truth
    per_class = {int(c): 100.0 * wrong[truth == c].sum().item() / (truth == c).sum().item() for c in truth.unique()}
    report = {
        "run_dir": options.run_dir,
        "script": script,
        "step": checkpoint["step"],
        "weights": weights,
        "test_images": len(truth),
        "test_error": 100.0 * wrong.sum().item() / len(truth),  # as bookkeeping.error_rate counts it
        "per_class_error": per_class,
    }
    summary_path = os.path.join(options.run_dir, "summary.json")
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = {}  # an interrupted run, or an unreadable summary: nothing to compare with
    final = summary.get("final_test_error") if isinstance(summary, dict) else None
    if isinstance(final, (int, float)) and summary.get("steps") == checkpoint["step"]:  # the same weights' number
        report["summary_final_test_error"] = final
    if options.json:
        print(json.dumps(bookkeeping.strict_json(report), sort_keys=True))
        return 0
    print(f"{options.run_dir}: {script} at step {checkpoint['step']}, {weights} weights, {len(truth)} test images")
    print(f"test error {report['test_error']:.2f}%", end="")
    if "summary_final_test_error" in report:
        print(f" (summary.json's final_test_error: {report['summary_final_test_error']:.2f}%)", end="")
    print()
    print("per class: " + ", ".join(f"{c}: {e:.2f}%" for c, e in per_class.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
