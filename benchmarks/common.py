"""Shared pieces of the benchmark scripts: timing, memory bandwidth, process memory, results table + JSON."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth_gbs(megabytes: int = 512) -> float:
    """Sustained read bandwidth of this machine (GB/s), from summing a buffer much larger than the caches."""
    buffer = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    seconds = median_seconds(buffer.sum, warmup=1, repeats=5)
    return buffer.nbytes / seconds / 1e9


def status_kib(field: str, pid: int | str = "self") -> int:
    """One memory figure of /proc/PID/status (VmHWM, RssAnon, ...) in KiB; 0 once the process has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine() -> dict:
    import os

    import onnxruntime
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def report(title: str, columns: list[str], rows: list[dict], path: Path, extra: dict) -> None:
    """Print `rows` as a table and write them, with `extra` facts, to `path` as JSON."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    Console().print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **extra, "rows": rows}, indent=2))
    Console().print(f"wrote {path}")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
