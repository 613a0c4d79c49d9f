"""A run's bookkeeping, the same for every training script: the one-line error contract, the device flags and
their resolution (precision, memory format, torch.compile, seeds and determinism), the training clock, run
directories, checkpoints and --resume, RNG state, the error rate of a model and TensorBoard / summary.json writing.
No algorithm and no evaluation rule lives here: each script states the number it reports."""

import argparse
import contextlib
import datetime
import fcntl
import importlib.util
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import torch


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default when it has one (a flag whose default is None is resolved later, as its help says) and
    keeps the description's and the epilog's line breaks (the defaults table)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, '<prog>: error: <message>' on stderr and exit 2, without the usage block
    (the full usage is one --help away), and whose --help shows every default. Flags must be spelt out: an
    abbreviation (--batch for --batch-size) is an error, so what a command line says is what the run records, and
    --resume sees every flag given with it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        message = re.sub(r"^argument (-[-\w]+)(?:/\S+)?: must", r"\1 must", message)  # a validating type's message
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message):
    """``message`` on one line whatever it quotes: a newline or other control character (in a path, say) is escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def fail(message, code=1):
    """Print one clear line on stderr and exit non-zero (bad input never produces a traceback). Under torchrun every
    rank meets the same error; only rank 0 prints it."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{os.path.basename(sys.argv[0]) or 'error'}: error: {one_line(message)}", file=sys.stderr, flush=True)
    stop_tracking(exit_code=code)
    discard_unfinished_run()
    discard_resumed_leg()
    for run_dir in list(_locks):  # the process ends here; release now for a caller that goes on (tests, notebooks)
        unlock_run_dir(run_dir)
    sys.exit(code)


def add_run_args(group):
    """The run flags every WRN script and the Fashion-MNIST ablation share: --seed (numpy's range), --runs-dir,
    --run-name (a plain directory name) and --resume (a run directory)."""
    group.add_argument("--seed", type=seed, default=1, help="seed of the run; also picks the labeled subset")
    group.add_argument("--runs-dir", default="runs", help="where run directories are created")
    group.add_argument(
        "--run-name",
        type=run_name,
        default=None,
        help="run directory name (default <dataset>__<script>__<seed>__<time>)",
    )
    group.add_argument(
        "--resume",
        type=existing_path,
        default=None,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint",
    )
    add_tracking_args(group)


# Flags that change no result: a --resume may give them with other values than the run's (see resume_args).
TRACKING = ("track", "wandb_project_name", "wandb_entity")


