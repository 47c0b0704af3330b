"""Writing results: atomic JSON (never half-written) and a little formatting."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

from .paths import atomic_file


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_default, allow_nan=True) + "\n")


def environment() -> dict:
    """What produced a result: host, software versions and the git commit."""
    import numpy
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    import os

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": numpy.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "commit": commit or os.environ.get("LLMFLASH_COMMIT", ""),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically (tight layout) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys) as CSV, atomically."""
    import csv

    with atomic_file(Path(path)) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
