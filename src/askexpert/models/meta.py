"""What a checkpoint means, read without torch: the JSON sidecar beside each weights file.

The edge needs a checkpoint's facts (class names, the weights' SHA-256 for the
handshake) but not its weights, so this module imports no torch: the versions of
torch and timm a checkpoint was written under are compared with the installed
ones from the package metadata, never by importing them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from askexpert import __version__
from askexpert.errors import CheckpointError, CheckpointVersionWarning

FORMAT = "askexpert.checkpoint/1"


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass
class CheckpointMeta:
    """What a weights file means. `classes[i]` is the global class of output i (-1: "other")."""

    role: str
    preset: str
    classes: list[int]
    expert_id: str | None = None
    schedule: str | None = None
    seed: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    format: str = FORMAT

    @property
    def num_outputs(self) -> int:
        return len(self.classes)


def meta_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(path: str | Path) -> CheckpointMeta:
    side = meta_path(path)
    if not side.is_file():
        raise CheckpointError(f"{side}: checkpoint metadata missing (expected beside {Path(path).name})")
    try:
        raw = json.loads(side.read_text())
        meta = CheckpointMeta(**raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{side}: malformed checkpoint metadata: {exc}") from None
    if meta.format != FORMAT:
        raise CheckpointError(f"{side}: format {meta.format!r}, expected {FORMAT!r}")
    check_versions(side, meta)
    return meta


def check_versions(side: Path, meta: CheckpointMeta) -> None:
    """A newer askexpert's checkpoint is refused; another torch/timm release only warns.

    Shapes are checked on load either way, but a model definition that changed
    between timm releases can load cleanly and compute something else, so the
    user is told which releases differ.
    """
    written = meta.versions.get("askexpert")
    if written and _major_minor(written) > _major_minor(__version__):
        raise CheckpointError(
            f"{side}: written by askexpert {written}, newer than this askexpert {__version__}; upgrade askexpert"
        )
    installed = installed_versions()
    differ = [
        f"{lib} {meta.versions[lib]} (now {now})"
        for lib, now in installed.items()
        if lib in meta.versions and _major_minor(meta.versions[lib]) != _major_minor(now)
    ]
    if differ:
        warnings.warn(
            f"{side}: written under {', '.join(differ)}; shapes match, but check accuracy before trusting it",
            CheckpointVersionWarning,
            stacklevel=3,
        )


def installed_versions() -> dict[str, str]:
    """torch's and timm's installed versions (from package metadata; absent where not installed)."""
    found = {}
    for lib in ("torch", "timm"):
        try:
            found[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return found