class _TrackFlag(argparse.BooleanOptionalAction):
    """--track / --no-track; --track checks at once that wandb is installed (one line, exit 1, before any data)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        if getattr(namespace, self.dest) and importlib.util.find_spec("wandb") is None:
            fail("--track needs wandb: pip install wandb==0.31.0 (the version the tests use), or run without --track")


def add_tracking_args(group):
    """CleanRL's experiment tracking: --track also sends the run's TensorBoard scalars and its arguments to Weights &
    Biases (wandb is imported only then; WANDB_MODE=offline keeps the W&B run on disk, in RUN_DIR/wandb)."""
    group.add_argument(
        "--track", action=_TrackFlag, default=False, help="also log to Weights & Biases (needs wandb installed)"
    )
    group.add_argument("--wandb-project-name", default="ns3l", help="the W&B project of --track")
    group.add_argument("--wandb-entity", default=None, help="the W&B entity (team or user) of --track")


def add_device_args(group, exact_fp32="Evaluation always runs in exact fp32"):
    """The device flags every WRN script shares: --cuda, --torch-deterministic, --bf16, --channels-last, --compile
    (resolved by precision(), compile_model() and seed_everything())."""
    group.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA when available")
    group.add_argument(
        "--torch-deterministic",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, no "
        "benchmark): bit-reproducible on the same machine and software, slower on GPU",
    )
    group.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for training forward passes (default: on for CUDA, off on CPU; --bf16 forces "
        f"it on the CPU too). {exact_fp32}",
    )
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: the faster format of the device, FASTER_FORMAT: "
        "channels_last on CUDA and on the CPU)",
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model for the training passes (default: on for CUDA, off on the CPU, "
        "where compiling takes about a minute); the first step, which compiles, is timed apart and "
        "left out of SPS. Evaluation and checkpoints use the uncompiled module",
    )


# The memory format of a device when --channels-last is not given: the faster one, measured on the training step
# (docs/benchmarks.md, "Memory format"). CPU: the WRN-28-2 forward + backward is 11-17 % faster in channels_last
# (2-core AVX2, oneDNN). CUDA: channels_last is what cuDNN's tensor-core convolutions want under bf16 autocast.
FASTER_FORMAT = {"cuda": True, "cpu": True}


def compile_model(model, args, device):
    """The module the training passes call: torch.compile(model) with --compile (default on CUDA), else the model.

    The compiled module shares its parameters and buffers with ``model``, so the optimiser, the EMA, evaluation
    (which calls ``model`` itself, eagerly) and ``model.state_dict()`` see one set of weights and checkpoints hold
    no compiler wrapper. Every variant of a pass (training mode, BatchNorm updates on or off via wrn.no_bn_update,
    autocast on or off, an input that needs a gradient) is a guard on the compiled code: each gets its own graph
    the first time it runs, i.e. within the first training step. ``dynamic=False``: every batch shape of a run is
    fixed, so static shapes give the fastest kernels."""
    enabled = device.type == "cuda" if args.compile is None else args.compile
    if not enabled:
        return model
    config = torch._dynamo.config  # room for every pass variant x shape (named recompile_limit in newer PyTorch)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 16))
    # Guard on the attributes of the model's modules (wrn.BatchNorm2d.update_stats, training): the default from
    # PyTorch 2.5 on; on 2.4 a flipped module attribute could otherwise go unseen and run the wrong graph.
    if torch.__version__ < "2.5":  # TorchVersion compares as a version; the flag is deprecated (always on) later
        config.inline_inbuilt_nn_modules = True
    return torch.compile(model, dynamic=False)


class TrainClock:
    """Training time and steps per second of a run, across --resume legs.

    ``start()`` / ``pause()`` bracket training (evaluation and checkpoints are outside); ``step()`` counts a timed step,
    except the first step of a leg whose model is compiled: its time (compilation included) is printed once as
    compile_seconds and left out of both the time and the step count, so SPS and ETA are the compiled speed. ``lap()``
    gives the steps per second since the previous lap over training time only: its step count and its time run over the
    same steps, also when an evaluation falls inside the interval. CUDA is synchronised only at these calls, never per
    step."""

    def __init__(self, device, seconds=0.0, steps=0):
        self.device, self.seconds, self.steps = device, float(seconds), int(steps)  # totals, checkpointed
        self.compile_seconds = None
        self._lap_seconds, self._lap_steps, self._started = 0.0, 0, None

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self):
        self._started = self._now()

    def pause(self):
        elapsed = self._now() - self._started
        self.seconds += elapsed
        self._lap_seconds += elapsed
        self._started = None

    def step(self, compiled=False):
        """One training step done. ``compiled``: the model is compiled, so the first step of this leg compiled it;
        that step's time is printed once (compile_seconds) and left out of the time and the step count."""
        if compiled and self.compile_seconds is None:
            self.compile_seconds = self._now() - self._started
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, once
                print(
                    f"compile: the first step took {self.compile_seconds:.1f} s with compilation (not in SPS)",
                    flush=True,
                )
            self._started = self._now()
            return
        self.steps += 1
        self._lap_steps += 1

    def lap(self):
        """Steps per second since the previous lap (training time only); starts the next lap."""
        now = self._now()
        self._lap_seconds += now - self._started
        self.seconds += now - self._started
        self._started = now
        sps = self._lap_steps / self._lap_seconds if self._lap_steps and self._lap_seconds > 0 else float("nan")
        self._lap_seconds, self._lap_steps = 0.0, 0
        return sps

    def steps_per_second(self):
        return self.steps / self.seconds if self.seconds > 0 and self.steps else None

    def summary(self):
        """The clock's summary.json keys: steps_per_second over training time only, compile_seconds, train_seconds."""
        return {
            "steps_per_second": self.steps_per_second(),
            "compile_seconds": self.compile_seconds,
            "train_seconds": self.seconds,
        }


# ---------------------------------------------------------------------------------------------- run directories
# A run directory is made only after everything that can fail has been checked, and it is never left half made: a new
# run that fails before its first checkpoint (bad input found late, an exception, Ctrl-C) removes what it created. A
# training process holds an exclusive lock on its run directory for its whole life (flock, released by the OS when the
# process dies, however it dies), so a second process, e.g. a sweep rerun while an orphaned run still writes, is
# refused instead of writing into the same directory.
_unfinished = {"run_dir": None, "writer": None, "created": []}  # this process's new run directory until its first
# checkpoint, its TensorBoard writer and the folders of --runs-dir made for it
_resumed = {
    "run_dir": None,
    "writer": None,
    "before": set(),
    "run_info": None,
    "wandb": None,
}  # a resumed run until its checkpoint
_locks = {}  # run directory -> the open file descriptor holding its lock


