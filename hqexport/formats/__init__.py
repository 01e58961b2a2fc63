"""HQQ formats: hqq's packings, dequantization bit-exact with hqq, and the hqexport op's canonical layout."""

from hqexport.formats.canonical import (
    LAYOUTS,
    STORAGE_BITS,
    WordLayout,
    canonical_shape,
    codes_per_word,
    pack_canonical,
    storage_bits,
    unpack_canonical,
    word_dtype,
)
from hqexport.formats.codes import grouped_shape, pack_codes, unpack_codes
from hqexport.formats.dequant import dequantize_numpy, dequantize_torch, numpy_dtype, tensor_to_numpy
from hqexport.formats.packing import PACKINGS, get_packing

__all__ = [
    "LAYOUTS",
    "PACKINGS",
    "STORAGE_BITS",
    "canonical_shape",
    "codes_per_word",
    "dequantize_numpy",
    "dequantize_torch",
    "get_packing",
    "grouped_shape",
    "numpy_dtype",
    "pack_canonical",
    "pack_codes",
    "storage_bits",
    "tensor_to_numpy",
    "unpack_canonical",
    "unpack_codes",
    "WordLayout",
    "word_dtype",
]
