"""validation: prove that an exported folder computes what its HQQ source computes.

    from hqexport.validation import validate
    report = validate(Path("out"))          # reference = the source folder recorded in out/hqexport.json
    report.passed, report.to_json()

The reference is rebuilt from the source checkpoint with transformers + hqq's HQQLinear (validation/reference.py),
never with hqexport's own readers or export modules. docs/validate.md describes every check and threshold.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hqexport.errors import HQExportError
from hqexport.files import MANIFEST_FILE
from hqexport.ops.schema import DOMAIN
from hqexport.sample import corpus_text
from hqexport.validation.adapters import adapt_reference, check_adapter
from hqexport.validation.checks import PERPLEXITY_TOKENS, Context, check_blocks, check_generation, check_logits, check_perplexity, check_weights
from hqexport.validation.exported import open_exported, reference_source, selected_adapters
from hqexport.validation.onnx_session import OnnxDecoder, providers_for
from hqexport.validation.reference import load_reference
from hqexport.validation.result import CheckResult, Report
from hqexport.validation.text import load_tokenizer
from hqexport.validation.thresholds import LOSSY_PERPLEXITY_RELATIVE, LOSSY_TOP1_AGREEMENT, thresholds_for
from hqexport.validation.torch_session import TorchDecoder

__all__ = ["CheckResult", "DEFAULT_PROMPTS", "Report", "read_prompts", "validate"]

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]


def read_prompts(path: Path | None) -> list[str] | None:
    """Non-empty lines of a prompts file (None when no file is given)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise HQExportError("prompts file not found", path)
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise HQExportError("prompts file is not UTF-8 text", path) from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise HQExportError("prompts file has no prompts (one per line)", path)
    return prompts


def _stderr_progress(message: str) -> None:
    print(f"validate: {message}", file=sys.stderr, flush=True)


def validate(
    out: str | Path,
    *,
    reference: Path | None = None,
    provider: str = "cpu",
    prompts: list[str] | None = None,
    tokens: int = 16,
    adapter: str | None = None,
    progress: Callable[[str], None] | None = _stderr_progress,
) -> Report:
    """Run every check on the exported folder `out` and return the Report (never raises for a failed check).

    HQExportError for bad input: missing folder or manifest, no usable reference source, unknown adapter,
    unknown provider, unsafe external data.
    """
    say = progress or (lambda _message: None)
    if tokens < 1:
        raise HQExportError(f"--tokens must be at least 1, not {tokens}")
    exported = open_exported(Path(out))
    adapters = selected_adapters(exported, adapter)
    dtype = exported.dtype
    if dtype not in ("fp32", "fp16"):
        raise HQExportError(f"manifest model dtype {dtype!r} is not fp32 or fp16", exported.folder / MANIFEST_FILE)
    limits = thresholds_for(dtype, provider)
    providers_for(provider)
    source = reference_source(exported, reference)
    say(f"rebuilding the reference from {source}")
    ref = load_reference(source)
    notes = adapt_reference(ref, exported.folder, exported.adapters)
    for note in notes:
        say(note)
    say("opening the ONNX model")
    onnx_model = OnnxDecoder(exported.folder, provider)
    tokenizer = load_tokenizer(exported.folder, source, ref.model.config.vocab_size)
    prompt_texts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    prompt_ids = [tokenizer.encode(text) for text in prompt_texts]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise HQExportError("a prompt encodes to no tokens; remove empty prompts")
    config = ref.model.config
    max_positions = int(getattr(config, "max_position_embeddings", PERPLEXITY_TOKENS) or PERPLEXITY_TOKENS)
    corpus = tokenizer.encode(corpus_text())[: min(PERPLEXITY_TOKENS, max_positions)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ctx = Context(
        exported=exported,
        reference=ref,
        torch_model=TorchDecoder(ref),
        onnx_model=onnx_model,
        thresholds=limits,
        provider=provider,
        prompts=prompt_texts,
        prompt_ids=prompt_ids,
        tokens=tokens,
        corpus_ids=corpus,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        decode_text=tokenizer.decode,
        progress=say,
        lossy=list(exported.manifest.model.lossy),
    )
    kernels = onnx_model.kernels
    if any(entry.op.startswith(f"{DOMAIN}.") for entry in exported.layers.values()):
        notes.append(f"hqexport ops ran on the compiled kernels {kernels}" if kernels else "hqexport ops ran as their ONNX function body")
    if ctx.lossy:
        notes.append(
            f"lossy export ({', '.join(ctx.lossy)}): not HQQ's exact result, so validate measures the loss instead of "
            f"requiring exactness: top-1 agreement >= {LOSSY_TOP1_AGREEMENT:.0%}, perplexity within "
            f"{LOSSY_PERPLEXITY_RELATIVE:.0%}; per-layer and generation figures are reported, not judged"
        )
    report = Report(str(exported.folder), str(source), provider, dtype, notes=notes)
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("weights", lambda: check_weights(ctx)),
        ("per-layer", lambda: check_blocks(ctx)),
        ("logits", lambda: check_logits(ctx)),
        ("generation", lambda: check_generation(ctx)),
        ("perplexity", lambda: check_perplexity(ctx)),
    ]
    checks += [(f"adapter:{name}", lambda name=name: check_adapter(ctx, name)) for name in adapters]
    for name, run in checks:
        report.checks.append(_guarded(name, run))
    return report


def _guarded(name: str, run: Callable[[], CheckResult]) -> CheckResult:
    """A check that crashes on the ONNX side (wrong shapes, a runtime error) fails; it does not abort the rest."""
    try:
        return run()
    except HQExportError:
        raise
    except Exception as error:  # any crash while comparing is a failed check, reported by name
        return CheckResult(name, False, {"error": f"{type(error).__name__}: {error}"}, {}, f"could not run: {type(error).__name__}: {error}")
