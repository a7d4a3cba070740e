"""Stable short hashes of settings and arrays, used to tell when a stage's output is stale."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def fingerprint(*parts: Any) -> str:
    """SHA-256 (first 16 hex) of JSON-able parts and numpy arrays, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(str((part.dtype.str, part.shape)).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
