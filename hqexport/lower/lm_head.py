"""How the fp lm_head is stored: fp32, its exact int8 grid, or (`--lm-head int8 / int4`) quantized with hqq at
convert time (lossy, explicit, validated).

The head of a small model is most of the bytes a decode step reads (SmolLM2-135M: 113 of 180 MB in fp32).
`fp32` (the default) leaves it a fp32 MatMul, bit for bit the source's weights. `int8` / `int4` quantize it
with hqq's own quantizer (hqq's default group size, `HEAD_GROUP_SIZE`, along K, and its default optimizer), and the head then
becomes one more HQQ layer of the graph: an hqexport.HQQMatMul node, lowered to MatMulNBits like the others.
The manifest records the choice under model.lm_head and model.lossy, and validate measures what it costs.

The quantized head only draws a shortlist: the `SHORTLIST` tokens with the largest approximate logits get
their logits recomputed from the exact fp rows (export/graph.py: one hqexport.GridShortlist node, ops/shortlist.py,
where the rows are the int8 grid below; else TopK, Gather, MatMul, ScatterElements), so
greedy decoding and top-k sampling see exact logits unless the best token falls outside the shortlist (on
SmolLM2 the int4 head (group 64) ranked the exact top-1 token 4th at worst on validate's texts, and its plain
top-1 agreement was 61%). The fp table stays in the file for that and for the embedding lookup, in the smallest
form that holds it exactly (`rows`: the int8 grid or a half dtype below, read by GatherBlockQuantized or Gather and
Cast), and a decode step reads the quantized table plus SHORTLIST rows of it.

An fp head that is exactly an int8 grid (int8 codes times one scale per 32 inputs: what GGUF's Q8_0 stores, so
what a model read from such a file holds) is stored as that grid under the default `fp32` when the folder ships
hqexport's kernels: bit for bit the same values in a quarter of the bytes (`exact_int8_head`), as one
hqexport.HQQMatMulNBits node that the library runs from the codes. Without the library the node's body is
onnxruntime's MatMulNBits, whose fp32 path dequantizes 8-bit tables on every call: slow but in bounded memory,
which is why a folder without the library (--no-kernels) keeps the fp32 head.

An fp head whose every value is a float16 number (or else a bfloat16 one), as in a checkpoint trained or stored
in that dtype, is stored in that dtype under the default `fp32` when the folder ships the kernels
(`exact_half_head`): the same values in half the bytes, computed by one hqexport.HalfMatMul node (ops/half.py)
that widens them as it reads them; a tied embedding gathers its rows from the same table.

hqq rather than round-to-nearest: on SmolLM2 an RTN int4 head (onnxruntime's quantizer, block 32) agreed with
the exact model's top-1 token at 70% of validate's positions, hqq's (group 32) at 64%, both without the shortlist. Without
the kernels library an 8-bit MatMulNBits is fast on CPU only at accuracy_level 4 (its fp32 path dequantizes the
whole matrix per call), so such a folder pairs `int8` with `--accuracy-level 4`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from hqq.core.quantize import Quantizer, hqq_base_quant_config

from hqexport.errors import HQExportError
from hqexport.model import QuantizedLinear, QuantizedModel
from hqexport.ops.schema import MS_DOMAIN
from hqexport.options import LM_HEADS
from hqexport.read.meta import layer_from_meta

HEAD_GROUP_SIZE = 64  # --lm-head int8 / int4: hqq's default group size
GRID_BLOCK = 32  # the exact int8 grid's block (GGUF Q8_0's)
SHORTLIST = 32  # tokens per position whose logits a lossy head's graph recomputes exactly
GRID_ZERO = 128  # the exact int8 head's codes are q + 128, q in [-127, 127]
GRID_CHECK_ROWS = 4096  # rows of the head checked at a time
HEAD_PATH = "lm_head"
EMBEDDING_NODE = "/model/embed_tokens/Gather"


@dataclass(frozen=True)
class HeadChoice:
    """How the head is stored (the manifest's model.lm_head)."""

    format: str  # "fp32", "int8-exact" (exact_int8_head), "fp16-exact" / "bf16-exact" (exact_half_head), "int8", "int4" or "hqq" (quantized in the source)
    lossy: bool
    group_size: int | None = None
    op: str | None = None  # the op computing a quantized head (--lm-head int8/int4), the exact int8 grid or a half-width head
    shared_with_embedding: bool | None = None  # a tied embedding reads the quantized head's table
    shortlist: int | None = None  # a lossy head: this many logits per position recomputed from the exact rows
    rows: str | None = None  # a shortlist: how the fp rows it rescores are stored ("int8-exact", "fp16-exact", ... or "fp32")

    def to_json(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None}


EXACT_INT8_HEAD = HeadChoice("int8-exact", lossy=False, group_size=GRID_BLOCK)  # exact_int8_head's storage
#: exact_half_head's dtypes, in the order tried (float16 keeps 3 more significand bits), and their formats
HALF_HEAD_FORMATS = {torch.float16: "fp16-exact", torch.bfloat16: "bf16-exact"}


def head_choice(qmodel: QuantizedModel, mode: str) -> HeadChoice:
    """What `--lm-head mode` makes of this model's head (an HQExportError for a choice that does not apply)."""
    if mode not in LM_HEADS:
        raise HQExportError(f"--lm-head {mode!r} is not supported; choose {', '.join(LM_HEADS)}")
    if HEAD_PATH in qmodel.linears:
        if mode != "fp32":
            raise HQExportError(f"--lm-head {mode} applies to an fp lm_head; this model's lm_head is HQQ-quantized already")
        return HeadChoice("hqq", lossy=False)
    if mode == "fp32":
        return HeadChoice(mode, lossy=False)
    return HeadChoice(mode, lossy=True, group_size=HEAD_GROUP_SIZE, shortlist=SHORTLIST)


def quantize_head(qmodel: QuantizedModel, tied: bool, choice: HeadChoice) -> QuantizedLinear:
    """The fp head (the embedding when tied) quantized by hqq as `choice` says: a new HQQ layer named lm_head."""
    weight = qmodel.tensors["model.embed_tokens.weight" if tied else f"{HEAD_PATH}.weight"].float()
    params = hqq_base_quant_config(nbits=8 if choice.format == "int8" else 4, group_size=choice.group_size, axis=1)["weight_quant_params"]
    params["view_as_float"] = False
    packed, meta = Quantizer.quantize(weight, device="cpu", compute_dtype=torch.float32, **params)
    meta["compute_dtype"] = torch.float32
    return layer_from_meta(HEAD_PATH, packed, meta, None)


def exact_int8_head(qmodel: QuantizedModel, tied: bool) -> QuantizedLinear | None:
    """The fp head as an 8-bit HQQ layer (group 32, zero 128) holding exactly its values, or None if it holds others.

    Each block of 32 inputs must be q * s with integer q in [-127, 127] and s = the block's largest magnitude / 127,
    checked by multiplying back, bits compared (a -0.0 is not taken): (code - 128) * s is the head's fp32 value bit
    for bit, as hqq dequantizes it.
    """
    weight = qmodel.tensors["model.embed_tokens.weight" if tied else f"{HEAD_PATH}.weight"]
    if weight.dtype != torch.float32 or weight.shape[1] % GRID_BLOCK:
        return None
    codes, scales = [], []
    for rows in weight.split(GRID_CHECK_ROWS):  # bounded temporaries, and a table that is no grid fails early
        blocks = rows.reshape(-1, GRID_BLOCK)
        scale = blocks.abs().amax(dim=1, keepdim=True) / 127
        code = (blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)).round() + GRID_ZERO  # all-zero blocks: 128
        if not bool(((code >= 1) & (code <= 255)).all()):
            return None
        if not torch.equal(((code - GRID_ZERO) * scale).view(torch.int32), blocks.view(torch.int32)):
            return None
        codes.append(code.to(torch.uint8))
        scales.append(scale)
    scale = torch.cat(scales)
    meta = {"nbits": 8, "group_size": GRID_BLOCK, "axis": 1, "packing": "8bit_u8", "shape": list(weight.shape),
            "scale": scale, "zero": torch.full_like(scale, GRID_ZERO), "compute_dtype": torch.float32}
    return layer_from_meta(HEAD_PATH, torch.cat(codes), meta, None)


