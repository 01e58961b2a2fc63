"""Write stage: the output folder (atomic), model.onnx + external data, genai_config.json, hqexport.json."""
