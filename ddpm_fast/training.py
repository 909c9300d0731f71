"""Training: Ho et al.'s recipe (Algorithm 1) with crash-safe, exactly resumable run folders.

One training step::

    x0      = next(batch stream)                          # (B, C, H, W) float32 in [-1, 1]
    t       ~ U{0..T-1}, from a generator keyed by (seed, step)
    x_t,eps = ops.q_sample_seeded(x0, t, seeds_b, step)   # eps keyed by (per-image seed, step): one fused
                                                          # Triton kernel on CUDA, its torch twin on CPU
    loss    = mean((model(x_t, t) - eps)^2)
    Adam step with linear lr warmup and the gradient norm clipped, then EMA <- lerp(EMA, model, 1 - decay)

Everything random is a pure function of (seed, step) or stored in the checkpoint (the batch stream's
position, torch's global RNG for dropout), so on the CPU a resumed run equals an uninterrupted one.
On CUDA the model runs channels-last under bf16 autocast and is ``torch.compile``'d (``compile=False``
turns that off); the CPU path is plain float32 eager.

Python API: ``train(TrainConfig(data="digits", out="runs/d", preset="digits"))`` -> :class:`RunResult`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from .checks import host_to_device
from .checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    RUN_FORMAT,
    STATE_FILE,
    Checkpoint,
    check_weight_keys,
    find_latest_checkpoint,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json_atomic,
)
from .distributed import Group, collective_errors, planned_world_size, process_group, resolve_device
from .errors import CheckpointError, DDPMFastError
from .preemption import StopSignals
from .schedule import NoiseSchedule

__all__ = ["TrainConfig", "RunResult", "Trainer", "train", "PRESETS", "unet_config_for", "resolve_device"]

# Preset defaults: every TrainConfig field left as None takes its value from here.
# cifar10 is Ho et al.'s recipe (ANCHORS.md section 3). digits is tuned to converge in a couple of CPU
# minutes: a 10x larger lr with a short warmup, and an EMA of 0.999 with the usual (1+n)/(10+n) warmup so
# the average is useful after a few thousand steps instead of the tens of thousands 0.9999 needs; its
# progress grids use 100 of the 1000 steps (about 2 s each on a CPU instead of 16).
PRESETS: dict[str, dict] = {
    "cifar10": dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999,
                    ema_warmup=False, flip=True, save_every=5000, sample_every=20_000, log_every=50),
    "digits": dict(data="digits", steps=1500, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999,
                   ema_warmup=True, flip=False, save_every=500, sample_every=500, sample_steps=100, log_every=25),
    # A small model (UNetConfig.tiny) for tests and smoke runs.
    "tiny": dict(data="digits", steps=20, batch_size=16, lr=1e-3, warmup=5, ema_decay=0.99,
                 ema_warmup=True, flip=False, save_every=10, sample_every=0, log_every=5),
}

LR_DECAYS = ("none", "cosine")  # TrainConfig.lr_decay: what the lr does after its warmup

# Fields that change the mathematics of a run: a resumed run must keep them.
_RUN_DEFINING = ("data", "image_size", "channels", "preset", "batch_size", "lr", "warmup", "lr_decay", "grad_clip",
                 "ema_decay", "ema_warmup", "seed", "num_timesteps", "schedule", "flip", "unet", "snr_gamma")


def unet_config_for(preset: str, channels: int, image_size: int, overrides: dict | None = None):
    """The preset's UNetConfig with its channels and sample size set to the data's (plus overrides)."""
    from .unet import UNetConfig

    makers = {"cifar10": UNetConfig.cifar10, "digits": UNetConfig.digits, "tiny": UNetConfig.tiny}
    base = makers[preset]()
    fields = dict(sample_size=image_size, in_channels=channels, out_channels=channels)
    fields.update(overrides or {})
    return UNetConfig.from_dict({**base.to_dict(), **fields})


@dataclass
class TrainConfig:
    """Settings of a training run. None means "the preset's default" (see :data:`PRESETS`).

    data: "digits", "cifar10"-style path, or any source ``data.load_dataset`` takes (a path as str).
    image_size / channels: resize-and-center-crop size and 1 or 3 channels for ``load_dataset`` (None: the
    data's own).
    out: the run folder. preset: "digits", "cifar10" or "tiny" (model size and recipe).
    steps: total optimizer steps of the run (a resumed run continues up to this number).
    lr / warmup: Adam's learning rate, reached linearly over ``warmup`` steps. grad_clip: max grad norm.
    lr_decay: after the warmup, "none" (constant lr: Ho, every preset) or "cosine" (half a cosine from lr
    down to 0 at ``steps``; benchmarks/demo_study.py measures it for short runs; resuming with another
    ``steps`` reshapes the rest of the decay).
    ema_decay / ema_warmup: EMA of the weights; with warmup the decay is min(decay, (1+n)/(10+n)).
    save_every / sample_every / log_every: in steps; 0 turns checkpoints (except the final one) or
    sample grids off. sample_steps: sampler steps for the grids (None: all T).
    seed: everything random derives from it. compile / dtype / channels_last: None = on for CUDA
    ("bf16"), off / "fp32" on the CPU. device: None = CUDA when available.
    num_timesteps / schedule: T and "linear" (Ho) or "cosine". flip: random horizontal flips.
    snr_gamma: None (Ho's unweighted loss) or gamma of the min-SNR loss weighting (Hang et al. 2023, as
    diffusers' training scripts' ``--snr_gamma``): each image's squared error weighted by min(SNR_t, gamma) /
    SNR_t, SNR_t = ab_t / (1 - ab_t); 5 is the paper's value.
    unet: UNetConfig field overrides (e.g. {"block_out_channels": [16, 32]}).
    resume: continue the run in ``out`` if it has a checkpoint.
    fid_every / fid_ref / fid_samples / inception_weights: every ``fid_every`` steps (and at the end; 0: off)
    log the FID of ``fid_samples`` EMA samples (seeds 0.., ``sample_steps`` steps) against ``fid_ref``
    (see ``ddpm_fast.fid``) into log.jsonl, with torch-fidelity's Inception from ``inception_weights``.
    data_cache / data_in_memory / data_workers: where a raw file source is decoded once (a folder; None:
    ``data.default_cache_root()``; "off": decode into memory every start, as for 'digits' and float arrays),
    whether the prepared images are read into RAM instead of memory-mapped, and the decoding processes.
    None of them changes the batches, so a resumed run may change them.
    """

    data: str | None = None
    image_size: int | None = None
    channels: int | None = None
    out: str = "runs/ddpm"
    preset: str = "digits"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    grad_clip: float = 1.0
    lr_decay: str = "none"
    ema_decay: float | None = None
    ema_warmup: bool | None = None
    save_every: int | None = None
    sample_every: int | None = None
    sample_steps: int | None = None
    num_sample_images: int = 64
    log_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    compile: bool | None = None
    dtype: str | None = None
    channels_last: bool | None = None
    device: str | None = None
    num_timesteps: int = 1000
    schedule: str = "linear"
    snr_gamma: float | None = None
    flip: bool | None = None
    unet: dict = field(default_factory=dict)
    resume: bool = False
    progress: bool = True
    fid_every: int = 0
    fid_ref: str | None = None
    fid_samples: int = 5000
    inception_weights: str | None = None
    data_cache: str | None = None
    data_in_memory: bool = False
    data_workers: int | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with every None replaced by the preset's (or the device's) default, validated."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        values = dataclasses.asdict(self)
        for key, value in PRESETS[self.preset].items():
            if values.get(key) is None:
                values[key] = value
        if values["data"] is None:
            raise ValueError(f"the {self.preset} preset needs training data: pass --data PATH (data=...), e.g. "
                             "a CIFAR-10 batch folder or an image folder")
        device = resolve_device(values["device"])
        values["device"] = str(device)
        on_cuda = device.type == "cuda"
        if values["compile"] is None:
            values["compile"] = on_cuda
        if values["dtype"] is None:
            values["dtype"] = "bf16" if on_cuda else "fp32"
        if values["channels_last"] is None:
            values["channels_last"] = on_cuda
        cfg = TrainConfig(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        for name in ("steps", "batch_size", "num_timesteps", "num_sample_images", "log_every", "keep_checkpoints"):
            positive_int(name)
        for name in ("warmup", "save_every", "sample_every", "seed"):
            positive_int(name, 0)
        if self.sample_steps is not None:
            positive_int("sample_steps")
        positive_int("fid_every", 0)
        positive_int("fid_samples", 2)
        if self.fid_every and not self.fid_ref:
            raise ValueError("fid_every needs a reference: pass --fid-ref (a statistics .npz from ddpm-fast fid-stats)")
        for name in ("lr", "grad_clip", "snr_gamma"):
            v = getattr(self, name)
            if name == "snr_gamma" and v is None:  # no weighting
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not isinstance(self.ema_decay, (int, float)) or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r} (Ho et al. use 0.9999)")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(map(repr, LR_DECAYS))}, got {self.lr_decay!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.dtype == "bf16" and torch.device(self.device).type != "cuda":
            raise ValueError("dtype 'bf16' (autocast) is for CUDA; use dtype='fp32' on the CPU")
        if not isinstance(self.unet, dict):
            raise TypeError(f"unet must be a dict of UNetConfig overrides, got {type(self.unet).__name__}")


@dataclass
class RunResult:
    """What :func:`train` returns. Times exclude checkpoint writes and sample grids."""

    run_dir: Path
    step: int
    final_loss: float
    train_seconds: float
    images_per_second: float
    checkpoint: Path | None
    resumed_from: int | None = None
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    world_size: int = 1


def _mix_seed(*values: int) -> int:
    # SeedSequence hashes the tuple, so nearby (seed, step) pairs give unrelated streams.
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint32)[0])


class Trainer:
    """Model, EMA, optimizer, batch stream and step counter of one run, and the step that advances them.

    ``Trainer(config)`` builds a fresh run from a :class:`TrainConfig` (resolved on the way in);
    :meth:`load_state` continues it from a :class:`~ddpm_fast.checkpoint.Checkpoint`.

    group: the process group (:func:`ddpm_fast.distributed.process_group`); with N > 1 ranks the model is
    wrapped in DistributedDataParallel and each rank trains on its slice of the global batch
    ``config.batch_size``: rank r takes images r*B/N .. (r+1)*B/N - 1 of every global batch, with the t
    and noise those global image indices get, so the gradient is the global batch's up to the order of
    the float sums.
    """

    def __init__(self, config: TrainConfig, dataset=None, group: Group | None = None):
        from .data import BatchStream
        from .unet import UNet

        self.config = config = _label_data(config, dataset).resolved()
        self.group = group = group or Group(device=torch.device(config.device))
        if config.batch_size % group.world_size:
            raise ValueError(_indivisible_batch(config.batch_size, group.world_size))
        self.device = torch.device(config.device)
        if dataset is None:
            dataset = training_dataset(config)
        self.dataset = dataset
        channels, height, width = dataset.shape
        if height != width:
            raise ValueError(f"the images are {height}x{width}; the U-Net needs square images: "
                             "pass --image-size N (image_size=N) to resize and center-crop")
        self.unet_config = unet_config_for(config.preset, channels, height, config.unet)
        self.schedule = (NoiseSchedule.linear(config.num_timesteps) if config.schedule == "linear"
                         else NoiseSchedule.cosine(config.num_timesteps))
        self._snr_weights = (None if config.snr_gamma is None else
                             self.schedule.min_snr_weights(config.snr_gamma).float().to(self.device))

        torch.manual_seed(_mix_seed(config.seed, 0x5EED))  # weight init and dropout
        self.model = UNet(self.unet_config).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.train()
        if group.world_size > 1:
            # dropout: one stream per rank, keyed by (seed, rank): the same distribution as one process,
            # not the same bits (the weights above came from the shared seed, so every rank starts equal)
            torch.manual_seed(_mix_seed(config.seed, _DROPOUT_KEY, group.rank))
        on_cuda = self.device.type == "cuda"
        # fused: one kernel for all parameters; on the CPU too (torch >= 2.4), where the per-tensor foreach
        # steps cost 5 ms of the digits model's 79 ms step against 1.3 ms (benchmarks/NOTES.md)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=True)
        # each rank reads only its share of every global batch; assembled ahead, in a background thread
        self.stream = BatchStream(dataset, config.batch_size, config.seed, flip=config.flip, device=self.device,
                                  rank=group.rank, world_size=group.world_size,
                                  channels_last=bool(config.channels_last))
        self.step = 0
        self._params = [p for p in self.model.parameters()]
        self._ema_params = [p for p in self.ema.parameters()]
        self._noise_seed_base = _mix_seed(config.seed, 0xE95)
        trained = self.model
        if group.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # torch's documented order: wrap in DDP first, then compile the wrapper (DDPOptimizer then
            # splits the graph at the gradient buckets). The U-Net's only buffer is a non-persistent
            # constant table, so there is nothing to broadcast each forward.
            trained = DistributedDataParallel(self.model, device_ids=[self.device] if on_cuda else None,
                                              forward_sync_buffers=False)
        self._forward = torch.compile(trained) if config.compile else trained

    # -- the pieces of one step --------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warmup from lr/warmup to lr over the first ``warmup`` steps, then constant (Ho) or, with
        ``lr_decay="cosine"``, half a cosine down to 0 at step ``steps`` (step is 0-based)."""
        cfg = self.config
        if cfg.warmup and step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.lr_decay == "cosine":
            progress = (step + 1 - cfg.warmup) / (cfg.steps + 1 - cfg.warmup)  # the last step keeps a little
            return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr

    def ema_decay_at(self, step: int) -> float:
        decay = self.config.ema_decay
        return min(decay, (1 + step) / (10 + step)) if self.config.ema_warmup else decay

    def timesteps_at(self, step: int, batch_size: int) -> torch.Tensor:
        """t for every image of step ``step``: int64 (B,) on the CPU, a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(_mix_seed(self.config.seed, step, 0x7))
        return torch.randint(0, self.schedule.num_timesteps, (batch_size,), generator=g)

    def noise_seeds(self, batch_size: int) -> torch.Tensor:
        """Per-image noise seeds, int64 (B,) on the CPU; the training step is the noise step."""
        return (self._noise_seed_base + torch.arange(batch_size, dtype=torch.int64)) % (1 << 32)

    def loss_on_batch(self, x0: torch.Tensor, step: int) -> torch.Tensor:
        """Ho's simple loss on x0 (B, C, H, W) float32 for training step ``step``: a 0-dim float32 tensor
        (with ``snr_gamma``, each image's mean squared error weighted by min(SNR_t, gamma) / SNR_t).

        With N ranks x0 is this rank's slice of the global batch of N*B images; t and the noise are
        those of the slice's global image indices.
        """
        batch = x0.shape[0]
        total, first = batch * self.group.world_size, batch * self.group.rank
        t = self.timesteps_at(step, total)[first:first + batch]
        seeds = self.noise_seeds(total)[first:first + batch]
        x_t, eps = ops.q_sample_seeded(x0, t, self.schedule, seeds, step)
        t = host_to_device(t, self.device)  # checked and uploaded by ops too; this copy feeds the model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bf16"):
            eps_pred = self._forward(x_t, t)
        if self.config.snr_gamma is None:
            return F.mse_loss(eps_pred.float(), eps.float())
        per_image = (eps_pred.float() - eps.float()).square().mean(dim=(1, 2, 3))
        return (per_image * self._snr_weights[t]).mean()

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - self.ema_decay_at(step))

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, gradient norm before clipping) as 0-dim device tensors."""
        x0 = next(self.stream)  # this rank's slice of the global batch, channels-last when the model is
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.loss_on_batch(x0, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.config.grad_clip)
        self.optimizer.step()
        self.update_ema(self.step)
        self.step += 1
        return loss.detach(), grad_norm.detach()

    # -- state -------------------------------------------------------------------------------------
    def run_config(self) -> dict:
        """The JSON-able description of this run stored as config.json (and in every checkpoint)."""
        train = dataclasses.asdict(self.config)
        return {"format": RUN_FORMAT, "version": 1, "unet": self.unet_config.to_dict(),
                "schedule": self.schedule.to_config(), "train": train}

    def state_dict(self) -> dict:
        """Optimizer, RNG and batch-stream state (everything but the weights) for ``state.pt``.

        With N > 1 ranks (a collective: every rank calls it) it also holds each rank's dropout RNG
        state under "rank_rng", so a run resumed at the same world size continues every stream exactly.
        """
        np_state = np.random.get_state()
        extra = {}
        if self.group.world_size > 1:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            extra["rank_rng"] = self.group.all_objects({"torch": torch.get_rng_state(), "cuda": cuda})
        return {
            **extra,
            "optimizer": self.optimizer.state_dict(),
            "batch_stream": self.stream.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            },
        }

    def save(self, run_dir) -> Path:
        """Write a checkpoint of the current step (rank 0 writes; every rank calls this and then waits at
        a barrier, so no rank runs ahead of a checkpoint in progress). Returns its folder on every rank."""
        state = self.state_dict()
        path = None
        if self.group.is_main:
            path = save_checkpoint(run_dir, step=self.step, config=self.run_config(),
                                   model=self.model.state_dict(), ema=self.ema.state_dict(), state=state,
                                   keep=self.config.keep_checkpoints)
        if self.group.world_size > 1:
            path = self.group.all_objects(path)[0]  # also the barrier: rank 0 sends it once written
        return path

    def load_state(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint written by :meth:`save` (weights, optimizer, RNG, data position)."""
        check_weight_keys(ckpt.model, self.model, ckpt.path / MODEL_FILE)
        check_weight_keys(ckpt.ema, self.ema, ckpt.path / EMA_FILE)
        self.model.load_state_dict(ckpt.model)
        self.ema.load_state_dict(ckpt.ema)
        state = ckpt.state
        try:
            fused = [g.get("fused") for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, f in zip(self.optimizer.param_groups, fused):
                group["fused"] = f  # this process's choice, whatever the saving process's was
            self.stream.load_state_dict(state["batch_stream"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])
            random.setstate(_as_tuples(rng["python"]))
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
            if self.group.world_size > 1:
                self._load_rank_rng(state.get("rank_rng"), int(state["step"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, DDPMFastError):
                raise
            raise CheckpointError(f"{ckpt.path / STATE_FILE} does not fit this run "
                                  f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})") from None
        self.step = int(state["step"])

    def _load_rank_rng(self, saved, step: int) -> None:
        """This rank's dropout stream: its own saved state at the same world size; at another world size
        a fresh stream keyed by (seed, rank, step) (dropout keeps its distribution, not its bits)."""
        world, rank = self.group.world_size, self.group.rank
        if isinstance(saved, (list, tuple)) and len(saved) == world:
            torch.set_rng_state(saved[rank]["torch"])
            if saved[rank]["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved[rank]["cuda"], self.device)
        else:
            torch.manual_seed(_mix_seed(self.config.seed, _DROPOUT_KEY, rank, step))


_DROPOUT_KEY = 0xD809


def _indivisible_batch(batch_size: int, world_size: int) -> str:
    lower = batch_size - batch_size % world_size
    options = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
    return (f"--batch-size {batch_size} is the global batch and must divide by the {world_size} processes: "
            f"use {options}")


def training_dataset(config: TrainConfig):
    """The run's images: a raw file source decoded once into the cache and memory-mapped (the torchrun ranks
    of one job wait for the first to build it, then share its pages); 'digits', float arrays and
    ``data_cache="off"`` load into memory. Under torchrun only rank 0 shows the decoding bar."""
    from .data import FloatSourceError, cached_dataset, load_dataset
    from .distributed import env_rank

    if config.data == "digits" or config.data_cache == "off":
        return load_dataset(config.data, image_size=config.image_size, channels=config.channels, flip=config.flip,
                            workers=config.data_workers)
    try:
        return cached_dataset(config.data, image_size=config.image_size, channels=config.channels, flip=config.flip,
                              cache_root=config.data_cache, workers=config.data_workers,
                              progress=config.progress and env_rank() == 0, in_memory=config.data_in_memory)
    except FloatSourceError:
        return load_dataset(config.data, image_size=config.image_size, channels=config.channels, flip=config.flip)


def _label_data(config: TrainConfig, dataset) -> TrainConfig:
    """With an in-memory dataset and no ``data``, record where the images came from (config.json shows it)."""
    if dataset is None or config.data is not None:
        return config
    return dataclasses.replace(config, data=str(getattr(dataset, "source", None) or "an in-memory dataset"))


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------
# the run: resume logic, loop, logs


def _prepare_config(config: TrainConfig) -> tuple[TrainConfig, Path | None]:
    """Resolve the config; for ``resume`` merge it with the stored one. Returns (config, checkpoint)."""
    out = Path(config.out)
    existing = find_latest_checkpoint(out) if out.is_dir() else None
    if existing is None:
        return config.resolved(), None
    if not config.resume:
        raise DDPMFastError(f"{out} already holds a training run: pass --resume (resume=True) to continue it, "
                            "or choose another --out")
    stored = read_json(out / "config.json")
    stored_train = stored.get("train")
    if not isinstance(stored_train, dict):
        raise DDPMFastError(f"{out / 'config.json'} has no 'train' section: it was not written by ddpm-fast train")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = TrainConfig(**{k: v for k, v in stored_train.items() if k in known})
    for name in _RUN_DEFINING:
        given, kept = getattr(config, name), getattr(merged, name)
        default = TrainConfig.__dataclass_fields__[name]
        is_default = given == (default.default_factory() if callable(default.default_factory) else default.default)
        if not is_default and given != kept:
            raise DDPMFastError(f"--resume keeps the run's {name}={kept!r} (given {given!r}): drop the option, "
                                "or start a new run with another --out")
    # Settings that may change between sessions: length, cadence, device and speed knobs.
    for name in ("steps", "save_every", "sample_every", "sample_steps", "log_every", "keep_checkpoints",
                 "compile", "dtype", "channels_last", "device", "progress", "num_sample_images",
                 "fid_every", "fid_ref", "fid_samples", "inception_weights",
                 "data_cache", "data_in_memory", "data_workers"):
        value = getattr(config, name)
        default = TrainConfig.__dataclass_fields__[name].default
        if name in ("compile", "dtype", "channels_last", "device"):
            setattr(merged, name, value)  # None re-picks for this machine
        elif value is not None and (value != default or name == "progress"):
            setattr(merged, name, value)
    merged.out, merged.resume = str(out), True
    return merged.resolved(), existing


class _JsonlLog:
    """Appends one JSON object per line; each line is flushed so a crash loses at most the last one."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, *, dataset=None, on_log=None, fid_extractor=None) -> RunResult:
    """Run (or, with ``config.resume``, continue) a training run in ``config.out``.

    Writes config.json, log.jsonl, checkpoints every ``save_every`` steps and at the end, and sample
    grids every ``sample_every`` steps. dataset: an already loaded ``ImageDataset`` (skips loading
    ``config.data``). on_log: optional callback receiving each log record (a dict; rank 0 only).
    fid_extractor: the feature extractor for ``fid_every`` (default: torch-fidelity's Inception).
    Returns a :class:`RunResult`.

    Under torchrun (or in a process group the caller initialized) every rank runs this: ``batch_size``
    is the global batch, split evenly over the ranks; rank 0 writes every file. SIGTERM or SIGINT ends
    the run after the current step with a checkpoint (``RunResult.stopped_by`` names the signal).
    """
    config, existing = _prepare_config(_label_data(config, dataset))
    world = planned_world_size()
    if config.batch_size % world:  # checked before the group starts: every rank fails the same way
        raise DDPMFastError(_indivisible_batch(config.batch_size, world))
    if dataset is None:  # before joining, too: a bad --data is one line from rank 0, not one per rank
        dataset = training_dataset(config)
    with process_group(config.device) as group:
        config = dataclasses.replace(config, device=str(group.device))
        with collective_errors("training"):
            return _train_in_group(config, existing, group, dataset, on_log, fid_extractor)


def _train_in_group(config: TrainConfig, existing: Path | None, group: Group, dataset, on_log,
                    fid_extractor=None) -> RunResult:
    from tqdm.auto import tqdm

    run_dir = Path(config.out)
    trainer = Trainer(config, dataset=dataset, group=group)
    resumed_from = None
    if existing is not None:
        trainer.load_state(load_checkpoint(existing, with_state=True, map_location="cpu"))
        resumed_from = trainer.step
    fid = _TrainingFID(config, trainer.device, fid_extractor) if config.fid_every else None  # fails before training
    main = group.is_main
    log = _JsonlLog(run_dir / "log.jsonl")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", trainer.run_config())
        log.write({"event": "resume" if resumed_from is not None else "start", "step": trainer.step,
                   "device": str(trainer.device), "world_size": group.world_size, "compile": config.compile,
                   "dtype": config.dtype, "parameters": sum(p.numel() for p in trainer.model.parameters()),
                   "time": time.time()})

    steps = config.steps
    checkpoint = existing
    bar = tqdm(total=steps, initial=trainer.step, desc="train", unit="step",
               disable=not (config.progress and main), dynamic_ncols=True)
    loss_sum = torch.zeros((), device=trainer.device)
    window_steps, final_loss = 0, float("nan")
    train_seconds, images = 0.0, 0
    window_start, window_io = time.perf_counter(), 0.0  # io: checkpoint and grid time, not training time
    stop, stopped = StopSignals(announce=main), False
    try:
        with stop:
            while trainer.step < steps:
                loss, grad_norm = trainer.train_step()
                loss_sum += loss
                window_steps += 1
                bar.update(1)
                step = trainer.step
                # every rank stops after the same step: one host-side flag exchange per step (no GPU sync)
                stopping = group.any(stop.requested) and step < steps  # at the last step the run is done anyway
                saving = (config.save_every and step % config.save_every == 0) or step == steps or stopping
                if step % config.log_every == 0 or saving:  # a checkpoint is written only after a finite loss
                    # the loss averaged over the ranks, here only: the one host sync in the loop
                    final_loss = float(group.mean(loss_sum)) / window_steps
                    now = time.perf_counter()
                    elapsed = max(now - window_start - window_io, 1e-9)
                    ips = window_steps * config.batch_size / elapsed
                    train_seconds += elapsed
                    images += window_steps * config.batch_size
                    if not math.isfinite(final_loss):
                        raise DDPMFastError(
                            f"the loss became {final_loss} at step {step}: lower --lr (or the warmup); the last "
                            f"good checkpoint is {checkpoint or 'none'}")
                    record = {"step": step, "loss": final_loss, "lr": trainer.lr_at(step - 1),
                              "grad_norm": float(grad_norm), "images_per_s": ips, "time": time.time()}
                    if main:
                        log.write(record)
                        if on_log is not None:
                            on_log(record)
                    bar.set_postfix(loss=f"{final_loss:.4f}", img_s=f"{ips:,.0f}")
                    loss_sum.zero_()
                    window_steps, window_start, window_io = 0, now, 0.0
                io_start = time.perf_counter()
                if saving:
                    checkpoint = trainer.save(run_dir)
                    if main:
                        log.write({"event": "checkpoint", "step": step, "path": str(checkpoint)})
                if stopping:
                    if main:
                        log.write({"event": "stopped", "signal": stop.signal_name or "another rank's signal",
                                   "step": step, "time": time.time()})
                    stopped = True
                    break
                if config.sample_every and (step % config.sample_every == 0 or step == steps):
                    _write_training_grid(trainer, run_dir, step)
                if fid is not None and (step % config.fid_every == 0 or step == steps):
                    record = fid(trainer, step)  # every rank samples its share; the sums are combined
                    if main:
                        log.write(record)
                        if on_log is not None:
                            on_log(record)
                window_io += time.perf_counter() - io_start
    finally:
        bar.close()
    if main:
        log.write({"event": "end", "step": trainer.step, "train_seconds": train_seconds, "time": time.time()})
    stopped_by = (stop.signal_name or "another process's signal") if stopped else None
    return RunResult(run_dir, trainer.step, final_loss, train_seconds,
                     images / train_seconds if train_seconds else 0.0, checkpoint, resumed_from,
                     stopped_by, group.world_size)


class _TrainingFID:
    """FID of the EMA model's samples during training: the reference statistics and the extractor are
    loaded once, at the start (a bad --fid-ref or missing weights fail before any training step)."""

    def __init__(self, config: TrainConfig, device: torch.device, extractor=None):
        from .fid import load_extractor, reference_stats

        self.extractor = extractor if extractor is not None else load_extractor(config.inception_weights, device)
        self.ref = reference_stats(config.fid_ref, self.extractor)

    def __call__(self, trainer: Trainer, step: int) -> dict:
        from .fid import sample_fid

        config = trainer.config
        with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
            result = sample_fid(trainer.ema, trainer.schedule, self.ref, self.extractor, range(config.fid_samples),
                                steps=config.sample_steps, device=trainer.device, sampler_options={"compile": False})
        return {"event": "fid", "step": step, **result, "ref": self.ref["path"],
                "sample_steps": config.sample_steps or config.num_timesteps, "time": time.time()}


def _write_training_grid(trainer: Trainer, run_dir: Path, step: int) -> Path | None:
    """A grid of EMA samples, seeds 0..n-1, at run_dir/samples/step_NNNNNN.png (RNG state untouched).

    Every rank calls it: the seeds are dealt to the ranks, rank 0 writes the grid (and returns its path)."""
    from .data import save_grid, to_uint8_nhwc
    from .generate import generate

    config = trainer.config
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        # no compile: a fresh sampler per grid would recompile each time; CUDA graphs still apply
        images = generate(trainer.ema, trainer.schedule, list(range(config.num_sample_images)),
                          steps=config.sample_steps, device=trainer.device, sampler_options={"compile": False},
                          group=trainer.group)
    if not trainer.group.is_main:
        return None
    scale = max(1, 64 // trainer.unet_config.sample_size)
    return save_grid(to_uint8_nhwc(images), run_dir / "samples" / f"step_{step:06d}.png", scale=scale)
