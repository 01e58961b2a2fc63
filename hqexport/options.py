"""The choices `convert` and `validate` accept. The CLI's choice lists and the API's checks both read them here.

The module imports nothing, so that `hqexport --help` does not wait for torch.
"""

from __future__ import annotations

#: how the quantized layers are computed: MatMulNBits where exact (auto), hqexport ops only, MatMulNBits only
OPS = ("auto", "hqq", "ort")
#: MatMulNBits accuracy_level: 0 is HQQ's arithmetic (exact); 1 computes weights in fp32 (for float16 / bfloat16
#: layers without hqq's rounding to that dtype: faster, lossy); 4 quantizes activations to int8 (faster, lossy)
ACCURACY_LEVELS = (0, 1, 4)
#: activation dtypes
DTYPES = ("fp32", "fp16")
#: how the lm_head is stored: fp32 (exact) or a lossy hqq requantization
LM_HEADS = ("fp32", "int8", "int4")
#: what happens to LoRA adapters: hot-swappable files, baked into the graph, or merged by re-quantization
ADAPTER_MODES = ("separate", "bake", "merge")
#: dtype of LoRA factors inside the layers' nodes: auto (fp16 when every factor is a float16 value, as adapters
#: trained in float16 or bfloat16 often are, else fp32: exact either way), fp32, or fp16 (half the bytes; factors
#: that are not float16 values are rounded: lossy)
ADAPTER_DTYPES = ("auto", "fp32", "fp16")
#: onnxruntime execution providers validate runs the export on
PROVIDERS = ("cpu", "cuda")
