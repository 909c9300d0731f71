"""sha256 records of the files this project writes, and their check when the files are read back.

A folder holding weights that ddpm-fast wrote (a checkpoint's ``step_NNNNNN/``, a diffusers export)
also holds ``SHA256SUMS``: one line ``<64 hex digits>  <file name>`` per file, the format of coreutils'
``sha256sum``, so ``cd FOLDER && sha256sum -c SHA256SUMS`` checks it without this project. Reading a
file that the record of its folder names verifies it first: a single flipped bit is one line naming the
file and what to do, instead of samples that are silently wrong. Files with no record (a diffusers
folder or a hub snapshot written by others, checkpoints from before the record existed) load as before.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import CheckpointError

__all__ = ["SUMS_FILE", "file_sha256", "sums_text", "read_sums", "recorded_sha256", "verify_file"]

SUMS_FILE = "SHA256SUMS"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes as 64 lowercase hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()  # hashlib.file_digest would do, but only from Python 3.11 (we support 3.10)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sums_text(folder: str | os.PathLike, names) -> str:
    """The SHA256SUMS text for the files ``names`` of ``folder`` (hashed now, sorted by name).

    ``checkpoint.write_sums`` writes it atomically, after the files are complete and renamed into place
    and before anything points readers at the folder, so a reader never finds a record for a
    half-written file.
    """
    folder = Path(folder)
    return "".join(f"{file_sha256(folder / name)}  {name}\n" for name in sorted(set(names)))


def read_sums(folder: str | os.PathLike) -> dict[str, str] | None:
    """``{file name: sha256}`` from ``folder/SHA256SUMS``; None when the folder has no record.

    Raises CheckpointError when the record itself is damaged (then nothing in the folder can be trusted).
    """
    path = Path(folder) / SUMS_FILE
    if not path.is_file():
        return None
    sums = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["?"]
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            raise CheckpointError(f"{path} is damaged (a line is not '<sha256>  <file>'): copy the folder again "
                                  f"from a good source")
        sums[m.group(2)] = m.group(1)
    return sums


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded for ``path`` in its folder's SHA256SUMS, or None when there is none."""
    path = Path(path)
    sums = read_sums(path.parent)
    return None if sums is None else sums.get(path.name)


def verify_file(path: str | os.PathLike) -> str | None:
    """Check ``path`` against the sha256 its folder records; returns the recorded hash (None: no record).

    Raises CheckpointError (one line naming the file and what to do) when the bytes differ.
    """
    path = Path(path)
    expected = recorded_sha256(path)
    if expected is None:
        return None
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path} is damaged: its sha256 ({actual[:12]}...) is not the one recorded in {SUMS_FILE} when it "
            f"was saved ({expected[:12]}...); copy it again from a good source, or use another checkpoint")
    return expected
