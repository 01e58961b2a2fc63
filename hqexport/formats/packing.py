"""hqq's bit packings, one class per packing, in numpy.

Bit-exact with `hqq.core.bitpack.BitPack` (hqq 0.2.8): codes are packed along dim 0 in row slabs, the first
slab in the most significant bits. `unpack` returns all slabs, including the zero rows that 3bit_32 pads with.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np


class HQQPacking:
    """One hqq packing: `slabs` rows of codes share one stored row, each `bits` wide."""

    name: ClassVar[str]
    bits: ClassVar[int]  # bits per code in storage
    slabs: ClassVar[int]  # codes per stored element
    dtype: ClassVar[np.dtype]  # dtype of the stored W_q

    @classmethod
    def unpack(cls, packed: np.ndarray) -> np.ndarray:
        """Stored [R, C] -> codes [slabs * R, C] as uint8."""
        words = packed.astype(cls.dtype, copy=False)
        mask = (1 << cls.bits) - 1
        shifts = [(cls.slabs - 1 - i) * cls.bits for i in range(cls.slabs)]
        return np.concatenate([((words >> s) & mask).astype(np.uint8) for s in shifts], axis=0)

    @classmethod
    def pack(cls, codes: np.ndarray) -> np.ndarray:
        """Codes [R, C] -> stored [ceil(R / slabs), C], zero-padding R like hqq does."""
        rows = -(-codes.shape[0] // cls.slabs) * cls.slabs
        padded = np.zeros((rows, codes.shape[1]), dtype=cls.dtype)
        padded[: codes.shape[0]] = codes
        step = rows // cls.slabs
        out = np.zeros((step, codes.shape[1]), dtype=cls.dtype)
        for i in range(cls.slabs):
            out |= padded[i * step : (i + 1) * step] << ((cls.slabs - 1 - i) * cls.bits)
        return out

    @classmethod
    def packed_rows(cls, code_rows: int) -> int:
        return -(-code_rows // cls.slabs)


class Pack8bitU8(HQQPacking):
    name, bits, slabs, dtype = "8bit_u8", 8, 1, np.dtype(np.uint8)


class Pack4bitU8(HQQPacking):
    name, bits, slabs, dtype = "4bit_u8", 4, 2, np.dtype(np.uint8)


class Pack3bit32(HQQPacking):
    name, bits, slabs, dtype = "3bit_32", 3, 10, np.dtype(np.int32)


class Pack2bitU8(HQQPacking):
    name, bits, slabs, dtype = "2bit_u8", 2, 4, np.dtype(np.uint8)


class Pack1bitU8(HQQPacking):
    name, bits, slabs, dtype = "1bit_u8", 1, 8, np.dtype(np.uint8)


PACKINGS: dict[str, type[HQQPacking]] = {
    cls.name: cls for cls in (Pack8bitU8, Pack4bitU8, Pack3bit32, Pack2bitU8, Pack1bitU8)
}


def get_packing(name: str) -> type[HQQPacking]:
    try:
        return PACKINGS[name]
    except KeyError:
        raise KeyError(f"unknown hqq packing {name!r} (known: {', '.join(PACKINGS)})") from None
