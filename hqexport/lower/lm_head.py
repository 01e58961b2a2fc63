"""`--lm-head int8 / int4`: the fp lm_head quantized with hqq at convert time (lossy, explicit, validated).

The head of a small model is most of the bytes a decode step reads (SmolLM2-135M: 113 of 180 MB in fp32).
`fp32` (the default) leaves it a fp32 MatMul, bit for bit the source's weights. `int8` / `int4` quantize it
with hqq's own quantizer (group size `HEAD_GROUP_SIZE` along K, hqq's default optimizer), and the head then
becomes one more HQQ layer of the graph: an hqexport.HQQMatMul node, lowered to MatMulNBits like the others.
The manifest records the choice under model.lm_head and model.lossy, and validate measures what it costs.

hqq rather than round-to-nearest: on SmolLM2 an RTN int4 head (onnxruntime's quantizer, block 32) agreed with
the exact model's top-1 token at 70% of validate's positions. On CPU an 8-bit MatMulNBits is fast only at
accuracy_level 4 (its fp32 path dequantizes the whole matrix per call), so pair `int8` with `--accuracy-level 4`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hqq.core.quantize import Quantizer, hqq_base_quant_config

from hqexport.errors import HQExportError
from hqexport.model import QuantizedLinear, QuantizedModel
from hqexport.read.meta import layer_from_meta

LM_HEADS = ("fp32", "int8", "int4")
HEAD_GROUP_SIZE = 32
HEAD_PATH = "lm_head"


@dataclass(frozen=True)
class HeadChoice:
    """How the head is stored (the manifest's model.lm_head)."""

    format: str  # "fp32", "int8", "int4" or "hqq" (quantized in the source)
    lossy: bool
    group_size: int | None = None
    op: str | None = None  # the op computing a head quantized by --lm-head

    def to_json(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None}


def head_choice(qmodel: QuantizedModel, mode: str) -> HeadChoice:
    """What `--lm-head mode` makes of this model's head (an HQExportError for a choice that does not apply)."""
    if mode not in LM_HEADS:
        raise HQExportError(f"--lm-head {mode!r} is not supported; choose {', '.join(LM_HEADS)}")
    if HEAD_PATH in qmodel.linears:
        if mode != "fp32":
            raise HQExportError(f"--lm-head {mode} applies to an fp lm_head; this model's lm_head is HQQ-quantized already")
        return HeadChoice("hqq", lossy=False)
    return HeadChoice(mode, lossy=mode != "fp32", group_size=HEAD_GROUP_SIZE if mode != "fp32" else None)


def quantize_head(qmodel: QuantizedModel, tied: bool, choice: HeadChoice) -> QuantizedLinear:
    """The fp head (the embedding when tied) quantized by hqq as `choice` says: a new HQQ layer named lm_head."""
    weight = qmodel.tensors["model.embed_tokens.weight" if tied else f"{HEAD_PATH}.weight"].float()
    params = hqq_base_quant_config(nbits=8 if choice.format == "int8" else 4, group_size=choice.group_size, axis=1)["weight_quant_params"]
    params["view_as_float"] = False
    packed, meta = Quantizer.quantize(weight, device="cpu", compute_dtype=torch.float32, **params)
    meta["compute_dtype"] = torch.float32
    return layer_from_meta(HEAD_PATH, packed, meta, None)
