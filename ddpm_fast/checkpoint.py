"""Checkpoints: crash-safe writes and strict, one-line-error loads.

A run folder looks like this::

    RUN_DIR/
      config.json                  the run's settings (train, unet, schedule), written once
      log.jsonl                    one JSON object per logged step
      samples/step_000500.png      sample grids
      checkpoints/
        latest                     text file naming the newest complete checkpoint ("step_000500")
        step_000500/
          model.safetensors        raw weights (float32), run config in the safetensors metadata
          ema.safetensors          EMA weights, same layout
          config.json              the run config again, so the folder stands alone
          state.pt                 optimizer state, step, RNG states, batch-stream position
          SHA256SUMS               sha256 of the four files above (``sha256sum -c`` format, integrity.py)

Every file is written to a temporary name in its own folder, flushed to disk (fsync) and renamed into
place with ``os.replace``, which is atomic on POSIX and Windows. ``SHA256SUMS`` follows the files it
records and ``latest`` is rewritten last, so a process killed at any moment leaves ``latest`` naming a
checkpoint whose files are all complete and recorded. Loading checks every file it reads against that
record: bits flipped on disk or in a copy are one line naming the file, never silently wrong samples.

Loading names the bad file in a :class:`~ddpm_fast.errors.CheckpointError`: a missing file, a truncated
or foreign file, weights that do not fit the model. Keys saved from a ``torch.compile``'d module carry an
``_orig_mod.`` prefix, which is stripped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError
from .integrity import SUMS_FILE, sums_text, verify_file

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest_checkpoint",
    "load_weights_file",
    "strip_compile_prefix",
    "check_weight_keys",
    "build_model",
    "atomic_write",
    "write_json_atomic",
    "read_json",
    "write_sums",
    "RUN_FORMAT",
]

RUN_FORMAT = "ddpm-fast-run"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_COMPILE_PREFIX = "_orig_mod."


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    path: the checkpoint folder (or the single weights file). step: training steps completed (None when
    a bare weights file does not record it). config: the run config dict (``{"unet": ..., "schedule":
    ..., "train": ...}``). model / ema: state dicts of float tensors (``ema`` is None for a bare file,
    ``model`` then holds its weights). state: the training state from ``state.pt`` (None unless asked
    for and present).
    """

    path: Path
    step: int | None
    config: dict
    model: dict[str, torch.Tensor] | None  # None only when load_checkpoint was asked for the EMA alone
    ema: dict[str, torch.Tensor] | None
    state: dict | None


# --------------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)``, fsync the result and rename it onto ``path``.

    The temporary file lives in ``path``'s folder (a rename across file systems is not atomic) and is
    removed if anything fails, so ``path`` either keeps its old content or gets the complete new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON through :func:`atomic_write`."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_sums(folder: str | os.PathLike, names) -> Path:
    """Hash the (complete) files ``names`` of ``folder`` into ``folder/SHA256SUMS``, atomically."""
    folder = Path(folder)
    text = sums_text(folder, names)
    return atomic_write(folder / SUMS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, turning a missing or malformed file into a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


# --------------------------------------------------------------------------------------------------
# saving


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a copy also frees the writer from the
    # training tensors (which the next step would change under it).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in strip_compile_prefix(state).items()}


def save_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``state`` (contiguous CPU copies, compile prefix stripped) as safetensors through :func:`atomic_write`."""
    from safetensors.torch import save_file

    tensors = _contiguous_cpu(state)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    config: dict,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict,
    keep: int = 2,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step_NNNNNN/`` and then point ``checkpoints/latest`` at it.

    step: training steps completed. config: the run config (JSON-able dict with "unet", "schedule" and
    "train"). model / ema: state dicts (a ``_orig_mod.`` prefix is stripped). state: anything
    ``torch.save`` can store with plain types and tensors (optimizer state, RNG states, data position).
    keep: how many of the newest checkpoints to keep (older ones are deleted after ``latest`` moves).
    Returns the checkpoint folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written), got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    folder = root / f"step_{int(step):06d}"
    folder.mkdir(parents=True, exist_ok=True)

    metadata = {"format": "pt", "ddpm_fast_config": json.dumps(config, sort_keys=True), "step": str(int(step))}
    save_safetensors(folder / MODEL_FILE, model, {**metadata, "weights": "model"})
    save_safetensors(folder / EMA_FILE, ema, {**metadata, "weights": "ema"})
    write_json_atomic(folder / CONFIG_FILE, config)
    payload = {"step": int(step), **state}
    atomic_write(folder / STATE_FILE, lambda tmp: torch.save(payload, tmp))
    write_sums(folder, [MODEL_FILE, EMA_FILE, CONFIG_FILE, STATE_FILE])
    # Last: only now does a loader see the new checkpoint.
    atomic_write(root / LATEST, lambda tmp: tmp.write_text(folder.name + "\n", encoding="utf-8"))

    for old in _step_dirs(root)[:-keep]:
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------------
# finding and loading


def _step_dirs(root: Path) -> list[Path]:
    """Step folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (MODEL_FILE, EMA_FILE, CONFIG_FILE, STATE_FILE))


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``checkpoints/latest`` names in a run folder, or None when the run has none yet.

    Without a ``latest`` file (deleted by hand) the newest complete step folder is used.
    """
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if not _STEP_DIR.match(name):
            raise CheckpointError(f"{pointer} is corrupt: expected a name like step_000500, found {name[:40]!r}")
        folder = root / name
        if not folder.is_dir():
            raise CheckpointError(f"{pointer} names {name}, which is missing from {root}")
        return folder
    complete = [p for p in _step_dirs(root) if _complete(p)]
    return complete[-1] if complete else None


def strip_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``_orig_mod.`` that ``torch.compile`` puts in front of every key (at any depth)."""
    return {k.replace(_COMPILE_PREFIX, ""): v for k, v in state.items()}