def existing_path(text):
    """argparse type of a path flag such as --resume: not empty (an empty string would read as 'not given')."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return text


def run_name(text):
    """argparse type of --run-name: a plain directory name, so the run stays inside --runs-dir."""
    if not text or text in (".", "..") or "/" in text or (os.altsep and os.altsep in text) or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a plain directory name (no '/', not '.' or '..'), got {text!r}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise argparse.ArgumentTypeError(f"must be valid UTF-8, got {text!r}") from None
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be printable (no newline, tab or control character), got {text!r}")
    if size > 255:  # NAME_MAX of Linux and macOS file systems
        raise argparse.ArgumentTypeError(f"must be at most 255 bytes long, got {size}")
    return text


def run_dir_problem(runs_dir, run_dir):
    """Why a new run cannot be made at ``run_dir`` under ``runs_dir`` (one line), or None. Reads only."""
    if os.path.lexists(run_dir):
        if os.path.isdir(run_dir) and not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            return (
                f"run directory {run_dir} already exists and holds no checkpoint (its run stopped before the first "
                f"one, or another process is starting it): choose another --run-name, or, if no process uses it, "
                f"remove it (rm -r {run_dir}) and start again; its arguments are in {run_dir}/args.json"
            )
        return (
            f"run directory {run_dir} already exists: choose another --run-name, or continue it with --resume {run_dir}"
        )
    parent = os.path.abspath(runs_dir)
    while not os.path.lexists(parent):  # the nearest part of --runs-dir that exists must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--runs-dir {runs_dir}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--runs-dir {runs_dir}: {parent} is not writable"
    return None


def lock_run_dir(run_dir, flag="--resume"):
    """Hold an exclusive lock on ``run_dir`` until this process ends; one line and exit 1 when another process holds
    it. Writes nothing: the lock is on the directory itself. Under torchrun rank 0 holds it for every rank."""
    if run_dir in _locks or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        fail(f"{flag} {run_dir}: cannot open the run directory ({error.strerror})")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fail(f"{flag} {run_dir}: another process is running in that run directory; wait for it or stop it first")
    _locks[run_dir] = fd


def unlock_run_dir(run_dir):
    """Release the lock early (a process that runs several runs, such as the tests); the OS releases it at exit."""
    fd = _locks.pop(run_dir, None)
    if fd is not None:
        os.close(fd)


def create_run_dir(runs_dir, run_name):
    """Make a fresh run directory and lock it; an existing one is never reused or overwritten, and nothing is created
    when the name is taken or --runs-dir is unusable (one line, exit 1). Until the run's first checkpoint, a failure
    of this process removes the directory again (discard_unfinished_run)."""
    run_dir = os.path.join(runs_dir, run_name)
    problem = run_dir_problem(runs_dir, run_dir)
    if problem:
        fail(problem)
    created = []  # the folders of --runs-dir made here, deepest first: removed again with a run that fails early
    parent = os.path.abspath(runs_dir)
    while not os.path.lexists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(runs_dir, exist_ok=True)
        os.mkdir(run_dir)  # not makedirs: of two processes racing for one name, exactly one gets it
    except FileExistsError:
        fail(run_dir_problem(runs_dir, run_dir) or f"run directory {run_dir} already exists")
    except OSError as error:
        _remove_empty(created)
        fail(f"--runs-dir {runs_dir}: cannot create {run_dir} ({error.strerror})")
    lock_run_dir(run_dir, "run directory")
    _unfinished.update(run_dir=run_dir, writer=None, created=created)
    return run_dir


def _remove_empty(folders):
    for folder in folders:  # deepest first; a folder something else wrote into stays
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def discard_resumed_leg():
    """Remove the event files a resumed run added since its checkpoint, when it fails before its next one: a refused
    resume leaves the run directory as it was."""
    if os.getpid() != _owner_pid:
        return
    run_dir, writer, before, run_info, tracked = (
        _resumed[k] for k in ("run_dir", "writer", "before", "run_info", "wandb")
    )
    _resumed.update(run_dir=None, writer=None, before=set(), run_info=None, wandb=None)
    if run_dir is None:
        return
    with contextlib.suppress(Exception):
        writer.close()
    for name in set(os.listdir(run_dir)) - before:
        if name.startswith("events.out.tfevents"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_dir, name))
        elif name == "wandb":  # --track given first on this leg
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    if tracked is not None and "wandb" in before:  # a tracked run's W&B folder as it was: this leg's files go
        restore_listing(os.path.join(run_dir, "wandb"), tracked)
    if run_info is not None:  # the leg's provenance record goes too: run_info.json as it was
        with contextlib.suppress(OSError):
            if run_info:
                write_json(os.path.join(run_dir, RUN_INFO), run_info)
            else:
                os.remove(os.path.join(run_dir, RUN_INFO))


def listing(folder):
    """{name: the link's target, or None for a file or folder} of ``folder``'s entries ({} when it does not exist)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    path = os.path.join
    return {n: os.readlink(path(folder, n)) if os.path.islink(path(folder, n)) else None for n in names}


def restore_listing(folder, before):
    """Remove the entries of ``folder`` that ``before`` (a listing) lacks and point its links back where they were."""
    for name, target in listing(folder).items():
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if name not in before:
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            elif before[name] is not None and target != before[name]:
                os.remove(path)
                os.symlink(before[name], path)


def discard_unfinished_run():
    """Remove this process's new run directory if the run fails before its first checkpoint (called by fail() and by
    an exception that ends the process), so a failed start never leaves a half-made directory that blocks the name."""
    if os.getpid() != _owner_pid:  # a forked child (a DataLoader worker) leaves its parent's run alone
        return
    run_dir, writer, created = _unfinished["run_dir"], _unfinished["writer"], _unfinished.get("created", [])
    _unfinished.update(run_dir=None, writer=None, created=[])
    if run_dir is None or os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        return
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    unlock_run_dir(run_dir)
    _remove_empty(created)


class Terminated(BaseException):
    """SIGTERM (kill, timeout, a cluster's scheduler) raised in the main thread, so it ends a run as Ctrl-C does."""


def _terminate(signum, frame):
    raise Terminated()


def _discard_then_report(hook):
    def excepthook(kind, value, traceback):
        if os.getpid() != _owner_pid:  # a forked worker (a DataLoader's) never removes its parent's run directory
            return hook(kind, value, traceback)
        stop_tracking(exit_code=1)  # W&B's files are complete before a discard removes them
        discard_unfinished_run()
        discard_resumed_leg()
        if issubclass(kind, (KeyboardInterrupt, Terminated)):  # the run's choice to stop, not a bug: one line
            what = "Ctrl-C" if issubclass(kind, KeyboardInterrupt) else "SIGTERM"
            print(f"{os.path.basename(sys.argv[0]) or 'error'}: stopped by {what}", file=sys.stderr, flush=True)
            return
        if _out_of_memory(value):  # a size the machine cannot hold (a huge --width or batch): one line, not a traceback
            print(
                f"{os.path.basename(sys.argv[0]) or 'error'}: error: out of memory "
                f"({one_line(str(value).splitlines()[0] if str(value) else kind.__name__)}); "
                "use a smaller model or batch",
                file=sys.stderr,
                flush=True,
            )
            return  # the process then exits with status 1, as after any uncaught exception
        hook(kind, value, traceback)

    return excepthook


def _out_of_memory(error):
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


_owner_pid = os.getpid()
sys.excepthook = _discard_then_report(sys.excepthook)  # an exception that ends the process, Ctrl-C included
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _terminate)  # SIGTERM cleans up as Ctrl-C does (kill, timeout, Slurm)


