"""Numeric comparisons of a reference array with the ONNX one (all in float64)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    max_abs: float  # max |ref - got|
    max_ref: float  # max |ref|
    cosine: float  # cosine similarity of the flattened arrays

    @property
    def relative(self) -> float:
        """max |Δ| / max |ref|: the error in units of the tensor's own scale."""
        return self.max_abs / self.max_ref if self.max_ref > 0 else float(self.max_abs > 0)


def difference(ref: np.ndarray, got: np.ndarray) -> Difference:
    if ref.shape != got.shape:
        raise ValueError(f"shape {list(got.shape)} differs from the reference's {list(ref.shape)}")
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    if not np.all(np.isfinite(b)):
        return Difference(float("inf"), float(np.max(np.abs(a), initial=0.0)), float("nan"))
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
    return Difference(float(np.max(np.abs(a - b), initial=0.0)), float(np.max(np.abs(a), initial=0.0)), cosine)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Per position: the reference's top-1 logit minus its runner-up ([..., vocab] -> [...])."""
    part = np.partition(np.asarray(logits, dtype=np.float64), -2, axis=-1)
    return part[..., -1] - part[..., -2]


@dataclass(frozen=True)
class Top1:
    agree: int
    total: int
    decisive_mismatches: int  # disagreements where the reference's top-2 margin exceeded the tie tolerance

    @property
    def fraction(self) -> float:
        return self.agree / self.total if self.total else 1.0


def top1_agreement(ref: np.ndarray, got: np.ndarray, tie_tolerance: float) -> Top1:
    """Arg-max agreement over positions; a mismatch at a near-tie (margin <= tie_tolerance) is not decisive."""
    ref_top = np.argmax(ref, axis=-1).ravel()
    got_top = np.argmax(got, axis=-1).ravel()
    margins = top2_margin(ref).ravel()
    mismatch = ref_top != got_top
    return Top1(int((~mismatch).sum()), int(mismatch.size), int((mismatch & (margins > tie_tolerance)).sum()))


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean NLL of `targets` [n] under `logits` [n, vocab], with a stable log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].mean())
