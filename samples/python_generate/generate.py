"""Generate text from an hqexport folder with plain onnxruntime: KV cache, greedy or seeded sampling, streaming,
and LoRA adapters switched between requests.

    python generate.py OUT --prompt "Once upon a time" --adapter base --adapter chat
    python generate.py OUT --prompt "Once upon a time" --sample --temperature 0.8 --top-p 0.9 --seed 7
    python generate.py OUT --prompt "Once upon a time" --token-ids     # one JSON line per request

Needs only numpy, onnxruntime and tokenizers (no hqexport, no torch). The folder is self-describing:
model.onnx (+ .data), tokenizer.json, genai_config.json (cache shapes, EOS) and adapters/NAME.onnx_adapter.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")
_CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Decoder:
    """One onnxruntime session over FOLDER/model.onnx and the adapters next to it."""

    def __init__(self, folder: Path, kernels: Path | None = None) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA parameters are overridable initializers: ORT warns about each one
        genai_config = json.loads((folder / "genai_config.json").read_text())
        config = genai_config["model"]
        shipped = config["decoder"].get("session_options", {}).get("custom_ops_library")
        kernels = kernels or (folder / shipped if shipped else None)
        if kernels is not None:  # hqexport's compiled kernels; without them its ops run as their ONNX function bodies
            options.register_custom_ops_library(str(kernels))
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.eos = set(np.atleast_1d(config["eos_token_id"]).tolist())
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for name in inputs if _PAST.match(name))
        self.kv_heads = config["decoder"]["num_key_value_heads"]
        self.head_dim = config["decoder"]["head_size"]
        self.cache_dtype = _CACHE_DTYPES[inputs["past_key_values.0.key"].type]
        self.uses_position_ids = "position_ids" in inputs
        self.outputs = [o.name for o in self.session.get_outputs()]
        # GroupQueryAttention may write each step's keys and values into one cache bound as both its past input and
        # its present output (genai_config.json's past_present_share_buffer, which onnxruntime-genai follows too):
        # no copy of the whole cache per step
        self.shares_cache = bool(genai_config.get("search", {}).get("past_present_share_buffer", False))
        # An adapter is bound as inputs (its factors are overridable initializers of the graph): runs through IOBinding
        # ignore the active adapters of RunOptions (onnxruntime 1.32). The AdapterFormat owns the factors' memory.
        self.adapters: dict[str, ort.AdapterFormat] = {
            file.name.removesuffix(".onnx_adapter"): ort.AdapterFormat.read_adapter(str(file))
            for file in sorted((folder / "adapters").glob("*.onnx_adapter"))
        }

    def adapter_parameters(self, adapter: str | None) -> dict[str, ort.OrtValue]:
        """The inputs that make one adapter active (None: the base model, the graph's rank-0 defaults)."""
        if adapter is None:
            return {}
        if adapter not in self.adapters:
            raise SystemExit(f"no adapter {adapter!r}; this folder has: {', '.join(self.adapters) or 'none'}")
        return self.adapters[adapter].get_parameters()

    def adapter_binding(self, adapter: str | None) -> ort.IOBinding:
        """An IOBinding with one adapter's parameters bound as inputs (None: the base model)."""
        binding = self.session.io_binding()
        for name, value in self.adapter_parameters(adapter).items():
            binding.bind_ortvalue_input(name, value)
        return binding

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        choose: Callable[[np.ndarray], int],  # last position's logits [vocab] -> next token
        adapter: str | None = None,
        stop_at_eos: bool = True,
    ) -> Iterator[int]:
        """Yield new tokens one by one: one prefill run over the prompt, then one run per token on the cache."""
        if self.shares_cache:
            run = self._shared_cache_runner(self.adapter_binding(adapter), len(prompt) + max_new_tokens)
        else:
            run = self._copied_cache_runner(self.adapter_parameters(adapter))
        ids = np.array([prompt], dtype=np.int64)
        length = 0
        for _ in range(max_new_tokens):
            step = ids.shape[1]
            feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + step), np.int64)}
            if self.uses_position_ids:
                feeds["position_ids"] = np.arange(length, length + step, dtype=np.int64)[None]
            logits = run(feeds)
            length += step
            token = int(choose(logits[0, -1].astype(np.float32)))
            yield token
            if stop_at_eos and token in self.eos:
                return
            ids = np.array([[token]], dtype=np.int64)

    def _shared_cache_runner(self, binding: ort.IOBinding, positions: int) -> Callable[[dict], np.ndarray]:
        """Runs on one cache of `positions` per layer, bound as both past and present: each step writes its keys and
        values in place, where a copied cache is rebuilt, one position longer, every step."""
        binding.bind_output("logits")  # the first output bound: get_outputs()[0]
        for i in range(self.layers):
            for kv in ("key", "value"):
                cache = ort.OrtValue.ortvalue_from_shape_and_type((1, self.kv_heads, positions, self.head_dim), self.cache_dtype)
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", cache)
                binding.bind_ortvalue_output(f"present.{i}.{kv}", cache)

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("logits")  # unallocated again: the prefill's logits have another shape than a step's
            self.session.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()

        return run

    def _copied_cache_runner(self, parameters: dict[str, ort.OrtValue]) -> Callable[[dict], np.ndarray]:
        """Runs that feed each run's present cache back as the next run's past."""
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.kv_heads, 0, self.head_dim), self.cache_dtype))
        past = {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            nonlocal past
            values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feeds.items()}
            results = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, values | past | parameters)))
            past = {name.replace("present", "past_key_values"): value for name, value in results.items() if name.startswith("present.")}
            return results["logits"].numpy()

        return run


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def sampler(temperature: float, top_k: int, top_p: float, seed: int) -> Callable[[np.ndarray], int]:
    """Temperature, then top-k, then top-p (nucleus) sampling from a seeded numpy generator."""
    rng = np.random.default_rng(seed)

    def choose(logits: np.ndarray) -> int:
        scaled = logits.astype(np.float64) / max(temperature, 1e-6)
        order = np.argsort(-scaled, kind="stable")[: top_k if top_k > 0 else None]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        keep = min(int(np.searchsorted(np.cumsum(probs), top_p)) + 1, len(order))  # smallest set reaching top_p
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[rng.choice(keep, p=probs)])

    return choose


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int]) -> None:
    """Print the continuation as it is generated; decode the whole tail so multi-byte characters come out whole."""
    generated: list[int] = []
    shown = ""
    for token in tokens:
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(generated)[len(shown):] + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an hqexport output folder")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one request each)")
    parser.add_argument("--adapter", action="append", help="adapter name per request, 'base' for none (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--kernels", type=Path, help="hqexport kernels library (default: the one the folder ships, if any)")
    parser.add_argument("--token-ids", action="store_true", help="print one JSON line of token ids per request")
    args = parser.parse_args(argv)

    decoder = Decoder(args.folder, args.kernels)
    tokenizer = Tokenizer.from_file(str(args.folder / "tokenizer.json"))
    adapters = args.adapter or ["base"]
    # every prompt with every adapter: the adapter changes between requests, the session stays the same
    for adapter in adapters:
        for prompt in args.prompt:
            prompt_ids = tokenizer.encode(prompt).ids
            choose = sampler(args.temperature, args.top_k, args.top_p, args.seed) if args.sample else greedy
            tokens = decoder.generate(
                prompt_ids, args.max_new_tokens, choose, None if adapter == "base" else adapter, stop_at_eos=not args.ignore_eos
            )
            if args.token_ids:
                record = {"adapter": adapter, "prompt": prompt, "prompt_ids": prompt_ids, "tokens": list(tokens)}
                print(json.dumps(record), flush=True)
            else:
                print(f"[{adapter}] {prompt}", end="", flush=True)
                stream_text(tokenizer, tokens)


if __name__ == "__main__":
    main()