def open_run(args, script, split=None, checkpoint=None, dataset_name=None):
    """(run_dir, TensorBoard writer). A new run gets runs/<dataset>__<script>__<seed>__<unix time> (or --run-name),
    created and locked only now, after the data and flags were checked, with its args.json and split.json (when the
    script has a ``split``); a resumed run reopens args.resume (locked by load_checkpoint) and purges the events
    logged after its checkpoint's step (a crashed leg's; those at the step itself were written before the checkpoint
    was saved). Either way the leg's provenance is appended to run_info.json (record_leg). ``dataset_name``: the name
    in the run directory (default: --dataset's file name)."""
    from torch.utils.tensorboard import SummaryWriter  # here: the data helpers above must not need tensorboard

    wandb = tracker(args)  # a resumed run that was tracked is tracked again: wandb must be here, checked first
    if checkpoint is None:
        dataset_name = dataset_name or os.path.basename(args.dataset)
        run_name = args.run_name or f"{dataset_name}__{script}__{args.seed}__{int(time.time())}"
        run_dir = create_run_dir(args.runs_dir, run_name)
        write_json(os.path.join(run_dir, "args.json"), vars(args))
        if split is not None:
            split.save(os.path.join(run_dir, "split.json"))
    else:
        run_dir = args.resume
        before = set(os.listdir(run_dir))
    device = (
        "cuda" if getattr(args, "cuda", False) and torch.cuda.is_available() else "cpu"
    )  # as the scripts resolve it
    previous = record_leg(run_dir, 0 if checkpoint is None else checkpoint["step"], device)
    if checkpoint is not None:  # until its next checkpoint, a failure removes the files this leg added (see below)
        _resumed.update(
            run_dir=run_dir, before=before, run_info=previous, wandb=listing(os.path.join(run_dir, "wandb"))
        )
    if wandb is not None:  # before the SummaryWriter: W&B follows the event files of writers made after its patch
        start_tracking(wandb, args, run_dir)
    writer = SummaryWriter(run_dir, purge_step=None if checkpoint is None else checkpoint["step"] + 1)
    _tracking["writer"] = writer if wandb is not None else None  # flushed before W&B finishes, however the run ends
    if checkpoint is None:
        _unfinished["writer"] = writer
    else:  # the event file this leg opened goes too (its steps would be purged)
        _resumed["writer"] = writer
    writer.add_text("hyperparameters", hparams_table(args))
    return run_dir, writer


RUN_INFO = "run_info.json"
ROOT = os.path.dirname(os.path.abspath(__file__))


