"""Peak memory (RSS) and wall time of `hqexport convert`, on SmolLM2-135M and on a synthetic 7B-shaped checkpoint.

    python benchmarks/convert_memory.py smollm2              # the cached hqq folder built by tests/smollm2.py
    python benchmarks/convert_memory.py synthetic            # Llama-2-7B shapes, 32 layers, 4-bit g64 axis 1
    python benchmarks/convert_memory.py synthetic --layers 4 # 7B widths, fewer layers (for extrapolation)

The synthetic checkpoint is written in hqq's safetensors key layout (the 19 keys per linear that hqq's encoded
state dict has, one shard per decoder layer plus an index) straight from random packed codes and random
scale/zero — hqq's quantizer is never run, the numbers mean nothing, the shapes and bytes are those of a real
4-bit HQQ Llama-2-7B. It lives in a temporary folder (or --workdir) that is deleted afterwards, never in the repo.

Each convert runs in a child process (`python -m hqexport.cli convert ... --json`); its peak RSS is the
kernel's ru_maxrss of that child (resource.getrusage(RUSAGE_CHILDREN), the figure `/usr/bin/time -v` prints).
That figure counts the source's pages, which convert reads memory-mapped: they are file-backed and the kernel can
drop them at any time. So the child's anonymous memory (RssAnon in /proc/PID/status, what convert itself
allocates) is also sampled every 0.1 s and its peak reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import status_kib

from hqexport.formats.codes import grouped_shape
from hqexport.formats.packing import PACKINGS
from hqexport.model import HQQFormat

#: Llama-2-7B
LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
FORMAT = HQQFormat(nbits=4, group_size=64, axis=1, packing="4bit_u8")
LINEARS = {  # tag -> (out, in) as functions of the config
    "self_attn.q_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "self_attn.k_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "self_attn.v_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "self_attn.o_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "mlp.gate_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "mlp.up_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "mlp.down_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
}
SMOLLM2 = Path.home() / ".cache" / "hqexport" / "smollm2-135m-instruct-hqq-4bit-g64-float32"


def _ascii(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def hqq_linear_tensors(prefix: str, out_features: int, in_features: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The 19 keys hqq's encoded state dict has for one 4-bit linear (compute dtype float16), random values."""
    rows, cols = grouped_shape(out_features, in_features, FORMAT)
    packed_rows = PACKINGS[FORMAT.packing].packed_rows(rows)
    groups = rows
    one = lambda v, dtype=torch.uint8: torch.tensor(v, dtype=dtype)  # noqa: E731
    return {
        f"{prefix}.W_q": torch.randint(0, 256, (packed_rows, cols), dtype=torch.uint8, generator=generator),
        f"{prefix}.scale": (torch.rand(groups, 1, generator=generator) * 0.02 + 1e-3).half(),
        f"{prefix}.zero": (torch.rand(groups, 1, generator=generator) * 15).half(),
        f"{prefix}.shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        f"{prefix}.nbits": one(FORMAT.nbits, torch.int32),
        f"{prefix}.group_size": one(FORMAT.group_size, torch.int32),
        f"{prefix}.axis": one(FORMAT.axis, torch.int32),
        f"{prefix}.packing": _ascii(FORMAT.packing),
        f"{prefix}.unpack_view_dtype": _ascii("torch.uint8"),
        f"{prefix}.compute_dtype": _ascii("torch.float16"),
        f"{prefix}.view_as_float": one(0),
        f"{prefix}.quant_scale": one(0),
        f"{prefix}.quant_zero": one(0),
        f"{prefix}.channel_wise": one(1),
        f"{prefix}.optimize": one(1),
        f"{prefix}.round_zero": one(1),
        f"{prefix}.offload_meta": one(0),
        f"{prefix}.encoded_state_dict": one(1),
        f"{prefix}.stores_quant_config": one(1),
    }


def write_synthetic(folder: Path, layers: int, seed: int = 0) -> Path:
    """A 7B-shaped HQQ safetensors folder: one shard per decoder layer (written one at a time) + embeddings shard."""
    config = {**LLAMA_7B, "num_hidden_layers": layers}
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    shards = layers + 1
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        if index < layers:
            part: dict[str, torch.Tensor] = {}
            for tag, shape in LINEARS.items():
                part.update(hqq_linear_tensors(f"model.layers.{index}.{tag}", *shape(config), generator))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                part[f"model.layers.{index}.{norm}.weight"] = torch.ones(config["hidden_size"], dtype=torch.float16)
        else:
            vocab, hidden = config["vocab_size"], config["hidden_size"]
            part = {
                "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=generator) * 0.02).half(),
                "lm_head.weight": (torch.randn(vocab, hidden, generator=generator) * 0.02).half(),
                "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
            }
        save_file(part, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({key: name for key in part})
        del part
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    hf_config = {
        **config,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "quantization_config": {
            "quant_method": "hqq",
            "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64, "axis": 1}},
            "skip_modules": ["lm_head"],
        },
    }
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure_convert(source: Path, out: Path, extra: list[str]) -> dict:
    """Run the CLI convert in a child process; its peak RSS (ru_maxrss of children, KiB on Linux) and wall time."""
    command = [sys.executable, "-m", "hqexport.cli", "convert", str(source), "-o", str(out), "--json", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        peak_anon_kib = 0
        while child.poll() is None:
            peak_anon_kib = max(peak_anon_kib, status_kib("RssAnon", child.pid))
            time.sleep(0.1)
        stdout.seek(0), stderr.seek(0)
        result = subprocess.CompletedProcess(command, child.returncode, stdout.read(), stderr.read())
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        raise SystemExit(f"convert failed ({result.returncode}):\n{result.stderr[-3000:]}")
    if peak_kib <= before:
        print("warning: an earlier child had a higher peak; the figure below is that earlier peak", file=sys.stderr)
    summary = json.loads(result.stdout)
    return {
        "command": " ".join(command),
        "wall_s": round(seconds, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "peak_anonymous_gib": round(peak_anon_kib / 2**20, 2),
        "source_gib": round(folder_bytes(source) / 2**30, 2),
        "onnx_gib": round(summary["onnx_bytes"] / 2**30, 2),
        "packed_gib": round(summary["packed_bytes"] / 2**30, 2),
        "fp_gib": round(summary["fp_bytes"] / 2**30, 2),
        "convert_seconds": summary["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["smollm2", "synthetic"])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the synthetic model (7B: 32)")
    parser.add_argument("--workdir", type=Path, help="where the temporary checkpoint and output go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (prints its path)")
    parser.add_argument("convert_args", nargs="*", help="extra convert options after --, e.g. -- --dtype fp16")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hqexport-memory-", dir=args.workdir))
    try:
        if args.model == "smollm2":
            if not (SMOLLM2 / "qmodel.pt").is_file():
                raise SystemExit(f"{SMOLLM2} not found; build it with `python -m tests.smollm2`")
            source = SMOLLM2
        else:
            started = time.perf_counter()
            source = write_synthetic(work / "source", args.layers)
            print(f"wrote {source} ({folder_bytes(source) / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        report = {"model": args.model, "layers": args.layers if args.model == "synthetic" else None}
        report.update(measure_convert(source, work / "onnx", args.convert_args))
        print(json.dumps(report, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
