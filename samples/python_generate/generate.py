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
        config = json.loads((folder / "genai_config.json").read_text())["model"]
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
        # Keep every LoraAdapter referenced for as long as RunOptions may use it: RunOptions does not own it, and a
        # collected adapter makes runs compute with freed memory, silently (onnxruntime 1.32).
        self.adapters: dict[str, ort.LoraAdapter] = {}
        for file in sorted((folder / "adapters").glob("*.onnx_adapter")):
            adapter = ort.LoraAdapter()
            adapter.Load(str(file))
            self.adapters[file.name.removesuffix(".onnx_adapter")] = adapter

    def run_options(self, adapter: str | None) -> ort.RunOptions:
        """RunOptions with one adapter active (None: the base model). One at a time: see the README."""
        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise SystemExit(f"no adapter {adapter!r}; this folder has: {', '.join(self.adapters) or 'none'}")
            options.add_active_adapter(self.adapters[adapter])
        return options

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        choose: Callable[[np.ndarray], int],  # last position's logits [vocab] -> next token
        run_options: ort.RunOptions,
        stop_at_eos: bool = True,
    ) -> Iterator[int]:
        """Yield new tokens one by one: one prefill run over the prompt, then one run per token on the cache."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        past = {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}
        ids = np.array([prompt], dtype=np.int64)
        length = 0
        for _ in range(max_new_tokens):
            step = ids.shape[1]
            feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + step), np.int64), **past}
            if self.uses_position_ids:
                feeds["position_ids"] = np.arange(length, length + step, dtype=np.int64)[None]
            results = dict(zip(self.outputs, self.session.run(self.outputs, feeds, run_options)))
            past = {name.replace("present", "past_key_values"): value for name, value in results.items() if name.startswith("present.")}
            length += step
            token = int(choose(results["logits"][0, -1].astype(np.float32)))
            yield token
            if stop_at_eos and token in self.eos:
                return
            ids = np.array([[token]], dtype=np.int64)


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
                prompt_ids, args.max_new_tokens, choose, decoder.run_options(None if adapter == "base" else adapter),
                stop_at_eos=not args.ignore_eos,
            )
            if args.token_ids:
                record = {"adapter": adapter, "prompt": prompt, "prompt_ids": prompt_ids, "tokens": list(tokens)}
                print(json.dumps(record), flush=True)
            else:
                print(f"[{adapter}] {prompt}", end="", flush=True)
                stream_text(tokenizer, tokens)


if __name__ == "__main__":
    main()
