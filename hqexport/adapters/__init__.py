"""LoRA adapters: PEFT parsing and scaling, merge into HQQ weights, ONNX LoRA branches, .onnx_adapter files."""

from hqexport.adapters.apply import AdapterExport, apply_adapters
from hqexport.adapters.loading import load_adapters
from hqexport.adapters.merge import merge_adapter
from hqexport.adapters.spec import AdapterSpec, LoraModuleWeights

__all__ = ["AdapterExport", "AdapterSpec", "LoraModuleWeights", "apply_adapters", "load_adapters", "merge_adapter"]
