"""The ``ddpm-fast`` command: ``train``, ``sample``, ``fid-stats``, ``fid``, ``demo`` and ``bench``.

Every subcommand is a thin layer over the Python API (``training.train``, ``generate.sample_to_folder``,
``fid``, ``demo.run_demo``, ``bench.run``). A user error (bad option value, missing or broken file) prints one
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
                   help="'digits' (bundled 8x8 digits, the default), an image folder, a .zip of images (EDM's "
                        "dataset_tool format), a CIFAR-10 batch folder, a .npz/.npy file, or a folder made by "
                        "prepare-data")
    p.add_argument("--data-cache", metavar="DIR",
                   help="where a file source is decoded once and found again by every later run (default: "
                        "$DDPM_FAST_DATA_CACHE or ~/.cache/ddpm-fast/data); 'off': decode into memory each start")
    p.add_argument("--data-in-memory", action="store_true",
                   help="read the prepared images into RAM instead of memory-mapping them")
    p.add_argument("--data-workers", type=positive_int, help="processes decoding image files (default: one per CPU)")
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
    p.add_argument("--schedule", choices=["linear", "cosine"],
                   help="noise schedule: linear (Ho et al., the default) or cosine (Nichol & Dhariwal; the quick demo's)")
    p.add_argument("--lr-decay", choices=["none", "cosine"],
                   help="after the warmup: constant (none, the default) or half a cosine down to 0 at --steps "
                        "(a resume with another --steps reshapes the rest of the decay)")
    p.add_argument("--snr-gamma", type=positive_float,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's); default: none")
    p.add_argument("--save-every", type=nonnegative_int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--sample-every", type=nonnegative_int, help="write a sample grid every N steps (0: off)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="do not torch.compile the model (compile is on by default on CUDA only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--fid-every", type=nonnegative_int,
                   help="every N steps (and at the end) log the FID of EMA samples into log.jsonl (0: off)")
    p.add_argument("--fid-ref", metavar="REF", help="FID reference: a statistics .npz from fid-stats (or images)")
    p.add_argument("--fid-samples", type=positive_int, help="samples per FID (default 5000; 50000 for the paper figure)")
    _add_inception_weights(p)
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
                         schedule=args.schedule or "linear", lr_decay=args.lr_decay or "none",
                         snr_gamma=args.snr_gamma,
                         save_every=args.save_every, sample_every=args.sample_every, seed=args.seed,
                         device=args.device, compile=args.compile, resume=args.resume, progress=args.progress,
                         unet=unet, fid_every=args.fid_every or 0, fid_ref=args.fid_ref,
                         inception_weights=args.inception_weights, data_cache=args.data_cache,
                         data_in_memory=args.data_in_memory, data_workers=args.data_workers,
                         **({"fid_samples": args.fid_samples} if args.fid_samples else {}))
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


def _add_prepare_data(sub) -> None:
    p = sub.add_parser("prepare-data", help="decode a dataset once into a memory-mappable uint8 folder",
                       description="Decode SOURCE (an image folder, a .zip of images as EDM's dataset_tool.py "
                                   "writes them, a CIFAR-10 batch folder, or a uint8 .npz/.npy) once, in parallel "
                                   "processes, into DIR: images.npy (uint8 NHWC), labels.npy where the source has "
                                   "labels, and meta.json. train --data DIR memory-maps it: the processes of a "
                                   "machine share one copy. Written under a temporary name and renamed when done.")
    p.add_argument("source", help="an image folder, a .zip of images, a CIFAR-10 batch folder or a uint8 .npz/.npy")
    p.add_argument("--out", help="the folder to write (default: the cache folder train would use, under "
                                 "--data-cache)")
    p.add_argument("--data-cache", metavar="DIR", help="the cache root used without --out (default: "
                                                       "$DDPM_FAST_DATA_CACHE or ~/.cache/ddpm-fast/data)")
    p.add_argument("--image-size", type=positive_int,
                   help="resize the shorter side to this (bicubic) and center-crop square (default: the data's size)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="convert to grayscale (1) or RGB (3)")
    p.add_argument("--split", default="train", choices=["train", "test", "all"], help="CIFAR-10 batches to read")
    p.add_argument("--array-key", help=".npz only: the array to read")
    p.add_argument("--workers", type=positive_int, help="decoding processes (default: one per CPU, up to 16)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_prepare_data)


def _run_prepare_data(args) -> int:
    from .data import open_prepared, prepare_data, read_meta

    out = prepare_data(args.source, args.out, image_size=args.image_size, channels=args.channels, split=args.split,
                       array_key=args.array_key, workers=args.workers, progress=args.progress,
                       cache_root=args.data_cache)
    meta = read_meta(out)
    labels = meta["labels"]
    label_note = f", {labels['count']} labels from {labels['from']}" if labels else ", no labels"
    print(f"prepared {out}: {open_prepared(out).describe()}{label_note}; sha256 {meta['sha256'][:16]}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a run, a checkpoint or a diffusers UNet folder",
                       description="Write DIR/grid.png, DIR/samples.npz (arr_0: uint8 NHWC) and DIR/run.json. "
                                   "Image i is a pure function of seed i, whatever the batch size. Progress is "
                                   "kept in DIR/unfinished/ after every round: SIGTERM/SIGINT stops after the "
                                   "round in flight, and --resume continues with the same bytes.")
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
    p.add_argument("--lambda-min-clipped", type=float, metavar="LAMBDA",
                   help="dpmpp-*: skip the noisiest timesteps whose log(alpha/sigma) is below LAMBDA "
                        "(diffusers' option; default -inf, none skipped; write --lambda-min-clipped=-inf for it). "
                        "Models trained on the cosine schedule need it: the demo uses -3; diffusers suggests -5.1")
    p.add_argument("--variance", choices=["fixed_large", "fixed_small"],
                   help="sigma^2 = beta (fixed_large, Ho; the default for ddpm-fast runs) or the posterior "
                        "variance (fixed_small)")
    p.add_argument("--clip", dest="clip", action="store_true", default=None,
                   help="clip the predicted x0 to [-1, 1] each step (the default)")
    p.add_argument("--no-clip", dest="clip", action="store_false")
    p.add_argument("--batch-size", type=positive_int,
                   help="images per batch (does not change the images; --resume keeps the folder's)")
    p.add_argument("--png-per-image", action="store_true", help="also write DIR/images/NNNNNN.png, named by seed")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--reference", action="store_true",
                   help="sample with the oracle (reference.sample, reference.solver_sample for the multistep "
                        "solvers) on the same seed-keyed noise")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; cuda:LOCAL_RANK "
                                    "under torchrun)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--fid", metavar="REF",
                   help="also compute FID against REF (a statistics .npz from fid-stats or pytorch-fid, a samples.npz "
                        "or an image folder), from the finished samples; printed and written to DIR/fid.json")
    _add_inception_weights(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out with its missing seeds (same settings; under torchrun "
                        "at any number of processes); on a finished folder, say so and write nothing")
    p.set_defaults(func=_run_sample, resume_parser=p)


def _add_inception_weights(p) -> None:
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
                        "$DDPM_FAST_INCEPTION_WEIGHTS, torch.hub's cache, else torch-fidelity downloads it)")


def _run_sample(args) -> int:
    from .distributed import env_rank
    from .generate import parse_seeds, sample_to_folder

    seeds = parse_seeds(args.seeds)
    options = {key: value for key, value in (("order", args.solver_order), ("solver_type", args.solver_type),
                                             ("corrector", args.corrector),
                                             ("timestep_spacing", args.timestep_spacing),
                                             ("lambda_min_clipped", args.lambda_min_clipped)) if value is not None}
    fid, fid_hooks = None, {}
    if args.fid is not None:  # reference and weights first: a bad --fid fails before any sampling
        fid = _fid_setup(args.fid, args.inception_weights, args.device, args.batch_size)
        fid_hooks = {"after": lambda group, images: _fid_of_samples(fid, images)}
    def stop_line(result) -> str:
        again = " (under torchrun as before, at any number of processes)" if _world_size() > 1 else ""
        return (f"ddpm-fast: stopped by {result.stopped_by} after {result.seeds_done:,} of {result.num_images:,} "
                f"images, progress kept in {args.out}; continue with: {_resume_command(args)}{again}")

    result = sample_to_folder(args.source, args.out, seeds, steps=args.steps, variance=args.variance,
                              clip_x0=args.clip, reference=args.reference, batch_size=args.batch_size,
                              png_per_image=args.png_per_image, use_ema=args.ema, device=args.device,
                              solver=args.solver, solver_options=options, progress=args.progress,
                              resume=args.resume, stop_line=stop_line, **fid_hooks)
    if result.stopped_by:  # rank 0 has said so, from inside the group
        return _stop_status(result.stopped_by)
    if env_rank() != 0:  # rank 0 speaks for the job
        return 0
    if result.already_finished:
        print(f"{args.out} is already finished: {result.num_images:,} images, samples.npz sha256 "
              f"{(result.samples_sha256 or '?')[:16]}...; nothing was rewritten")
        return 0
    s, m = result.settings, result.meta
    step = f" step {m['step']}" if m.get("step") is not None else ""
    solver = s["solver"]
    detail = ", ".join(f"{k} {v}" for k, v in solver.items() if k in ("order", "solver_type", "eta"))
    noise = f"{s['variance']}, " if solver["solver"] == "ddpm" else ""
    resumed = f" ({result.resumed_from:,} were done before this resume)" if result.resumed_from else ""
    print(f"sampled {result.num_images} images{resumed} from {m['path']}{step} ({m['weights']} weights) with "
          f"{s['sampler']}, {solver['solver']}{f' ({detail})' if detail else ''}, {s['steps']} steps, {noise}"
          f"clip {'on' if s['clip_x0'] else 'off'}, on {s['device']} in {result.seconds:.1f} s")
    print(f"wrote {result.paths['grid']}, {result.paths['npz']} and {result.paths['run']}"
          + (f" and {result.paths['images']}/" if "images" in result.paths else ""))
    if fid is not None:
        _finish_sample_fid(args, fid, result)
    return 0


def _world_size() -> int:
    from .distributed import env_world_size

    return env_world_size()


def _resume_command(args) -> str:
    """The ``ddpm-fast sample ... --resume`` command line that continues this run (the options as given)."""
    parser, parts, seen = args.resume_parser, ["ddpm-fast", "sample", args.source, "--out", args.out], {"out"}
    defaults = vars(parser.parse_args([args.source, "--out", args.out]))  # what each option is when not given
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in ("help", "resume") or dest in seen:
            continue
        seen.add(dest)
        value = getattr(args, dest, None)
        if value == defaults.get(dest):
            continue
        if action.nargs == 0:  # --clip/--no-clip, --no-ema...: the flag that stores this value
            parts.append(next(a.option_strings[0] for a in parser._actions if a.dest == dest and a.const == value))
        else:
            parts += [action.option_strings[0], str(value)]
    return shlex.join(parts + ["--resume"])


def _fid_setup(ref, weights, device, batch_size) -> dict:
    """Extractor, reference statistics and an empty collector for ``sample --fid``."""
    from .fid import DEFAULT_FID_BATCH, FIDCollector, load_extractor, reference_stats
    from .distributed import resolve_device

    extractor = load_extractor(weights, device=resolve_device(device))
    reference = reference_stats(ref, extractor, batch_size or DEFAULT_FID_BATCH)
    return {"extractor": extractor, "ref": reference, "collector": FIDCollector(extractor)}


def _fid_of_samples(fid: dict, images) -> dict:
    """Rank 0 (``images`` is the finished uint8 (N, H, W, C) array): the FID of exactly these images, their
    features taken in seed order in fixed batches, so a resumed run's FID equals an uninterrupted run's
    bit for bit. Returns the entries run.json records (empty on the other ranks)."""
    import numpy as np
    import torch

    from .fid import DEFAULT_FID_BATCH
    from .fid_stats import frechet_distance

    if images is None:
        return {}
    collector, ref = fid["collector"], fid["ref"]
    for lo in range(0, len(images), DEFAULT_FID_BATCH):
        block = np.array(images[lo:lo + DEFAULT_FID_BATCH])  # a writable copy of the memory-mapped rows
        collector.add_uint8(torch.from_numpy(block).permute(0, 3, 1, 2))
    mu, sigma = collector.stats.mean_cov()  # this rank's own sums: no all_reduce, rank 0 saw every image
    return {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "fid_num_samples": collector.stats.n,
            "fid_ref": ref["path"], "fid_weights_sha256": fid["extractor"].info["weights_sha256"]}


def _finish_sample_fid(args, fid: dict, result) -> None:
    """Rank 0: print the FID and write DIR/fid.json (FID, seeds, steps, solver settings, weights' hash, times)."""
    from pathlib import Path

    from .checkpoint import write_json_atomic

    ref, value = fid["ref"], result.extra["fid"]
    record = {"fid": value, "num_samples": result.extra["fid_num_samples"], "seeds": args.seeds,
              "ref": ref["path"], "ref_kind": ref["kind"], "ref_num_images": ref["n"], "source": result.meta["path"],
              "weights": result.meta["weights"], "checkpoint_step": result.meta.get("step"), **result.settings,
              "samples_sha256": result.samples_sha256,
              "sample_seconds": result.seconds, "feature_seconds": result.hook_seconds,
              **{f"inception_{k}" if k != "feature_extractor" else k: v for k, v in fid["extractor"].info.items()}}
    path = write_json_atomic(Path(args.out) / "fid.json", record)
    print(f"FID {value:.4f} ({record['num_samples']} samples vs {ref['path']}; sampling {result.seconds:.1f} s, "
          f"features {result.hook_seconds:.1f} s); wrote {path}")


def _add_fid_stats(sub) -> None:
    p = sub.add_parser("fid-stats", help="Inception statistics (mu, sigma) of a dataset, for FID",
                       description="Write OUT.npz with mu and sigma (float64, pytorch-fid's keys) of torch-fidelity's "
                                   "Inception pool3 features of SOURCE: any --data source (a CIFAR-10 batch folder "
                                   "(training batches), an image folder, an .npz/.npy of images, 'digits').")
    p.add_argument("source", help="a CIFAR-10 batch folder, an image folder, a samples.npz or other image array file")
    p.add_argument("--out", required=True, help="the statistics file to write (.npz)")
    _add_fid_input_options(p)
    p.set_defaults(func=_run_fid_stats)


def _add_fid_input_options(p) -> None:
    _add_inception_weights(p)
    p.add_argument("--batch-size", type=positive_int, help="images per Inception batch (default 200)")
    p.add_argument("--image-size", type=positive_int,
                   help="resize and center-crop image folders of mixed sizes to this size first")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def _run_fid_stats(args) -> int:
    from pathlib import Path

    from .fid import DEFAULT_FID_BATCH, compute_stats, fid_input, load_extractor
    from .fid_stats import save_stats
    from .distributed import resolve_device

    if Path(args.out).suffix != ".npz":
        raise ValueError(f"--out must end in .npz (pytorch-fid's statistics format), got {args.out}")
    item = fid_input(args.source, image_size=args.image_size, strict_npz=False)
    if item.stats is not None:
        raise ValueError(f"{args.source} already holds statistics (mu, sigma): pass it to fid --ref directly")
    extractor = load_extractor(args.inception_weights, device=resolve_device(args.device))
    mu, sigma, n = compute_stats(item.dataset, extractor, args.batch_size or DEFAULT_FID_BATCH)
    path = save_stats(args.out, mu, sigma, n=n, weights_sha256=extractor.info["weights_sha256"])
    print(f"wrote {path}: Inception statistics of {n} images from {item.dataset.source} "
          f"({mu.shape[0]}-d, weights sha256 {extractor.info['weights_sha256'][:12]})")
    return 0


def _add_fid(sub) -> None:
    p = sub.add_parser("fid", help="FID between samples and a reference",
                       description="Print the FID between SAMPLES and REF, each a statistics .npz (mu, sigma), a "
                                   "samples.npz (arr_0: uint8 NHWC), an image folder or another --data source. "
                                   "Inception (torch-fidelity) is loaded only when one side holds images.")
    p.add_argument("samples", help="samples.npz, an image folder or a statistics .npz")
    p.add_argument("--ref", required=True, help="reference: a statistics .npz (e.g. from fid-stats), images or a folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    p.add_argument("--kid", action="store_true",
                   help="also KID (torch-fidelity's 100 subsets of 1000); both sides must be images, whose features "
                        "are then kept in memory")
    _add_fid_input_options(p)
    p.set_defaults(func=_run_fid)


def _run_fid(args) -> int:
    import json

    from .fid import DEFAULT_FID_BATCH, fid_between, fid_input, load_extractor
    from .distributed import resolve_device

    samples = fid_input(args.samples, image_size=args.image_size)
    ref = fid_input(args.ref, image_size=args.image_size)
    extractor = None
    if samples.stats is None or ref.stats is None:
        extractor = load_extractor(args.inception_weights, device=resolve_device(args.device))
    result = fid_between(samples, ref, extractor, args.batch_size or DEFAULT_FID_BATCH, kid=args.kid)
    result.update(samples=samples.path, ref=ref.path)
    if extractor is not None:
        result.update(extractor.info)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        counts = [f"{n} images" if n is not None else "statistics" for n in (result["n_samples"], result["n_ref"])]
        print(f"FID {result['fid']:.4f}  ({samples.path}: {counts[0]}; {ref.path}: {counts[1]})")
        if "kid" in result:
            print(f"KID {result['kid']:.6f} +- {result['kid_std']:.6f}  ({result['kid_subsets']} subsets of "
                  f"{result['kid_subset_size']})")
    return 0


def _add_demo(sub) -> None:
    from .demo import DEFAULT_RECIPE

    p = sub.add_parser("demo", help="train on the bundled digits, sample, and report quality and timings",
                       description="Train the digits U-Net on scikit-learn's bundled 8x8 digits (no download), "
                                   "sample 400 digits, write DIR/samples.png, keep the run at DIR/run-RECIPE and "
                                   "print the quality figure and where the time went. About 70 s on 2 CPU cores "
                                   "(README); --full takes the longer recipe (docs/demo_study.md).")
    p.add_argument("--out", default="ddpm_demo", help="output folder (default: ./ddpm_demo)")
    p.add_argument("--quick", dest="recipe", action="store_const", const="quick", default=DEFAULT_RECIPE,
                   help="the default recipe: a (24, 48, 48) U-Net, 1,500 steps at batch 64 on the cosine noise "
                        "schedule, 20 DPM-Solver++ steps, into DIR/run-quick (FD 9.4 +- 1.1 over nine training "
                        "seeds; docs/demo_study.md)")
    p.add_argument("--full", dest="recipe", action="store_const", const="full",
                   help="the digits preset (1,500 steps at batch 128) and 250 of the 1,000 DDPM steps, into "
                        "DIR/run-full: about 2.2x the time, FD 10.0 +- 2.0 over the same seeds")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="training seed (default 0)")
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

    run_demo(args.out, recipe=args.recipe, steps=args.steps, num_samples=args.num_samples,
             sample_steps=args.sample_steps, preset=args.preset, seed=args.seed, device=args.device,
             compile=args.compile, progress=args.progress)
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
    """The argparse parser of ``ddpm-fast`` (subcommands train, sample, fid-stats, fid, demo and, when present, bench)."""
    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Fast, reference-checked DDPM training and "
                                                                   "sampling.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ddpm-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,prepare-data,sample,fid-stats,fid,demo,bench}")
    sub.required = True
    _add_train(sub)
    _add_prepare_data(sub)
    _add_sample(sub)
    _add_fid_stats(sub)
    _add_fid(sub)
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
