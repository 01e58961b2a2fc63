"""formats/canonical.py's LAYOUTS against every other place that knows the canonical words: the packers, the op's
schema and ONNX function body, the lowering and the C++/CUDA kernels (problem.h, through the built library)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from hqexport.formats import LAYOUTS, STORAGE_BITS, canonical_shape, pack_canonical, unpack_canonical
from hqexport.lower.matmulnbits import matmulnbits_blocker
from hqexport.ops.function import MIN_OPSET, hqq_matmul_function
from hqexport.ops.schema import DOMAIN, OP_TYPE, SINCE_VERSION, register_schema

BITS = sorted(LAYOUTS)


def test_every_nominal_width_has_a_layout():
    assert set(STORAGE_BITS.values()) == set(LAYOUTS)


@pytest.mark.parametrize("bits", BITS)
def test_words_hold_codes_per_word_lanes(bits):
    """All-ones codes fill exactly codes_per_word lanes of each word; a partial last word keeps the rest zero."""
    layout = LAYOUTS[bits]
    per_word = layout.codes_per_word
    assert per_word * bits <= 8 * layout.word_dtype.itemsize < (per_word + 1) * bits
    codes = np.full((2, 2 * per_word + 1), (1 << bits) - 1, dtype=np.uint8)
    packed = pack_canonical(codes, bits)
    assert packed.dtype == layout.word_dtype and packed.shape == canonical_shape(*codes.shape, bits)
    assert packed[:, :2].tolist() == [[(1 << (per_word * bits)) - 1] * 2] * 2
    assert packed[:, 2].tolist() == [(1 << bits) - 1] * 2
    assert np.array_equal(unpack_canonical(packed, codes.shape[1], bits), codes)


def test_schema_word_types_are_the_records():
    register_schema()
    (words,) = [c for c in onnx.defs.get_schema(OP_TYPE, SINCE_VERSION, DOMAIN).type_constraints if c.type_param_str == "T2"]
    assert set(words.allowed_type_strs) == {f"tensor({layout.word_dtype.name})" for layout in LAYOUTS.values()}


def _body_codes_per_word(bits: int) -> int:
    """The function body's codes per word for `bits`: its nodes up to `per_word`, run by onnx's reference."""
    function = hqq_matmul_function(MIN_OPSET)
    names = [node.output[0] for node in function.node]
    nodes = function.node[: names.index("per_word") + 1]
    attribute_names = list(function.attribute)
    probe = helper.make_function(function.domain, "PerWord", [], ["per_word"], nodes, list(function.opset_import), attribute_names)
    attributes = dict.fromkeys(attribute_names, 1) | {"bits": bits}  # the others only feed nodes per_word ignores
    return int(ReferenceEvaluator(probe).run(None, {}, attributes=attributes)[0])


@pytest.mark.parametrize("bits", BITS)
def test_function_body_reads_the_record(bits):
    assert _body_codes_per_word(bits) == LAYOUTS[bits].codes_per_word


def test_lowering_has_a_container_for_every_width():
    assert all(matmulnbits_blocker(bits=bits, group_size=16, axis=1, in_features=16) is None for bits in LAYOUTS)


def test_kernels_read_the_record(library: Path):
    """problem.h's word_bytes / codes_per_word, exported by the library, equal LAYOUTS; other widths have no words."""
    lib = ctypes.CDLL(str(library))
    for name in ("hqexport_word_bytes", "hqexport_codes_per_word"):
        getattr(lib, name).argtypes = [ctypes.c_int64]
        getattr(lib, name).restype = ctypes.c_int64
    for bits in range(33):
        layout = LAYOUTS.get(bits)
        assert lib.hqexport_word_bytes(bits) == (layout.word_dtype.itemsize if layout else 0), bits
        if layout:
            assert lib.hqexport_codes_per_word(bits) == layout.codes_per_word, bits
