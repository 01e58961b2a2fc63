"""Pass/fail thresholds per exported dtype and execution provider (docs/validate.md explains each).

The reference always runs float32 activations. The ONNX model runs float32 or float16 activations on CPU or
CUDA. Relative errors are max|Δ| / max|reference| of the compared tensor, so they do not depend on the model's
scale. Weights are not here: the HQQMatMul weight check is exact (bit for bit) whatever the dtype.

- fp32 / cpu: both sides compute the same float32 ops, only the summation order differs (MLAS vs torch
  kernels); measured errors are ~1e-6 of the tensor's scale, the thresholds leave two decades of margin.
- fp32 / cuda: cuBLAS may reorder more and fuse; 10x looser.
- fp16: every activation is rounded to 11 significant bits (eps 9.8e-4) once per op; tens of ops per block
  compound to ~1e-3..1e-2 of the scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: a lossy export (convert --accuracy-level 4, --lm-head int8/int4: manifest model.lossy) is held to these
#: instead of exactness: top-1 agreement with the reference over validate's logits positions, and perplexity
LOSSY_TOP1_AGREEMENT = 0.95
LOSSY_PERPLEXITY_RELATIVE = 0.05

#: units in the last place a MatMulNBits-lowered weight may differ from hqq's (one more rounding than hqq)
LOWERED_WEIGHT_ULPS = 4
EPSILON = {"fp32": 2.0**-23, "fp16": 2.0**-10, "bf16": 2.0**-7}


@dataclass(frozen=True)
class Thresholds:
    block_relative: float  # per decoder block output: max|Δ| / max|ref| at most this
    logits_relative: float  # logits: max|Δ| / max|logit| at most this
    logits_cosine: float  # logits: cosine similarity at least this
    perplexity_relative: float  # |ppl_onnx - ppl_ref| / ppl_ref at most this
    # top-1 and greedy tokens must agree wherever the reference's top-2 margin exceeds
    # logits_relative * max|logit| (a closer call is a tie that either side may break)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


_TABLE: dict[tuple[str, str], Thresholds] = {
    ("fp32", "cpu"): Thresholds(block_relative=1e-4, logits_relative=1e-4, logits_cosine=0.99999, perplexity_relative=1e-4),
    ("fp32", "cuda"): Thresholds(block_relative=1e-3, logits_relative=1e-3, logits_cosine=0.9999, perplexity_relative=1e-3),
    ("fp16", "cpu"): Thresholds(block_relative=2e-2, logits_relative=2e-2, logits_cosine=0.999, perplexity_relative=1e-2),
    ("fp16", "cuda"): Thresholds(block_relative=2e-2, logits_relative=2e-2, logits_cosine=0.999, perplexity_relative=1e-2),
}


def thresholds_for(dtype: str, provider: str) -> Thresholds:
    try:
        return _TABLE[(dtype, provider)]
    except KeyError:
        raise ValueError(f"no thresholds for dtype {dtype!r} on provider {provider!r}") from None


def lowered_weight_tolerance(compute_dtype: str, activation_dtype: str) -> float:
    """Relative tolerance (of max|W|) for a MatMulNBits weight: a few ulp of the coarser dtype."""
    return LOWERED_WEIGHT_ULPS * max(EPSILON.get(compute_dtype, EPSILON["fp32"]), EPSILON[activation_dtype])