def git_state(root=ROOT):
    """{"commit": HEAD's hash, "dirty": whether tracked files differ from it} of the checkout at ``root``, or None for
    both when it is not a git checkout or git is missing."""
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        status = ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]  # no index.lock race
        dirty = bool(subprocess.run(status, **run).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def provenance(device=None):
    """What produced a run leg: code (git commit, uncommitted changes), command line, library versions, machine and
    start time. ``device``: a torch.device; the CUDA device's name when it is one, else the CPU's."""
    import torchvision

    cuda = device is not None and torch.device(device).type == "cuda"
    return {
        **git_state(),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_name():
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def record_leg(run_dir, start_step, device=None):
    """Append this leg's provenance (and the step it starts from) to run_dir/run_info.json, {"legs": [...]}: a new run
    writes the first record, each --resume adds one. Returns the file's previous content ({} when there was none),
    for discard_resumed_leg."""
    path = os.path.join(run_dir, RUN_INFO)
    previous = {}
    if os.path.exists(path):
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            previous = json.load(f)
    legs = list(previous.get("legs", [])) if isinstance(previous, dict) else []
    write_json(path, {"legs": legs + [{"start_step": start_step, **provenance(device)}]})
    return previous


def tracker(args):
    """The wandb module when the run tracks (--track, or a resumed run that did), else None; one line without it."""
    if not getattr(args, "track", False):
        return None
    try:
        import wandb
    except ImportError:
        fail("--track needs wandb: pip install wandb==0.31.0 (the version the tests use), or resume with --no-track")
    return wandb


def start_tracking(wandb, args, run_dir):
    """One W&B run per run directory: its id is drawn once and kept in RUN_DIR/wandb/run_id, so a --resume continues
    the same W&B run. The run's arguments are its config; the scalars come from the TensorBoard event files of this
    run directory (wandb.tensorboard.patch, save=False: W&B reads the scalars and copies no event file, so its own
    files in RUN_DIR/wandb hold none for it to follow again). A failing wandb.init (no login, a bad entity) is one
    line, and a new run directory goes with it."""
    id_path = os.path.join(run_dir, "wandb", "run_id")
    try:
        with open(id_path) as f:
            run_id = f.read().strip()
    except OSError:
        run_id = ""
    if not re.fullmatch(r"[a-z0-9]{8}", run_id):
        run_id = "".join(random.SystemRandom().choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    hook = sys.excepthook
    wandb.tensorboard.patch(root_logdir=run_dir, save=False)
    try:
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            name=os.path.basename(os.path.abspath(run_dir)),
            id=run_id,
            resume="allow",
            dir=run_dir,
            config=vars(args),
        )
    except Exception as error:  # noqa: BLE001 (wandb raises many kinds): one line, the new run discarded
        wandb.tensorboard.unpatch()
        fail(f"--track: wandb.init failed ({type(error).__name__}: {error}); WANDB_MODE=offline keeps the run on disk")
    finally:
        sys.excepthook = hook  # wandb's own hook prints a traceback on Ctrl-C; ours finishes W&B (stop_tracking)
    with open(id_path, "w") as f:
        f.write(run_id + "\n")


_tracking = {"writer": None}


def stop_tracking(exit_code=0, writer=None):
    """Finish the W&B run of --track, if there is one, after flushing ``writer`` (W&B reads the event files to their
    end). A run that fails is finished with exit code 1 (W&B shows it as failed)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    writer = writer or _tracking["writer"]
    _tracking["writer"] = None
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.flush()
    main = threading.current_thread() is threading.main_thread()
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in stops} if main and exit_code else {}
    try:  # a failing run: a second Ctrl-C / SIGTERM while W&B finishes (it may upload) cannot cut the cleanup short
        with contextlib.suppress(Exception):
            wandb.finish(exit_code=exit_code)
        with contextlib.suppress(BaseException):  # W&B's own exit hook off: a dead wandb-core is no traceback
            wandb.teardown(exit_code)
        with contextlib.suppress(Exception):
            wandb.tensorboard.unpatch()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def write_json(path, obj):
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(obj), f, indent=2, sort_keys=True, allow_nan=False)
    os.replace(tmp, path)


def strict_json(obj):
    """``obj`` with every NaN / infinity as None: strict JSON (RFC 8259) has no NaN, and readers such as jq or a
    browser's JSON.parse reject Python's bare NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(value) for value in obj]
    return obj


def save_checkpoint(path, state):
    """torch.save atomically (temp file + rename). A run's first checkpoint.pt makes its directory worth keeping."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if os.path.basename(path) == "checkpoint.pt" and os.path.dirname(path) == _unfinished["run_dir"]:
        _unfinished.update(run_dir=None, writer=None, created=[])
    if os.path.basename(path) == "checkpoint.pt" and os.path.dirname(path) == _resumed["run_dir"]:
        _resumed.update(run_dir=None, writer=None, before=set())


def save_run(run_dir, script, args, step, clock, **state):
    """RUN_DIR/checkpoint.pt of a WRN script: what every run needs to resume (the script that wrote it, its arguments,
    the step, every RNG, the training clock) plus the script's own ``state`` (weights, optimiser, samplers, its
    evaluation record), written atomically."""
    run = {"script": script, "args": vars(args), "step": step, "rng": rng_state()}
    run |= {"train_time": clock.seconds, "timed_steps": clock.steps}
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), run | state)


def restore_run(checkpoint, device, **stateful):
    """The counterpart of save_run: load each object's state from the checkpoint entry of the same name (model=...,
    optimizer=..., labeled_sampler=...), restore every RNG, and return the training clock where the run left it. Call
    it inside ``restoring``, so a checkpoint that does not fit is one line."""
    for key, obj in stateful.items():
        obj.load_state_dict(checkpoint[key])
    set_rng_state(checkpoint["rng"])
    return TrainClock(device, checkpoint["train_time"], checkpoint.get("timed_steps", checkpoint["step"]))


def load_checkpoint(run_dir, script, flag="--resume"):
    """Read RUN_DIR/checkpoint.pt written by ``script``; any problem is one line and exit 1, nothing is touched. With
    --resume the run directory is locked first, for the life of this process (lock_run_dir)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isdir(run_dir):
        fail(f"{flag} {run_dir}: no such run directory")
    if flag == "--resume":
        lock_run_dir(run_dir)  # before reading: a process still writing there is refused, not joined
    if not os.path.isfile(path):
        if flag == "--resume" and os.path.isfile(os.path.join(run_dir, "args.json")):
            fail(
                f"{flag} {run_dir}: the run stopped before its first checkpoint, so there is nothing to continue; "
                f"remove it (rm -r {run_dir}) and start it again (its arguments are in {run_dir}/args.json)"
            )
        fail(f"{flag} {run_dir}: no checkpoint.pt in that directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle garbage, wrong types: all mean "corrupt"
        fail(f"{flag} {run_dir}: checkpoint.pt is corrupt or unreadable ({type(error).__name__})")
    if (
        not isinstance(checkpoint, dict)
        or checkpoint.get("script") != script
        or not isinstance(checkpoint.get("args"), dict)
    ):
        fail(f"{flag} {run_dir}: checkpoint.pt was not written by {script}")
    if not isinstance(checkpoint.get("step"), int) or checkpoint["step"] < 0:
        fail(f"{flag} {run_dir}: checkpoint.pt has no valid step count")
    return checkpoint


@contextlib.contextmanager
def restoring(run_dir):
    """Around a script's restore of its checkpoint's state: a checkpoint.pt that loads but does not fit (another
    model's weights, a missing or mistyped entry) is one line and exit 1, and the resumed run keeps nothing of this
    attempt (discard_unfinished_run removes the event file it opened)."""
    try:
        yield
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError, AttributeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        fail(f"--resume {run_dir}: checkpoint.pt does not fit this run ({type(error).__name__}: {detail[:200]})")


def resume_args(args, checkpoint, argv, overrides=("total_steps", "cuda", "compile"), legacy=True):
    """The resumed run keeps its saved arguments; only the ``overrides`` given on this command line (--total-steps
    to extend a run, the device flags --cuda and --compile) replace them. ``legacy``: give the arguments of a
    WRN-script run saved before the fidelity review their old meaning (legacy_args)."""
    saved = argparse.Namespace(**checkpoint["args"])
    # a run started before these flags existed keeps the meaning it had
    if legacy and "channels_last" not in vars(saved):
        legacy = legacy_args(vars(saved))
        for name, value in legacy.items():
            setattr(saved, name, value)
        print(
            f"--resume {args.resume}: arguments of an older version, kept with their old meaning "
            f"({', '.join(f'{k}={v}' for k, v in sorted(legacy.items()))})"
        )
    if legacy and "compile" not in vars(saved) and saved.channels_last is None:  # before channels_last on the CPU
        saved.channels_last = bool(saved.cuda and torch.cuda.is_available())  # it meant: on for CUDA, off on the CPU
        print(
            f"--resume {args.resume}: a run from before --compile keeps its memory format "
            f"(channels_last={saved.channels_last})"
        )
    for name, value in vars(args).items():  # flags added later still need a value
        if name not in vars(saved):
            setattr(saved, name, value)
    overrides = tuple(overrides) + TRACKING
    for name in overrides:
        flags = ["--" + name.replace("_", "-")] + (["--no-" + name] if name in ("cuda", "compile", "track") else [])
        if any(a == flag or a.startswith(flag + "=") for a in argv for flag in flags):
            setattr(saved, name, getattr(args, name))
    # Any other flag given with --resume would be ignored: refuse it when it differs from the saved run's value.
    conflicts = []
    for flag in dict.fromkeys(a.split("=", 1)[0] for a in argv if a.startswith("--")):
        name = flag[2:].replace("-", "_")
        if name not in vars(args) and name.startswith("no_"):
            name = name[3:]
        if (
            name in vars(args)
            and name != "resume"
            and name not in overrides
            and getattr(args, name) != vars(saved).get(name)
        ):
            conflicts.append(f"{flag} {getattr(args, name)} (the run has {vars(saved).get(name)})")
    if conflicts:
        allowed = ", ".join("--" + name.replace("_", "-") for name in overrides)
        fail(
            f"--resume {args.resume} continues the run with its saved arguments, and these differ from them: "
            f"{'; '.join(conflicts)}. Only {allowed} may change; drop the others, or start a new run",
            code=2,
        )
    saved.resume = args.resume
    if checkpoint["step"] >= saved.total_steps:
        fail(
            f"--resume {args.resume}: the run already finished {checkpoint['step']} steps; pass --total-steps "
            f"larger than that to extend it"
        )
    return saved


def legacy_args(saved):
    """What the arguments added with the fidelity review meant before they existed: the labeled images were in the
    unlabeled stream unless --exclude-labeled, VAT's loss was KL(p(x) || p(x + r_adv)), and bf16 / channels_last
    applied to CUDA only."""
    legacy = {"channels_last": None}
    if "exclude_labeled" in saved:
        legacy["include_labeled"] = not saved["exclude_labeled"]
    if "vat_eps" in saved:
        legacy["vat_kl"] = "miyato"
    if saved.get("bf16") is True:
        legacy["bf16"] = None
    return legacy


def rng_state():
    """Every RNG a run touches, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed, deterministic):
    """Seed every RNG. ``deterministic``: cuDNN's deterministic kernels with benchmarking off, and
    torch.use_deterministic_algorithms(True), so any op without a deterministic kernel raises instead of silently
    varying (with the cuBLAS workspace setting it needs on CUDA). With it, a run repeats bit for bit on the same
    machine, software and device; without it (the default), cuDNN benchmarks its kernels and runs differ slightly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call (CUDA docs)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def precision(args, device):
    """(autocast context, memory format) of a run. ``--bf16`` left unset means on for CUDA, off for the CPU (bf16 is
    slower than fp32 on CPUs without AVX-512 BF16); ``--channels-last`` left unset takes the device's faster format
    (FASTER_FORMAT). Set explicitly, both apply on either device, so the CPU test suite runs the CUDA code paths.
    ``--no-bf16`` on CUDA means the original code's arithmetic: fp32 with TF32 off for the whole run (PyTorch lets
    cuDNN convolutions use TF32 by default on Ampere / Hopper; TF 1, which the original code ran on, had no TF32)."""
    use_bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    channels_last = FASTER_FORMAT.get(device.type, False) if args.channels_last is None else args.channels_last
    if not use_bf16 and device.type == "cuda":
        set_tf32("ieee", "ieee")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    return autocast, (torch.channels_last if channels_last else torch.contiguous_format)


def set_tf32(matmul, conv):
    """Set the fp32 precision of cuBLAS matmuls and cuDNN convolutions ('ieee' = exact fp32, 'tf32'; 'none' = PyTorch's
    default) and return the previous pair. PyTorch >= 2.9 API (mixing it with reads of the legacy allow_tf32 flags
    raises in PyTorch, so nothing here reads those); older versions use the allow_tf32 flags."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision") and hasattr(
        getattr(backends.cudnn, "conv", None), "fp32_precision"
    ):
        previous = (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision)
        backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = matmul, conv
        return previous
    previous = tuple(
        "tf32" if flag else "ieee" for flag in (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)
    )
    backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = matmul == "tf32", conv != "ieee"
    return previous


@contextlib.contextmanager
def exact_fp32(device_type):
    """Plain fp32 arithmetic inside: autocast off, and TF32 off for cuDNN convolutions and cuBLAS matmuls (PyTorch lets
    cuDNN convolutions use TF32 by default on Ampere / Hopper, a 10-bit mantissa). Used for VAT's r search (xi = 1e-6
    vanishes at lower precision) and for evaluation (Oliver et al. and the MixMatch code evaluate in fp32)."""
    previous = set_tf32("ieee", "ieee") if device_type == "cuda" else None  # TF32 is a CUDA matter only
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if previous is not None:
            set_tf32(*previous)


@torch.inference_mode()
def error_rate(model, images, labels, normalize, batch_size=1000, memory_format=torch.contiguous_format):
    """Test error in percent of ``model`` (eval mode, running BN statistics) on uint8 images held on the device, in
    exact fp32 whatever autocast the caller runs under (exact_fp32)."""
    if len(images) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=images.device)
    with exact_fp32(images.device.type):
        for i in range(0, len(images), batch_size):
            x = normalize(images[i : i + batch_size]).contiguous(memory_format=memory_format)
            logits = model(x)
            wrong += (logits.argmax(1) != labels[i : i + batch_size]).sum()
    model.train(was_training)
    return 100.0 * wrong.item() / len(images)


def interval_means(sums, steps):
    """{tag: mean over the log interval} of scalars summed on the device since the last log: one device sync."""
    return dict(zip(sums, (torch.stack(list(sums.values())) / steps).tolist())) if sums else {}


def write_scalars(writer, step, scalars, walltime=None):
    """One TensorBoard point per {tag: value}; a nan value is skipped (the SPS of an interval that held only the
    compiling step, a validation error without a validation set)."""
    for tag, value in scalars.items():
        if value == value:
            writer.add_scalar(tag, value, step, walltime=walltime)


def progress_line(step, total_steps, sps, **values):
    """The line a log prints: the step, the given values, training steps per second and the ETA at that speed."""
    eta = (total_steps - step) / sps if sps > 0 else float("nan")  # nan SPS: nan ETA
    shown = " ".join(f"{name} {value:.4g}" for name, value in values.items())
    return f"step {step}/{total_steps} {shown} SPS {sps:.2f} ETA {eta / 60:.1f} min"


def write_summary(writer, run_dir, summary, args, reported):
    """summary.json (``summary``; ``reported_metric``, the key of the number the script reports, ``reported[0]``, which
    benchmark/report.py --metric reported reads; the CPU thread count its numbers were measured with; the run's args)
    and TensorBoard's hparams entry holding the ``reported`` metrics (keys of ``summary``); closes the writer. The
    thread count belongs to a result: on the CPU it changes the summation order, so one seed's error differs between
    1 and 2 threads."""
    summary = {**summary, "reported_metric": reported[0], "cpu_threads": torch.get_num_threads(), "args": vars(args)}
    write_json(os.path.join(run_dir, "summary.json"), summary)
    stop_tracking(writer=writer)  # before add_hparams, whose writer W&B would follow too (its hparam/ metrics again)
    writer.add_hparams(
        {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        {f"hparam/{key}": summary[key] for key in reported if summary[key] is not None and math.isfinite(summary[key])},
        run_name=".",
    )
    writer.close()
    return summary


def hparams_table(args):
    """Markdown table of the arguments for TensorBoard's text tab."""
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in sorted(vars(args).items()))