def load_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (state dict on the CPU with compile prefixes stripped, metadata dict).

    Raises CheckpointError naming the file when it is missing, truncated, not a safetensors file, or
    not the bytes its folder's SHA256SUMS records.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    # the sha256 check runs beside the parse (hashlib releases the GIL); a truncated file is named as such
    # first, a flipped bit then by the record
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(verify_file, path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error type (or OSError) with a long message
            reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({reason})") from None
        check.result()
    return strip_compile_prefix(tensors), metadata


def _config_from_metadata(path: Path, metadata: dict[str, str]) -> dict | None:
    text = metadata.get("ddpm_fast_config")
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} carries a corrupt ddpm_fast_config entry in its metadata") from None
    return config if isinstance(config, dict) else None


def _check_run_config(config: dict, where: Path) -> dict:
    if "unet" not in config or "schedule" not in config:
        raise CheckpointError(
            f"{where} is not a ddpm-fast config (no 'unet' / 'schedule' entries): "
            "pass a run folder, a checkpoint folder or a diffusers UNet folder"
        )
    return config


def _load_state(path: Path, map_location) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, wrong file type
        reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise CheckpointError(f"{path} is truncated or not a ddpm-fast training state ({reason})") from None
    verify_file(path)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a ddpm-fast training state (no 'step' entry)")
    return state


def load_checkpoint(path: str | os.PathLike, *, with_state: bool = True, map_location="cpu",
                    weights: tuple[str, ...] = ("model", "ema")) -> Checkpoint:
    """Load a checkpoint from a run folder (its latest), a step folder or a single ``.safetensors`` file.

    with_state: also read ``state.pt`` (needed to resume; not to sample). weights: which of a folder's
    weight files to read (and verify); the other is None (sampling reads one: half the bytes to check).
    A single file gives its weights in ``model`` and no ``ema``; its config comes from its metadata or a
    ``config.json`` beside it.
    Raises CheckpointError (one line, naming the file) on anything missing, truncated or foreign.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        weights, metadata = load_weights_file(path)
        config = _config_from_metadata(path, metadata)
        if config is None:
            beside = path.parent / CONFIG_FILE
            if not beside.is_file():
                raise CheckpointError(
                    f"{path} carries no ddpm-fast config and there is no config.json beside it"
                )
            config = read_json(beside)
        step = metadata.get("step")
        return Checkpoint(path, int(step) if step and step.isdigit() else None,
                          _check_run_config(config, path), weights, None, None)

    folder = path
    if not (path / MODEL_FILE).exists():
        folder = find_latest_checkpoint(path)
        if folder is None:
            raise CheckpointError(
                f"{path} holds no checkpoint yet (expected {CHECKPOINTS}/{LATEST} or {MODEL_FILE})"
            )
    config = _check_run_config(read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)
    verify_file(folder / CONFIG_FILE)
    model = load_weights_file(folder / MODEL_FILE)[0] if "model" in weights else None
    ema = load_weights_file(folder / EMA_FILE)[0] if "ema" in weights else None
    state = _load_state(folder / STATE_FILE, map_location) if with_state else None
    step = state["step"] if state is not None else _step_from_name(folder)
    return Checkpoint(folder, step, config, model, ema, state)


def _step_from_name(folder: Path) -> int | None:
    m = _STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------------
# weights into a model


def check_weight_keys(weights: dict[str, torch.Tensor], model: torch.nn.Module, source) -> None:
    """Raise CheckpointError naming missing / unexpected keys and shape mismatches, briefly."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))

    def some(keys: list[str]) -> str:
        more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
        return ", ".join(keys[:3]) + more

    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {some(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {some(unexpected)}")
        raise CheckpointError(f"{source} does not fit this model's config: " + "; ".join(parts))
    wrong = [k for k in expected if tuple(weights[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{source} does not fit this model's config: {len(wrong)} tensors have the wrong shape, e.g. "
            f"{k} is {tuple(weights[k].shape)}, the model expects {tuple(expected[k])}"
        )


def build_model(unet_config: dict, weights: dict[str, torch.Tensor] | None, source="weights"):
    """A :class:`~ddpm_fast.unet.UNet` from a config dict, loaded with ``weights`` (checked) if given."""
    from .unet import UNet, UNetConfig

    try:
        config = UNetConfig.from_dict(unet_config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{source} carries an invalid UNet config: {exc}") from None
    model = UNet(config)
    if weights is not None:
        weights = strip_compile_prefix(weights)
        check_weight_keys(weights, model, source)
        model.load_state_dict(weights, strict=True)
    return model
