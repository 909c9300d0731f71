"""The ``ddpm-fast`` command: ``train``, ``sample``, ``demo`` and ``bench``.

Every subcommand is a thin layer over the Python API (``training.train``, ``generate.sample_to_folder``,
``demo.run_demo``, ``bench.run``). A user error (bad option value, missing or broken file) prints one
line, ``ddpm-fast: error: ...``, and exits with status 2; argparse does the same for unknown options.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from .argtypes import nonnegative_int, positive_float, positive_int
from .errors import DDPMFastError
from .solvers import SOLVERS

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a DDPM (Ho et al.'s recipe) into a run folder",
                       description="Train a DDPM. The run folder gets config.json, log.jsonl, checkpoints/ and "
                                   "samples/; --resume continues a run exactly where its last checkpoint left it.")
    p.add_argument("--data", default=None,
                   help="'digits' (bundled 8x8 digits, the default), an image folder, a CIFAR-10 batch folder "
                        "or a .npz/.npy file")
    p.add_argument("--image-size", type=positive_int,
                   help="resize the shorter side to this and center-crop square (default: the data's size)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="convert to grayscale (1) or RGB (3)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="digits", choices=["digits", "cifar10", "tiny"],
                   help="model size and recipe (default: digits; cifar10 = Ho et al.'s model and recipe)")
    p.add_argument("--steps", type=positive_int, help="total optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int,
                   help="the global batch: under torchrun it is split evenly over the processes (default: "
                        "the preset's)")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (cifar10: 2e-4, digits: 1e-3)")
    p.add_argument("--warmup", type=nonnegative_int, help="linear lr warmup steps")
    p.add_argument("--ema-decay", type=float, help="EMA decay (cifar10: 0.9999, digits: 0.999)")
    p.add_argument("--save-every", type=nonnegative_int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--sample-every", type=nonnegative_int, help="write a sample grid every N steps (0: off)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="do not torch.compile the model (compile is on by default on CUDA only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # hidden: shrink the model (e.g. in tests): --unet-channels 16,32
    p.add_argument("--unet-channels", help=argparse.SUPPRESS)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .distributed import env_rank
    from .training import TrainConfig, train

    unet = {}
    if args.unet_channels:
        try:
            unet["block_out_channels"] = [int(c) for c in args.unet_channels.split(",")]
        except ValueError:
            raise ValueError(f"--unet-channels must be comma-separated ints, got {args.unet_channels!r}") from None
    config = TrainConfig(data=args.data, image_size=args.image_size, channels=args.channels, out=args.out,
                         preset=args.preset, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                         save_every=args.save_every, sample_every=args.sample_every, seed=args.seed,
                         device=args.device, compile=args.compile, resume=args.resume, progress=args.progress,
                         unet=unet)
    result = train(config)
    if env_rank() != 0:  # rank 0 speaks for the job
        return _stop_status(result.stopped_by) if result.stopped_by else 0
    if result.stopped_by:
        again = " (under torchrun as before, at any number of processes)" if result.world_size > 1 else ""
        print(f"ddpm-fast: stopped by {result.stopped_by} after step {result.step}: checkpoint "
              f"{result.checkpoint}; continue with: ddpm-fast train --out {shlex.quote(str(result.run_dir))} "
              f"--resume{again}", file=sys.stderr)
        return _stop_status(result.stopped_by)
    if result.resumed_from is not None and result.resumed_from >= result.step:
        print(f"{result.run_dir} is already at step {result.step}: pass a larger --steps to train on")
        return 0
    note = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    print(f"trained {result.run_dir} to step {result.step}{note}: loss {result.final_loss:.4f}, "
          f"{result.images_per_second:,.0f} images/s, {result.train_seconds:.1f} s; "
          f"checkpoint {result.checkpoint}")
    return 0


def _stop_status(signal_name: str) -> int:
    """128 + the signal's number, the shell's convention for a process ended by a signal."""
    try:
        return 128 + signal.Signals[signal_name].value
    except KeyError:  # another rank's signal stopped this one
        return 128 + signal.SIGTERM.value


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a run, a checkpoint or a diffusers UNet folder",
                       description="Write DIR/grid.png and DIR/samples.npz (arr_0: uint8 NHWC). Image i is a "
                                   "pure function of seed i, whatever the batch size.")
    p.add_argument("source", help="a run folder, a checkpoint (step folder or .safetensors), a diffusers "
                                  "UNet or pipeline folder, or a hub id such as google/ddpm-cifar10-32 (read "
                                  "from the Hugging Face cache; HF_HUB_OFFLINE=1 works once cached)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", default="0-63", help="seeds, one image each: '0-63', '1,5,9', '0-3,10' "
                                                   "(default 0-63)")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: all T for ddpm/ddim, 20 for "
                                                       "the multistep solvers; fewer than T uses the "
                                                       "scheduler's spacing: leading for ddpm/ddim)")
    p.add_argument("--solver", choices=list(SOLVERS),
                   help="ddpm (ancestral, the default for ddpm-fast runs), ddim (eta 0), dpmpp-2m, dpmpp-3m, "
                        "dpmpp-2m-sde (DPM-Solver++) or unipc; default: a saved pipeline's scheduler")
    p.add_argument("--solver-order", type=int, choices=[1, 2, 3], help="multistep solver order (default: "
                                                                      "2, 3 for dpmpp-3m)")
    p.add_argument("--solver-type", choices=["midpoint", "heun", "bh1", "bh2"],
                   help="midpoint/heun (dpmpp-*, default midpoint) or bh1/bh2 (unipc, default bh2)")
    p.add_argument("--no-corrector", dest="corrector", action="store_false", default=None,
                   help="unipc without its corrector")
    p.add_argument("--timestep-spacing", choices=["linspace", "leading", "trailing"],
                   help="how --steps picks timesteps for the multistep solvers (default linspace)")
    p.add_argument("--variance", choices=["fixed_large", "fixed_small"],
                   help="sigma^2 = beta (fixed_large, Ho; the default for ddpm-fast runs) or the posterior "
                        "variance (fixed_small)")
    p.add_argument("--clip", dest="clip", action="store_true", default=None,
                   help="clip the predicted x0 to [-1, 1] each step (the default)")
    p.add_argument("--no-clip", dest="clip", action="store_false")
    p.add_argument("--batch-size", type=positive_int, help="images per batch (does not change the images)")
    p.add_argument("--png-per-image", action="store_true", help="also write DIR/images/seedNNNNNN.png")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--reference", action="store_true",
                   help="sample with the oracle (reference.sample, reference.solver_sample for the multistep "
                        "solvers) on the same seed-keyed noise")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; cuda:LOCAL_RANK "
                                    "under torchrun)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    from .distributed import env_rank
    from .generate import parse_seeds, sample_to_folder

    seeds = parse_seeds(args.seeds)
    options = {key: value for key, value in (("order", args.solver_order), ("solver_type", args.solver_type),
                                             ("corrector", args.corrector),
                                             ("timestep_spacing", args.timestep_spacing)) if value is not None}
    result = sample_to_folder(args.source, args.out, seeds, steps=args.steps, variance=args.variance,
                              clip_x0=args.clip, reference=args.reference, batch_size=args.batch_size,
                              png_per_image=args.png_per_image, use_ema=args.ema, device=args.device,
                              solver=args.solver, solver_options=options, progress=args.progress)
    if env_rank() != 0:
        return 0
    s, m = result.settings, result.meta
    step = f" step {m['step']}" if m.get("step") is not None else ""
    solver = s["solver"]
    detail = ", ".join(f"{k} {v}" for k, v in solver.items() if k in ("order", "solver_type", "eta"))
    noise = f"{s['variance']}, " if solver["solver"] == "ddpm" else ""
    print(f"sampled {result.num_images} images from {m['path']}{step} ({m['weights']} weights) with "
          f"{s['sampler']}, {solver['solver']}{f' ({detail})' if detail else ''}, {s['steps']} steps, {noise}"
          f"clip {'on' if s['clip_x0'] else 'off'}, on {s['device']} in {result.seconds:.1f} s")
    print(f"wrote {result.paths['grid']}, {result.paths['npz']} and {result.paths['run']}"
          + (f" and {result.paths['images']}/" if "images" in result.paths else ""))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train on the bundled digits, sample, and report quality and timings",
                       description="Train the digits preset on scikit-learn's bundled 8x8 digits (no download), "
                                   "sample, write DIR/samples.png, keep the run at DIR/run and print the "
                                   "quality figure and timings. A few minutes on 2 CPU cores.")
    p.add_argument("--out", default="ddpm_demo", help="output folder (default: ./ddpm_demo)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile training and sampling on CUDA (off: the digits model is too small to repay it)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    # hidden: a shorter demo for tests and smoke runs
    p.add_argument("--steps", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--num-samples", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--sample-steps", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--preset", default="digits", choices=["digits", "tiny"], help=argparse.SUPPRESS)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, num_samples=args.num_samples, sample_steps=args.sample_steps,
             preset=args.preset, device=args.device, compile=args.compile, progress=args.progress)
    return 0


def _add_bench(sub) -> None:
    try:
        from . import bench
    except Exception:  # benchmarks are optional: the rest of the CLI works without them
        return
    if not (hasattr(bench, "add_arguments") and hasattr(bench, "run")):
        return
    p = sub.add_parser("bench", help="benchmark training and sampling against the eager baselines")
    bench.add_arguments(p)
    p.set_defaults(func=lambda args: bench.run(args))


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``ddpm-fast`` (subcommands train, sample, demo and, when present, bench)."""
    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Fast, reference-checked DDPM training and "
                                                                   "sampling.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ddpm-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,demo,bench}")
    sub.required = True
    _add_train(sub)
    _add_sample(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DDPMFastError as exc:
        message = str(exc)
    except ValueError as exc:  # our validation raises these with one-line messages naming the fix
        message = str(exc) or exc.__class__.__name__
    except OSError as exc:  # a missing or unwritable path, a full disk
        message = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    except KeyboardInterrupt:
        print("ddpm-fast: interrupted (a training run continues from its last checkpoint with --resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    from .distributed import env_rank, env_world_size, group_was_started

    rank = env_rank()
    if rank != 0 and env_world_size() > 1:
        if not group_was_started():
            # raised before the ranks met: a function of the command line and the files, so every rank
            # raised the same error and rank 0 has printed it
            return EXIT_USAGE
        first_line = f"rank {rank}: {first_line}"
    print(f"ddpm-fast: error: {first_line}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # python -m ddpm_fast.cli
    sys.exit(main())
