"""Hub ids as model sources: ``google/ddpm-cifar10-32`` becomes a local folder through huggingface_hub.

``snapshot_download`` fetches the files a pipeline needs into the Hugging Face cache (``HF_HUB_CACHE``,
default ``~/.cache/huggingface/hub``) and returns the snapshot folder; with ``HF_HUB_OFFLINE=1`` it
answers from that cache alone (the folder ``refs/main`` points at), so a model downloaded once opens
without a network. A path that exists on disk always wins over a hub id of the same spelling.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

__all__ = ["resolve_source", "looks_like_hub_id"]

# what a DDPMPipeline needs: configs and weights (safetensors preferred, .bin as diffusers' older repos ship)
PIPELINE_FILES = ["*.json", "*.safetensors", "*.bin"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(source) -> bool:
    """True for "org/name" (one slash, hub characters only) that is not an existing path."""
    text = str(source)
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not Path(text).exists()


def resolve_source(source, *, revision: str | None = None) -> Path:
    """A local folder or file for ``source``: the path itself when it exists, else the hub snapshot.

    Raises CheckpointError (one line) for a path that does not exist and is no hub id, and for a hub id
    that cannot be fetched (offline and not cached, unknown repo, no network).
    """
    path = Path(source)
    if path.exists() or not looks_like_hub_id(source):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{source} is not a local path; to open it as a hub id install huggingface_hub "
                              "(pip install huggingface_hub)") from None
    try:
        folder = snapshot_download(str(source), revision=revision, allow_patterns=PIPELINE_FILES)
    except Exception as exc:  # the hub client raises many types (offline, 404, auth, network): one line each
        from huggingface_hub import constants

        where = "it is not in the local cache and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else \
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'failed'}"
        raise CheckpointError(f"cannot open hub id {source!r}: {where} (cache: {constants.HF_HUB_CACHE})") from None
    return Path(folder)