# ------------------------------------------------------------------------------------- flag values and defaults
# Validating argparse types: a bad value is the parser's one-line error ('--lr must be > 0, got -1', exit 2).
def _number(cast, test, rule):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            kind = "a whole number" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind} {rule}, got {text!r}") from None
        if not test(value):  # nan fails every comparison, so it never passes
            finite = "finite and " if math.isinf(value) else ""
            raise argparse.ArgumentTypeError(f"must be {finite}{rule}, got {text}")
        limit = 2**31 - 1 if cast is int else 3.4e38  # a count; a float torch holds in float32 without overflow
        if abs(value) > limit:
            raise argparse.ArgumentTypeError(f"must be {rule} and at most {limit:,}, got {text}")
        return value

    parse.__name__ = rule  # what --help and argparse's messages call the type
    return parse


positive_int = _number(int, lambda v: v >= 1, ">= 1")
nonnegative_int = _number(int, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: 0 < v < math.inf, "> 0")
nonnegative_float = _number(float, lambda v: 0 <= v < math.inf, ">= 0")
open_unit = _number(float, lambda v: 0 < v < 1, "in (0, 1)")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
momentum = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
ema_decay = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
wrn_depth = _number(int, lambda v: v >= 10 and (v - 4) % 6 == 0, "6n + 4 >= 10")
seed = _number(int, lambda v: 0 <= v < 2**32, "in [0, 2^32 - 1]")  # numpy's seed range


