"""Export stage: the decoder graph built from the config and the HQQ weights (onnx_ir), per architecture family."""
