"""hqexport: HQQ-quantized, LoRA-fine-tuned models to ONNX Runtime, with proof that nothing changed."""

__version__ = "0.1.0"
