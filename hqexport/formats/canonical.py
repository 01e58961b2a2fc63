"""The hqexport op's weight layout (docs/ops.md): codes packed along K, least significant bits first.

Row n of the packed matrix holds the codes of output n: code k of a row in word k // per_word at bit
(k % per_word) * bits, per_word = codes_per_word(bits). Storage widths 8 (nbits 8, 6, 5), 4, 2 (nbits 2 and
1.58), 1: uint8 words holding 8 // bits codes. 3: uint32 words holding 10 codes at bits 0, 3, ..., 27 (bits 30-31
zero), which keeps hqq's 3.2 bits per code. Rows are zero-padded to whole words. For 2/4/8-bit layers this is byte
for byte onnxruntime's MatMulNBits `B` layout, so lowering to it is a reshape.

`LAYOUTS` is the one record of these word facts: the op's schema and function body (ops/) and the readers and
writers here take them from it, and tests/test_layout_record.py checks the C++/CUDA kernels' copy (problem.h).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hqexport.model import HQQFormat

#: nominal hqq width -> storage width of the canonical layout
STORAGE_BITS: dict[float, int] = {8: 8, 6: 8, 5: 8, 4: 4, 3: 3, 2: 2, 1.58: 2, 1: 1}


def storage_bits(fmt: HQQFormat) -> int:
    return STORAGE_BITS[fmt.nbits]


@dataclass(frozen=True)
class WordLayout:
    """The words of one storage width: as many `bits`-bit codes as fit in a `word_dtype` word."""

    bits: int
    word_dtype: np.dtype

    @property
    def codes_per_word(self) -> int:
        return 8 * self.word_dtype.itemsize // self.bits


#: storage width -> its words
LAYOUTS: dict[int, WordLayout] = {
    layout.bits: layout
    for layout in (
        WordLayout(1, np.dtype(np.uint8)),
        WordLayout(2, np.dtype(np.uint8)),
        WordLayout(3, np.dtype(np.uint32)),
        WordLayout(4, np.dtype(np.uint8)),
        WordLayout(8, np.dtype(np.uint8)),
    )
}


def codes_per_word(bits: int) -> int:
    return LAYOUTS[bits].codes_per_word


def word_dtype(bits: int) -> np.dtype:
    return LAYOUTS[bits].word_dtype


def canonical_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    return (out_features, -(-in_features // codes_per_word(bits)))


def pack_canonical(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, K] (uint8) -> canonical packed [N, ceil(K / codes_per_word)]."""
    n, k = codes.shape
    per_word = codes_per_word(bits)
    words = -(-k // per_word)
    dtype = word_dtype(bits)
    padded = np.zeros((n, words * per_word), dtype=dtype)
    padded[:, :k] = codes
    padded = padded.reshape(n, words, per_word)
    shifts = (np.arange(per_word, dtype=dtype) * dtype.type(bits)).astype(dtype)
    return np.bitwise_or.reduce(padded << shifts, axis=2).astype(dtype)


def unpack_canonical(packed: np.ndarray, in_features: int, bits: int) -> np.ndarray:
    """Canonical packed [N, words] -> codes [N, in_features] (uint8). Exact inverse of `pack_canonical`."""
    dtype = word_dtype(bits)
    per_word = codes_per_word(bits)
    words = packed.astype(dtype, copy=False)[:, :, None]
    shifts = (np.arange(per_word, dtype=dtype) * dtype.type(bits)).astype(dtype)
    codes = (words >> shifts) & dtype.type((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :in_features].astype(np.uint8)
