"""Activate exported adapters in an onnxruntime session, with the checks onnxruntime skips.

    from hqexport.adapters.runtime import ExportedAdapters
    adapters = ExportedAdapters("out")                      # the exported folder
    logits = session.run(["logits"], feeds, adapters.run_options("french"))[0]

Run without run options (or with `adapters.run_options()`) for the base model. If you call
`RunOptions.add_active_adapter` yourself, keep the `ort.LoraAdapter` object alive for as long as the RunOptions
are used: onnxruntime does not hold a reference, and a collected adapter makes runs compute garbage silently. Adapters apply to
`session.run(..., run_options)` only: onnxruntime ignores them in IOBinding runs.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from hqexport.adapters.onnx_adapter import check_adapter_fits, check_no_overlap, read_adapter_file
from hqexport.errors import HQExportError
from hqexport.files import ADAPTER_SUFFIX, ADAPTERS_DIR, MODEL_FILE, adapter_file


class ExportedAdapters:
    """The adapters/NAME.onnx_adapter files of an exported folder, loaded once (memory-mapped by onnxruntime)."""

    def __init__(self, folder: str | Path, *, check_model: bool = True) -> None:
        self.folder = Path(folder)
        files = sorted((self.folder / ADAPTERS_DIR).glob(f"*{ADAPTER_SUFFIX}"))
        if not files:
            raise HQExportError(f"has no {ADAPTERS_DIR}/*{ADAPTER_SUFFIX} files", self.folder)
        self.parameters = {f.name[: -len(ADAPTER_SUFFIX)]: read_adapter_file(f) for f in files}
        if check_model:
            model = onnx.load(str(self.folder / MODEL_FILE), load_external_data=False)
            for name, params in self.parameters.items():
                check_adapter_fits(model, params, self.folder / adapter_file(name))
        self._loaded: dict[str, ort.LoraAdapter] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.parameters)

    def adapter(self, name: str) -> ort.LoraAdapter:
        if name not in self.parameters:
            raise HQExportError(f"no adapter named {name!r} (have: {', '.join(self.names)})", self.folder)
        if name not in self._loaded:
            loaded = ort.LoraAdapter()
            loaded.Load(str(self.folder / adapter_file(name)))
            self._loaded[name] = loaded
        return self._loaded[name]

    def run_options(self, *names: str) -> ort.RunOptions:
        """RunOptions with the named adapters active; refuses adapters that set the same parameter."""
        check_no_overlap({name: self.parameters[name] for name in names if self.adapter(name)})
        options = AdapterRunOptions()
        for name in names:
            options.add_active_adapter(self.adapter(name))
        options.active_adapters = [self.adapter(name) for name in names]
        return options


class AdapterRunOptions(ort.RunOptions):
    """RunOptions that keep their active adapters alive.

    onnxruntime's RunOptions does not own the LoraAdapter it is given: once the Python object is collected its
    memory-mapped parameters go away and runs silently compute with freed memory (seen with 1.32).
    """

    active_adapters: list[ort.LoraAdapter]

