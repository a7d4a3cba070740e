"""The wire format for image batches: a 24-byte header, then raw uint8 pixels.

```
offset size  field
0      4     magic  b"AXI1"  (askexpert images, format version 1)
4      1     dtype  1 = uint8 (the only one defined)
5      3     reserved, zero
8      16    N, H, W, C as little-endian uint32
24     N·H·W·C   pixels, C-order (N, H, W, C)
```
A 32×32 RGB image costs 3,072 bytes, versus ~30 KB as a JSON list. Media
type: `application/x-askexpert-images`. Decoding checks everything and raises
`WireError` with a message naming what is wrong; it never returns garbage.
"""

from __future__ import annotations

import struct

import numpy as np

from askexpert.errors import AskExpertError

MAGIC = b"AXI1"
MEDIA_TYPE = "application/x-askexpert-images"
_HEADER = struct.Struct("<4sB3sIIII")
HEADER_SIZE = _HEADER.size  # 24
_DTYPES = {1: np.uint8}


class WireError(AskExpertError):
    """A request body that is not a valid image batch."""


def encode_images(images: np.ndarray) -> bytes:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise WireError(f"can only encode uint8 (N, H, W, C) arrays; got {getattr(images, 'dtype', type(images))}")
    n, h, w, c = images.shape
    return _HEADER.pack(MAGIC, 1, b"\0\0\0", n, h, w, c) + np.ascontiguousarray(images).tobytes()


def decode_images(
    body: bytes, expect_size: int | None = None, max_batch: int | None = None, channels: int = 3
) -> np.ndarray:
    """Parse and validate a body; returns a read-only (N, H, W, C) uint8 array."""
    if len(body) < HEADER_SIZE:
        raise WireError(f"body is {len(body)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, dtype, reserved, n, h, w, c = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: expected {MAGIC!r} (wire format version 1)")
    if reserved != b"\0\0\0":
        raise WireError(f"reserved header bytes 5-7 are {reserved.hex()}, must be zero (wire format version 1)")
    if dtype not in _DTYPES:
        raise WireError(f"unsupported dtype code {dtype}: only 1 (uint8) is defined")
    if n == 0:
        raise WireError("empty batch: N is 0")
    if max_batch is not None and n > max_batch:
        raise WireError(f"batch of {n} images exceeds the limit of {max_batch}")
    if c != channels:
        raise WireError(f"images have {c} channels; RGB (3) expected")
    if expect_size is not None and (h, w) != (expect_size, expect_size):
        raise WireError(f"images are {h}×{w}; this server expects {expect_size}×{expect_size}")
    if h == 0 or w == 0:
        raise WireError(f"images are {h}×{w}")
    expected = HEADER_SIZE + n * h * w * c
    if len(body) != expected:
        raise WireError(f"body is {len(body)} bytes; the header (N={n}, {h}×{w}×{c}) needs exactly {expected}")
    return np.frombuffer(body, dtype=np.uint8, offset=HEADER_SIZE).reshape(n, h, w, c)
