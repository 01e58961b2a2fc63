"""hqexport: HQQ-quantized, LoRA-fine-tuned models to ONNX Runtime, with proof that nothing changed.

The Python API is what the command line wraps:

    import hqexport
    summary = hqexport.convert("hqq-model", "out", adapters=["chat=lora-folder"])   # -> ConvertSummary
    report = hqexport.validate("out")                                               # -> Report
    assert report.passed

Both are imported when first used (PEP 562), so `import hqexport` and its light submodules (hqexport.kernels,
hqexport.formats) do not pull in torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ConvertSummary", "Report", "__version__", "convert", "validate"]

#: public name -> the module that defines it
_API = {"convert": "conversion", "ConvertSummary": "conversion", "validate": "validation", "Report": "validation"}

if TYPE_CHECKING:
    from hqexport.conversion import ConvertSummary, convert
    from hqexport.validation import Report, validate


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'hqexport' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"hqexport.{_API[name]}"), name)
