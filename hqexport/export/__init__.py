"""Export stage: rebuild the transformers model with hqexport op modules, wrap it with a flat KV cache, torch.onnx."""
