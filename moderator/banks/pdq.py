"""PDQ perceptual hashes (Meta's, as ThreatExchange and HMA share them), through the ``pdqhash`` package.

A hash is 256 bits, written as 64 lowercase hex characters (most significant bit first: exactly what
``pdq-photo-hasher`` prints and hash lists carry). Two images are the same picture when their
hashes differ in at most 31 bits; hashes of quality below 50 (flat or featureless images) match
too much to be trusted and are neither stored in banks nor matched (ThreatExchange ``pdq/README.md``).

Rotations and mirrors: the *query* is hashed in its 8 dihedral variants (``compute_dihedral``: one
downscale, eight sign flips and transposes of the DCT, +0.1 ms), so a bank keeps one hash per entry,
exactly as partners distribute it, and a rotated or mirrored copy matches the plain hash.

Large images are first reduced by an integer factor to at most 512 pixels a side, as the reference
tools do (``pdq/cpp``: ``DOWNSAMPLE_DIMS = 512``): the hash moves by a few bits (<= 10 measured) and
a 1024-wide image costs 3 ms instead of 20-30.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

BITS = 256
BYTES = BITS // 8
MATCH_DISTANCE = 31  # ThreatExchange's confident-match threshold
MIN_QUALITY = 50  # hashes below this are discarded
MAX_SIDE = 512
HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# compute_dihedral's order (ThreatExchange's names): the transformation of the uploaded image each
# hash is of; the one that matches turns the upload back into the bank image.
VARIANTS = ("original", "rotate90", "rotate180", "rotate270", "flipx", "flipy", "flip_plus1", "flip_minus1")


class InvalidHash(ValueError):
    """Not a PDQ hash: 64 hex characters."""


@dataclass(frozen=True)
class PdqHash:
    """One image's PDQ hashes: ``variants`` ``uint8 [8, 32]`` (row 0: the image as it is), and quality."""

    variants: np.ndarray
    quality: int

    @property
    def hex(self) -> str:
        return to_hex(self.variants[0])

    @property
    def usable(self) -> bool:
        return self.quality >= MIN_QUALITY


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    factor = math.ceil(max(image.size) / MAX_SIDE)
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image)


def hash_image(image: Image.Image | np.ndarray) -> PdqHash:
    """The image's 8 dihedral PDQ hashes and their quality (an RGB Pillow image or ``uint8 [H, W, 3]``)."""
    import pdqhash  # a compiled extension: imported where hashes are made

    vectors, quality = pdqhash.compute_dihedral(_rgb(image))
    bits = np.asarray(vectors, dtype=np.uint8)  # [8, 256] of 0/1, most significant bit first
    return PdqHash(np.packbits(bits, axis=1), int(quality))


def to_hex(row: np.ndarray) -> str:
    return bytes(row).hex()


def from_hex(text: str) -> np.ndarray:
    """``uint8 [32]`` of a hash written as 64 hex characters; :class:`InvalidHash` otherwise."""
    text = text.strip()
    if not HEX_RE.match(text):
        raise InvalidHash(f"not a PDQ hash (64 hex characters): {text[:80]!r}")
    return np.frombuffer(bytes.fromhex(text), dtype=np.uint8).copy()


def distance(a: np.ndarray, b: np.ndarray) -> int:
    """Hamming distance of two ``uint8 [32]`` hashes."""
    return int(np.bitwise_count(np.bitwise_xor(a, b)).sum())
