"""Typed results: one CheckResult per check, gathered in a Report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckResult:
    """One check's verdict with every figure it measured and the threshold it was held to.

    passed is None when the check could not be run on this export (the message says why); that is shown as
    NOT CHECKED and does not fail the report.
    """

    name: str
    passed: bool | None
    figures: dict[str, Any]
    threshold: dict[str, Any]
    message: str

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "NOT CHECKED"}[self.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "passed": self.passed,
            "message": self.message,
            "figures": self.figures,
            "threshold": self.threshold,
        }


@dataclass
class Report:
    folder: str
    reference: str
    provider: str
    dtype: str
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the reference and runtime were (adapters, kernels)

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [check for check in self.checks if check.passed is False]

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "reference": self.reference,
            "provider": self.provider,
            "dtype": self.dtype,
            "passed": self.passed,
            "notes": self.notes,
            "checks": [check.to_json() for check in self.checks],
        }