def fill_defaults(args, table, key):
    """Every flag of ``table[key]`` left unset (None) takes the table's value."""
    for name, value in table[key].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def defaults_epilog(table, sources):
    """The --help text under the flags: the table of per-data-set defaults, one row per --dataset, and where each
    row comes from (``sources``: {dataset: source})."""
    names = list(dict.fromkeys(name for row in table.values() for name in row))
    cells = [["--dataset"] + ["--" + name.replace("_", "-") for name in names]]
    cells += [
        [key] + [f"{row[name]:g}" if isinstance(row.get(name), float) else str(row.get(name, "-")) for name in names]
        for key, row in table.items()
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    return (
        "defaults per --dataset (a flag given on the command line wins; 'npz' = a path to an .npz file):\n"
        + "\n".join(lines)
        + "\n\nwhere they come from:\n"
        + "\n".join(f"  {key}: {source}" for key, source in sources.items())
    )


def warn_bn_momentum(bn_momentum, total_steps):
    """One warning line when the run is too short for BatchNorm's running statistics to follow the weights: they
    average over about 1 / bn_momentum steps, and evaluation (which uses them) is wrong when that is more than a tenth
    of the run (measured: a 200-step run at 0.001 evaluated at 92 % error, at 0.1 at 34 %)."""
    suggested = min(1.0, float(f"{20 / total_steps:.0e}"))  # ~1/20 of the run; 1 = the last batch's statistics
    if bn_momentum * total_steps < 10 and bn_momentum < suggested:
        print(
            f"warning: --bn-momentum {bn_momentum:g} averages BatchNorm statistics over ~{1 / bn_momentum:.0f} steps, "
            f"more than a tenth of --total-steps {total_steps}: evaluation will see stale statistics; for a run "
            f"this short pass --bn-momentum {suggested:g}",
            flush=True,
        )