def exact_half_head(qmodel: QuantizedModel, tied: bool) -> torch.dtype | None:
    """The first of HALF_HEAD_FORMATS' dtypes that holds every value of the fp head (the embedding when tied), or None.

    Checked by converting there and back, values compared (an fp32 value past float16's range becomes inf and
    fails; a NaN anywhere fails both).
    """
    weight = qmodel.tensors["model.embed_tokens.weight" if tied else f"{HEAD_PATH}.weight"]
    for dtype in HALF_HEAD_FORMATS:
        if weight.dtype == dtype or all(torch.equal(rows.to(dtype).to(rows.dtype), rows) for rows in weight.split(GRID_CHECK_ROWS)):
            return dtype
    return None


def share_embedding(model: ir.Model, head: dict[str, str], *, bits: int, block_size: int) -> None:
    """Make the embedding lookup read the lowered head's MatMulNBits tables (`head`: its initializer names).

    Row v of MatMulNBits' B, scales and zero points is token v's embedding, in the layout GatherBlockQuantized
    reads (codes along the hidden dim, least significant nibble first); the gathered rows of the zero-point
    correction [blocks, vocab] are spread over their blocks by a 0/1 matrix and added. The fp table is dropped.
    """
    graph = model.graph
    gather = next(node for node in graph if node.name == EMBEDDING_NODE)
    table, ids = gather.inputs
    vocab, hidden = table.shape
    blocks = hidden // block_size
    act = table.const_value.dtype.numpy()
    name = "/model/embed_tokens"

    def constant(suffix: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{name}/{suffix}", const_value=ir.tensor(array, name=f"{name}/{suffix}"))
        graph.register_initializer(value)
        return value

    def node(op_type: str, inputs: list[ir.Value], domain: str = "", **attributes) -> ir.Value:
        new = ir.node(op_type, inputs, attributes or None, domain=domain, name=f"{name}/{op_type}_{len(added)}")
        added.append(new)
        return new.outputs[0]

    added: list[ir.Node] = []
    initializers = graph.initializers
    data = node("Reshape", [initializers[head["B"]], constant("data_shape", np.array([vocab, -1], np.int64))])
    scales = node("Reshape", [initializers[head["scales"]], constant("scales_shape", np.array([vocab, blocks], np.int64))])
    zero_points = node("Reshape", [initializers[head["zero_points"]], constant("zero_points_shape", np.array([vocab, -1], np.int64))])
    embedded = node("GatherBlockQuantized", [data, ids, scales, zero_points], MS_DOMAIN,
                    bits=bits, block_size=block_size, quantize_axis=1, gather_axis=0)
    if "zero_correction" in head:
        rows = node("Gather", [node("Transpose", [initializers[head["zero_correction"]]], perm=[1, 0]), ids], axis=0)
        spread = constant("correction_spread", np.kron(np.eye(blocks, dtype=act), np.ones((1, block_size), act)))
        embedded = node("Add", [embedded, node("MatMul", [rows, spread])])
    embedded.type, embedded.shape = gather.outputs[0].type, gather.outputs[0].shape
    ir.convenience.replace_nodes_and_values(graph, gather, [gather], added, [gather.outputs[0]], [embedded])
    if not table.uses():
        del initializers[table.name]
