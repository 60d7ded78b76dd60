"""Files of a run directory, written so that an interruption (kill -9 included) loses nothing
that was finished: atomic replaces for whole files, an fsync'ed append per cell for results.

    results.jsonl   one JSON object per row (COLUMNS), appended cell by cell
    results.csv     the same rows, rewritten (atomically) after every cell
    checkpoints/    torch.save'd dicts of tensors and plain values (load with weights_only=True)

A cell's rows carry its cell_id and cell_rows (how many rows the cell has); on loading, a torn
last line is dropped and so is a cell with fewer rows than it announces, and the file is
rewritten without them, so the runner simply redoes such a cell.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch

# One row = one measurement of one cell (model x method x block x sparsity x seed).
COLUMNS = [
    "experiment",       # config name
    "dataset",          # data.dataset
    "model",            # e.g. lenet-300-100
    "method",           # magnitude | dns
    "block",            # block shape "BMxBK" (output x input features / channels), e.g. "4x4"
    "sparsity",         # target weight sparsity of the pruned layers, fraction in [0, 1)
    "seed",             # seed of the dense model (init, data order) and of its cells
    "training",         # natural | pgd-at (fine-tuning with PGD adversarial training)
    "attack",           # clean | fgsm | pgd | deepfool | cw | none (sparsity rows)
    "norm",             # Linf | L2 (attacks); empty for clean and sparsity rows
    "eps",              # attack radius in input units [0, 1] (fgsm, pgd); empty otherwise
    "metric",           # accuracy | rho | mean_l2 | weight_sparsity | activation_sparsity
    "layer",            # sparsity rows: layer name ("total" for all weights); else empty
    "value",            # the measurement (fractions, not percent)
    "n",                # examples it is measured on (weights, for weight_sparsity)
    "success_rate",     # deepfool / cw: fraction of examples the attack fooled
    "weight_sparsity",  # achieved weight sparsity of the whole model (repeated on each row)
    "clean_accuracy",   # clean test accuracy of the cell (repeated on each row)
    "seconds",          # time this measurement took
    "cell_id",          # model|method|block|sparsity|seed
    "cell_rows",        # number of rows of this cell (completeness check on resume)
]


def cell_id(model: str, method: str, block: str, sparsity: float, seed: int) -> str:
    return f"{model}|{method}|{block}|{sparsity!r}|{seed}"


def block_name(block) -> str:
    return f"{block[0]}x{block[1]}"


# ---- atomic writes -------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Writes path as a whole or not at all: tmp file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, state_dict: dict, meta: dict) -> None:
    """torch.save({'state_dict', 'meta'}) atomically (meta: plain JSON-like values)."""
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                "meta": meta}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: Path, device="cpu") -> tuple[dict, dict]:
    """(state_dict, meta) of a save_checkpoint file, loaded with weights_only=True."""
    obj = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ValueError(f"{path}: not a sparsekern experiment checkpoint")
    return obj["state_dict"], obj.get("meta", {})


# ---- results -------------------------------------------------------------------------------------
class ResultStore:
    """results.jsonl / results.csv of a run directory.

    .cells: {cell_id: [rows]} of the complete cells found on disk (plus those appended since).
    """

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir)
        self.jsonl = self.dir / "results.jsonl"
        self.csv = self.dir / "results.csv"
        self.cells: dict[str, list[dict]] = {}
        self.dropped = 0  # rows of incomplete cells / torn lines discarded on load
        self._load()

    def _load(self) -> None:
        if not self.jsonl.exists():
            return
        raw = self.jsonl.read_bytes()
        lines = raw.split(b"\n")
        rows, bad = [], 0
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "cell_id" not in row:
                    raise ValueError("not a result row")
            except ValueError:
                bad += 1
                if i < len(lines) - 1 and any(l.strip() for l in lines[i + 1:]):
                    warnings.warn(f"{self.jsonl}: line {i + 1} is not a result row; skipped")
                continue  # else: a torn last line, the interrupted cell is redone
            rows.append(row)
        by_cell: dict[str, list[dict]] = {}
        for row in rows:
            by_cell.setdefault(row["cell_id"], []).append(row)
        for cid, cell_rows in by_cell.items():
            if len(cell_rows) == cell_rows[0].get("cell_rows"):
                self.cells[cid] = cell_rows
            else:
                bad += len(cell_rows)
        self.dropped = bad
        if bad or (raw and not raw.endswith(b"\n")):
            self._rewrite()

    def _rewrite(self) -> None:
        atomic_write(self.jsonl, "".join(_jsonl(r) for rows in self.cells.values()
                                         for r in rows))

    def rows(self) -> list[dict]:
        return [r for rows in self.cells.values() for r in rows]

    def append_cell(self, rows: list[dict]) -> None:
        """Appends one complete cell (all rows share a cell_id) in one write, flush + fsync."""
        cid = rows[0]["cell_id"]
        for r in rows:
            r["cell_rows"] = len(rows)
            if r["cell_id"] != cid:
                raise ValueError("append_cell takes the rows of one cell")
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "ab") as f:
            f.write("".join(_jsonl(r) for r in rows).encode())
            f.flush()
            os.fsync(f.fileno())
        self.cells[cid] = rows

    def write_csv(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for r in self.rows():
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
        atomic_write(self.csv, buf.getvalue())


def _jsonl(row: dict) -> str:
    return json.dumps({k: row.get(k) for k in COLUMNS}, allow_nan=True) + "\n"


# ---- environment ---------------------------------------------------------------------------------
def environment(device: str) -> dict:
    """What produced the results: versions, git commit, device, CPU ISA of the kernels."""
    import platform
    import subprocess

    import numpy
    import sparsekern

    ext = sparsekern.ops.native_extension()
    repo = Path(sparsekern.__file__).resolve().parent.parent
    git = {"commit": None, "dirty": None}
    try:
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True,
                                       capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=repo, check=True, capture_output=True, text=True, timeout=10)
        git["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    dev = torch.device(device)
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "sparsekern": sparsekern.__version__,
        "platform": platform.platform(),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "device": device,
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_isa": ext.cpu_isa() if ext is not None else None,
        "native_extension": ext is not None,
        "cuda_compiled": bool(getattr(ext, "cuda_compiled", False)),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
