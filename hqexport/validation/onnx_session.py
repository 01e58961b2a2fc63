"""onnxruntime side: a session over the exported decoder and one forward step through its KV cache.

I/O names are the exported folder's contract: input_ids [b, s], attention_mask [b, past + s], position_ids [b, s]
(when the graph has it), past_key_values.{i}.key/.value [b, kv_heads, past, head_dim] in, logits [b, s, vocab]
and present.{i}.key/.value out. Shapes and dtypes of the cache are read from the session, not assumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hqexport.errors import HQExportError
from hqexport.files import MODEL_FILE
from hqexport.kernels import register_shipped

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}  # options.PROVIDERS -> onnxruntime's name


def providers_for(provider: str) -> list:
    name = ORT_PROVIDERS.get(provider)
    if name is None:
        raise HQExportError(f"unknown provider {provider!r}; choose {', '.join(ORT_PROVIDERS)}")
    if name not in ort.get_available_providers():
        raise HQExportError(f"this onnxruntime has no {name} (available: {', '.join(ort.get_available_providers())})")
    if provider == "cuda":  # TF32 would make fp32 matmuls ~1e-3 inexact; validate plain fp32
        return [(name, {"use_tf32": "0"}), "CPUExecutionProvider"]
    return [name]


@dataclass
class Step:
    logits: np.ndarray  # [b, s, vocab], float32
    present: list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value)
    extras: dict[str, np.ndarray] = field(default_factory=dict)


class OnnxDecoder:
    """One onnxruntime session over model.onnx (or a copy of its graph with extra outputs)."""

    def __init__(self, folder: Path, provider: str, model: onnx.ModelProto | None = None) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # what the folder's users run: its own kernels library, or (None) the hqexport ops' ONNX function bodies
        self.kernels = register_shipped(folder, options)
        if model is None:
            source: str | bytes = str(folder / MODEL_FILE)
        else:  # an edited copy of the graph; its external data still lives in `folder`
            source = model.SerializeToString()
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            self.session = ort.InferenceSession(source, options, providers=providers_for(provider))
        except HQExportError:
            raise
        except Exception as error:  # onnxruntime raises its own exception types
            raise HQExportError(f"onnxruntime cannot load the model: {error}", folder / MODEL_FILE) from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise HQExportError(f"{MODEL_FILE} has no {required} input", folder / MODEL_FILE)
        self.uses_position_ids = "position_ids" in inputs
        layers = sorted({int(m.group(1)) for name in inputs if (m := _PAST.match(name))})
        if layers != list(range(len(layers))):
            raise HQExportError(f"{MODEL_FILE} past_key_values inputs are not numbered 0..n-1: {layers}", folder / MODEL_FILE)
        self.num_layers = len(layers)
        key = inputs.get("past_key_values.0.key")
        self.cache_dtype = _ORT_DTYPES.get(key.type, np.float32) if key is not None else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int, kv_heads: int, head_dim: int) -> list[tuple[np.ndarray, np.ndarray]]:
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=self.cache_dtype)
        return [(empty, empty) for _ in range(self.num_layers)]

    def step(
        self,
        input_ids: np.ndarray,
        past: list[tuple[np.ndarray, np.ndarray]],
        run_options: ort.RunOptions | None = None,
    ) -> Step:
        """Run `input_ids` [b, s] after `past` (all positions attended)."""
        batch, length = input_ids.shape
        past_length = past[0][0].shape[2] if past else 0
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_length + length), dtype=np.int64),
        }
        if self.uses_position_ids:
            positions = np.arange(past_length, past_length + length, dtype=np.int64)
            feeds["position_ids"] = np.broadcast_to(positions, (batch, length)).copy()
        for index, (key, value) in enumerate(past):
            feeds[f"past_key_values.{index}.key"] = key
            feeds[f"past_key_values.{index}.value"] = value
        outputs = dict(zip(self.output_names, self.session.run(None, feeds, run_options)))
        present = [(outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]) for i in range(self.num_layers)]
        known = {"logits", *(f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value"))}
        extras = {name: value for name, value in outputs.items() if name not in known}
        return Step(outputs["logits"].astype(np.float32), present, extras)
