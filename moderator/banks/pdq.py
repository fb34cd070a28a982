"""PDQ perceptual hashes (Meta's, as ThreatExchange and HMA share them), computed in numpy.

A hash is 256 bits, written as 64 lowercase hex characters (most significant bit first: exactly what
``pdq-photo-hasher`` prints and hash lists carry). Two images are the same picture when their
hashes differ in at most 31 bits; hashes of quality below 50 (flat or featureless images) match
too much to be trusted and are neither stored in banks nor matched (ThreatExchange ``pdq/README.md``).

The algorithm is the reference's (``pdq/cpp/hashing/pdqhashing.cpp``, the paper ``pdqhash-2017-10-09``):
float luma (0.299 R + 0.587 G + 0.114 B); a tent filter made of two passes of 1-D box filters per axis
(window ``ceil(side / 128)``, shrinking at the edges); decimation to 64x64 at the cells' centres; the
quality from the 64x64's gradients; a 16x16 DCT (frequencies 1-16); each bit: coefficient > the lower
median. The filter and the decimation are linear, so per axis they are one ``64 x side`` matrix, of which
only the few taps each output cell reads are kept (:func:`_taps`, built once per side length): 0.34 ms for a
320x240 image where the ``pdqhash`` package (the reference's C++ behind a Python wrapper that holds the
GIL) takes 1.5 ms. The bits and the quality equal ``pdqhash``'s (the unit tests compare them on hundreds
of images of every size; a float sum in another order could flip a bit only where a coefficient equals
the median to within ~1e-5). An image with a side under 64 px is hashed by ``pdqhash`` itself
(:func:`_reference_hash` says why).

Rotations and mirrors: the *query* is hashed in its 8 dihedral variants (sign flips and transposes of
the one DCT, as the reference's ``pdqDihedralHash256esFromFloatLuma``), so a bank keeps one hash per
entry, exactly as partners distribute it, and a rotated or mirrored copy matches the plain hash.

Large images are first reduced by an integer factor to at most 512 pixels a side, as the reference
tools do (``pdq/cpp``: ``DOWNSAMPLE_DIMS = 512``): the hash moves by a few bits (<= 10 measured).
"""

from __future__ import annotations

import functools
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
    """``uint8 [H, W, 3]``, reduced by an integer factor to at most :data:`MAX_SIDE` a side."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if max(image.shape[:2]) <= MAX_SIDE:
            return image
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    factor = math.ceil(max(image.size) / MAX_SIDE)
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image)


DOWNSAMPLED = 64  # the reference's 64x64 intermediate image
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix() -> np.ndarray:
    """``[16, 64]``: DCT-II rows for frequencies 1..16 (the DC term is left out), float32 as the reference."""
    i = np.arange(1, 17, dtype=np.float64)[:, None]
    j = np.arange(DOWNSAMPLED, dtype=np.float64)[None, :]
    return (math.sqrt(2.0 / DOWNSAMPLED) * np.cos(math.pi / 2.0 / DOWNSAMPLED * i * (2 * j + 1))).astype(np.float32)


DCT = _dct_matrix()
# The 8 dihedral variants from the original's DCT: (sign of each coefficient [16, 16], transposed?).
# Reversing an axis negates its odd frequencies (frequencies 1..16 sit at index 0..15: index 0, 2, ...).
_ALTERNATE = np.where(np.arange(16) % 2 == 1, 1.0, -1.0).astype(np.float32)
_ROWS = np.outer(_ALTERNATE, np.ones(16, np.float32))  # the sign by each row's frequency
_COLS = np.outer(np.ones(16, np.float32), _ALTERNATE)  # by each column's
_BOTH = _ROWS * _COLS
_DIHEDRAL = (  # in VARIANTS' order
    (None, False),  # original
    (_COLS, True),  # rotate90
    (_BOTH, False),  # rotate180
    (_ROWS, True),  # rotate270
    (_ROWS, False),  # flipx
    (_COLS, False),  # flipy
    (None, True),  # flip_plus1
    (_BOTH, True),  # flip_minus1
)


@functools.lru_cache(maxsize=256)
def _taps(side: int) -> tuple[np.ndarray, np.ndarray]:
    """For one axis of ``side`` pixels: which input pixels each of the 64 output cells reads
    (``int [64, T]``) and with what weight (``float32 [64, T]``; 0 where a cell reads fewer than T).

    The reference blurs with two passes of a box filter of ``w = ceil(side / 128)`` (its window runs
    from ``o - (w - h)`` to ``o + h - 1`` with ``h = (w + 2) // 2``, clipped at the edges, and divides by
    what it covered), then keeps the pixel at ``int((k + 0.5) * side / 64)`` of each cell k."""
    window = (side + 2 * DOWNSAMPLED - 1) // (2 * DOWNSAMPLED)
    half = (window + 2) // 2
    o = np.arange(side)
    lo, hi = np.maximum(0, o - (window - half)), np.minimum(side - 1, o + half - 1)
    box = np.zeros((side, side))
    for row, (a, b) in enumerate(zip(lo, hi, strict=True)):
        box[row, a : b + 1] = 1.0 / (b - a + 1)
    pick = ((np.arange(DOWNSAMPLED) + 0.5) * side / DOWNSAMPLED).astype(np.int64)
    tent = (box[pick] @ box).astype(np.float32)  # [64, side]
    reads = tent > 0
    first = reads.argmax(axis=1)
    width = int(reads.sum(axis=1).max())
    index = first[:, None] + np.arange(width)[None, :]
    inside = index < side
    index = np.minimum(index, side - 1)
    weight = np.where(inside, np.take_along_axis(tent, index, axis=1), 0.0).astype(np.float32)
    return index, weight


def _downsample(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` to the reference's blurred and decimated 64x64 float luma.

    Products by ``np.einsum`` (its own loops), not ``@``: numpy's OpenBLAS would start threads that spin
    after each call, on the cores the image tower runs on (measured: a torch matmul beside a hashing
    thread 44% slower with them, 14% with one BLAS thread)."""
    height, width = rgb.shape[:2]
    rows, row_weights = _taps(height)
    cols, col_weights = _taps(width)
    picked = rgb[rows].astype(np.float32).reshape(len(rows), rows.shape[1], -1)  # [64, T, W*3]: the rows read
    blurred = np.einsum("kt,ktx->kx", row_weights, picked).reshape(len(rows), width, 3)
    # luma after the blur (both are linear), in float32 as the reference
    luma = blurred[..., 0] * LUMA[0] + blurred[..., 1] * LUMA[1] + blurred[..., 2] * LUMA[2]
    out: np.ndarray = np.einsum("jt,kjt->kj", col_weights, luma[:, cols])
    return out


