"""Format math against hqq itself: dequantization bit-identical to HQQLinear.dequantize(), packings and the
canonical layout round-tripping exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hqq.core.bitpack import BitPack
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hqexport.formats import (
    dequantize_numpy,
    dequantize_torch,
    get_packing,
    pack_canonical,
    pack_codes,
    storage_bits,
    tensor_to_numpy,
    unpack_canonical,
    unpack_codes,
)
from hqexport.model import HQQ_BIT_TO_PACKING, HQQFormat, QuantizedLinear

NBITS = [8, 6, 5, 4, 3, 2, 1.58, 1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: (out, in, group, view_as_float). hqq pads only 3-bit row slabs (other widths need whole slabs);
#: 32x48 g16 pads them on both axes (96 groups, 16 rows). view_as_float needs columns divisible by 4.
LAYOUTS = [(32, 48, 16, False), (24, 40, 24, False), (24, 40, 24, True)]

#: hqq's own pack functions, by packing name (the independent reference for `pack_codes`).
HQQ_PACK = {
    "8bit_u8": BitPack.pack_8bit_u8,
    "4bit_u8": BitPack.pack_4bit_u8,
    "3bit_32": BitPack.pack_3bit_32,
    "2bit_u8": BitPack.pack_2bit_u8,
    "1bit_u8": BitPack.pack_1bit_u8,
}


def hqq_layer(nbits, axis, dtype, view_as_float, shape, seed=0) -> HQQLinear:
    out_features, in_features, group = shape
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=axis, view_as_float=view_as_float)
    return HQQLinear(linear, config, compute_dtype=dtype, device="cpu")


def as_layer(q: HQQLinear) -> QuantizedLinear:
    meta = q.meta
    packed = q.W_q.data.view(meta["unpack_view_dtype"]) if meta["view_as_float"] else q.W_q.data
    out_features, in_features = meta["shape"]
    fmt = HQQFormat(nbits=meta["nbits"], group_size=meta["group_size"], axis=meta["axis"], packing=meta["packing"])
    return QuantizedLinear("layer", out_features, in_features, fmt, packed, meta["scale"], meta["zero"], q.bias,
                           meta["compute_dtype"], meta["view_as_float"])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "x".join(map(str, s[:3])) + ("-view_as_float" if s[3] else ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("nbits", NBITS)
def test_dequant_bit_identical_to_hqq(nbits, axis, dtype, layout):
    *shape, view_as_float = layout
    q = hqq_layer(nbits, axis, dtype, view_as_float, shape)
    layer = as_layer(q)
    assert layer.fmt.packing == HQQ_BIT_TO_PACKING[nbits]
    reference = q.dequantize()
    got_torch = dequantize_torch(layer)
    assert got_torch.dtype == reference.dtype == dtype
    assert torch.equal(got_torch, reference)
    got_numpy = dequantize_numpy(layer)
    assert np.array_equal(got_numpy, tensor_to_numpy(reference))

    codes = unpack_codes(layer.packed.numpy(), *layer.shape, layer.fmt)
    assert codes.max() < 2 ** _code_bits(nbits)
    assert np.array_equal(pack_codes(codes, layer.fmt), layer.packed.numpy())
    bits = storage_bits(layer.fmt)
    assert np.array_equal(unpack_canonical(pack_canonical(codes, bits), layer.in_features, bits), codes)


def _fmt(nbits: float, group: int, axis: int) -> HQQFormat:
    return HQQFormat(nbits=nbits, group_size=group, axis=axis, packing=HQQ_BIT_TO_PACKING[nbits])


def _code_bits(nbits: float) -> int:
    return {1.58: 2}.get(nbits, int(nbits))


@settings(max_examples=60, deadline=None)
@given(
    nbits=st.sampled_from(NBITS),
    axis=st.sampled_from([0, 1]),
    out_features=st.integers(1, 12).map(lambda n: 8 * n),
    in_features=st.integers(1, 12).map(lambda k: 8 * k),
    group=st.sampled_from([8, 16, 32]),
    seed=st.integers(0, 2**32 - 1),
)
def test_hqq_packing_round_trip_on_random_codes(nbits, axis, out_features, in_features, group, seed):
    """pack_codes equals hqq's BitPack on random codes, and unpack_codes inverts it."""
    fmt = _fmt(nbits, group, axis)
    rows = (out_features * in_features // group, group) if axis == 1 else (group, out_features * in_features // group)
    assume((out_features * in_features) % group == 0)
    assume(fmt.packing == "3bit_32" or rows[0] % get_packing(fmt.packing).slabs == 0)  # hqq pads only 3-bit
    codes = np.random.default_rng(seed).integers(0, 2 ** _code_bits(nbits), (out_features, in_features), dtype=np.uint8)
    packed = pack_codes(codes, fmt)
    reference = HQQ_PACK[fmt.packing](torch.from_numpy(codes.reshape(rows)))
    assert np.array_equal(packed, reference.numpy())
    assert np.array_equal(unpack_codes(packed, out_features, in_features, fmt), codes)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([8, 4, 3, 2, 1]),
    out_features=st.integers(1, 9),
    in_features=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
)
def test_canonical_round_trip_on_random_codes(bits, out_features, in_features, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (out_features, in_features), dtype=np.uint8)
    packed = pack_canonical(codes, bits)
    per_word = 10 if bits == 3 else 8 // bits
    assert packed.shape == (out_features, -(-in_features // per_word))
    assert np.array_equal(unpack_canonical(packed, in_features, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_canonical_layout_is_lsb_first_along_k(bits):
    """Independent check of the layout definition: code k of row n sits at bit (k % per_word) * bits."""
    per_word = 8 // bits
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (3, 2 * per_word + 1), dtype=np.uint8)
    packed = pack_canonical(codes, bits)
    for n in range(codes.shape[0]):
        for k in range(codes.shape[1]):
            assert (int(packed[n, k // per_word]) >> ((k % per_word) * bits)) & (2**bits - 1) == codes[n, k]


def test_canonical_3bit_ten_codes_per_uint32():
    codes = np.arange(23, dtype=np.uint8).reshape(1, 23) % 8
    packed = pack_canonical(codes, 3)
    assert packed.dtype == np.uint32 and packed.shape == (1, 3)
    expected = [sum(int(c) << (3 * i) for i, c in enumerate(codes[0, w * 10 : w * 10 + 10])) for w in range(3)]
    assert packed[0].tolist() == expected
