"""Checksummed, atomically written checkpoint files (plain PyTorch).

A file is one JSON header line (format, version, size and SHA-256 of the payload) followed
by the ``torch.save`` payload. Writing goes to a temporary file in the same folder, is
flushed to disk, then renamed over the target, so a crash leaves either the old file or
the new one, never half of one. Reading refuses a file whose header, size or checksum does
not match, naming the problem: a corrupt personalized model must never be replaced by a
fresh one in silence.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "fml-flower-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be trusted (corrupt, truncated, other format)."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> str:
    """Write ``payload`` (tensors, numbers, strings, dicts) to ``path`` atomically; return
    the SHA-256 of the payload (what :func:`load_checkpoint` can be asked to expect).
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps(header).encode() + b"\n" + data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return header["sha256"]


def load_checkpoint(path: Path, expect_sha256: str | None = None) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    ``expect_sha256``: the digest :func:`save_checkpoint` returned when this reader wrote
    the file; a file with another payload (replaced by someone else, or an older version)
    is refused.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    line, sep, data = raw.partition(b"\n")
    try:
        header = json.loads(line) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an fml-flower checkpoint (no valid header)")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {header.get('version')}, this code reads "
            f"version {VERSION}"
        )
    if len(data) != header.get("bytes") or hashlib.sha256(data).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or truncated")
    if expect_sha256 is not None and header["sha256"] != expect_sha256:
        raise CheckpointError(
            f"{path}: is not the version this node wrote last (SHA-256 {header['sha256'][:12]}"
            f"... instead of {expect_sha256[:12]}...): another process replaced it; refusing "
            "to train on state that is not this client's own"
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