def _quality(cells: np.ndarray) -> int:
    """The reference's gradient quality (0..100) of the 64x64, truncations included."""
    scale, full = np.float32(100), np.float32(255)
    down = ((cells[:-1] - cells[1:]) * scale / full).astype(np.int32)
    across = ((cells[:, :-1] - cells[:, 1:]) * scale / full).astype(np.int32)
    return min(100, int(np.abs(down).sum() + np.abs(across).sum()) // 90)


def _bits(coefficients: np.ndarray) -> np.ndarray:
    """``uint8 [N, 32]`` of ``[N, 16, 16]`` coefficients: bit k (k = row * 16 + column) set where
    coefficient k > its hash's lower median, packed most significant bit first (bit 255 first, as
    hashes are written)."""
    flat = coefficients.reshape(len(coefficients), 256)
    median = np.partition(flat, 127, axis=1)[:, 127:128]
    return np.packbits((flat > median)[:, ::-1], axis=1)


def hash_image(image: Image.Image | np.ndarray) -> PdqHash:
    """The image's 8 dihedral PDQ hashes and their quality (an RGB Pillow image or ``uint8 [H, W, 3]``)."""
    rgb = _rgb(image)
    if min(rgb.shape[:2]) < DOWNSAMPLED:
        return _reference_hash(rgb)
    cells = _downsample(rgb)
    dct = np.einsum("il,jl->ij", np.einsum("ik,kl->il", DCT, cells), DCT)  # [16, 16] = DCT cells DCT^T
    variants = [dct if signs is None else dct * signs for signs, _ in _DIHEDRAL]
    variants = [v.T if transposed else v for v, (_, transposed) in zip(variants, _DIHEDRAL, strict=True)]
    return PdqHash(_bits(np.stack(variants)), _quality(cells))


def _reference_hash(rgb: np.ndarray) -> PdqHash:
    """Meta's C++ (the ``pdqhash`` package), for images with a side under 64 px: their 64x64 cells repeat
    pixels, which zeroes some DCT coefficients in exact arithmetic, and the bits of those are the float
    rounding of the implementation that computed them; a partner's hash of such an image is the reference's."""
    import pdqhash  # a compiled extension: imported where it is needed

    vectors, quality = pdqhash.compute_dihedral(np.ascontiguousarray(rgb))
    return PdqHash(np.packbits(np.asarray(vectors, dtype=np.uint8), axis=1), int(quality))


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
