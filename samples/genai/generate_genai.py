"""Generate from an hqexport folder with onnxruntime-genai, switching LoRA adapters at run time.

    python generate_genai.py OUT --prompt "Once upon a time" --adapter base --adapter chat [--max-new-tokens 32]
    python generate_genai.py OUT --prompt "Once upon a time" --token-ids     # one JSON line per request

onnxruntime-genai reads OUT/genai_config.json (written by hqexport convert) and OUT/tokenizer.json; the
adapters/NAME.onnx_adapter files load as they are with og.Adapters. Greedy search (genai_config's default).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import onnxruntime_genai as og


def generate(model: og.Model, prompt_ids: list[int], max_new_tokens: int, adapters: og.Adapters, name: str | None) -> Iterator[int]:
    """Yield new token ids; the adapter (if any) is activated on this generator only."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an hqexport output folder")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    parser.add_argument("--adapter", action="append", help="adapter name per request, 'base' for none (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--token-ids", action="store_true", help="print one JSON line of token ids per request")
    args = parser.parse_args(argv)

    model = og.Model(str(args.folder))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)  # loaded once, shared by all generators
    for file in sorted((args.folder / "adapters").glob("*.onnx_adapter")):
        adapters.load(str(file), file.name.removesuffix(".onnx_adapter"))
    for adapter in args.adapter or ["base"]:
        for prompt in args.prompt:
            prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
            tokens = generate(model, prompt_ids, args.max_new_tokens, adapters, None if adapter == "base" else adapter)
            if args.token_ids:
                print(json.dumps({"adapter": adapter, "prompt": prompt, "prompt_ids": prompt_ids, "tokens": list(tokens)}), flush=True)
                continue
            stream = tokenizer.create_stream()
            print(f"[{adapter}] {prompt}", end="", flush=True)
            for token in tokens:
                print(stream.decode(token), end="", flush=True)
            print()


if __name__ == "__main__":
    main()
