"""LoRA adapters: PEFT parsing and scaling, merge into HQQ weights, ONNX LoRA branches, .onnx_adapter files."""

from hqexport.adapters.apply import MODES, AdapterExport, apply_adapters
from hqexport.adapters.merge import merge_adapter
from hqexport.adapters.peft_config import AdapterSpec, LoraModuleWeights, load_adapters

__all__ = ["MODES", "AdapterExport", "AdapterSpec", "LoraModuleWeights", "apply_adapters", "load_adapters", "merge_adapter"]
