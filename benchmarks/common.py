"""Shared benchmark helpers: timing, machine facts, table printing, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch

from sparsekern.timing import interleaved_medians_ms, median_ms  # noqa: F401  (re-exported)


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    from sparsekern import ops

    ext = ops.native_extension()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": ext.cpu_isa() if ext else "no extension",
        "python": platform.python_version(),
    }


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    cells = [["-" if row.get(key) is None else format(row[key], fmt) for key, _, fmt in columns]
             for row in rows]
    widths = [max([len(h), 9] + [len(r[i]) for r in cells]) for i, (_, h, _) in
              enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def write_json(path: str, info: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
