"""Runs an experiment grid into a run directory, resumably.

    out/config.yaml        the resolved config
    out/env.json           versions, git commit, device, CPU ISA (of the latest invocation)
    out/results.jsonl/csv  the result rows (sparsekern.experiment.store.COLUMNS)
    out/summary.txt        the table printed at the end
    out/plots/<model>.png  robustness / accuracy / activation sparsity vs sparsity
    out/checkpoints/       dense-<model>-seed<S>.pt (trained once, reused by every cell of
                           that model and seed) and cells/<cell>.pt (final sparse state_dicts)

A cell is model x method x block x sparsity x seed: dense checkpoint -> prune -> fine-tune ->
sparsify -> evaluate. Finished cells are skipped when the same command runs again, so an
interrupted run resumes where it stopped. The grid (grid.*) may change between invocations
(new cells are added); every other key must match the run's config.yaml.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm import tqdm

from sparsekern.attacks import accuracy
from sparsekern.experiment import pipeline
from sparsekern.experiment.config import ConfigError, ExperimentConfig, to_dict
from sparsekern.experiment.report import plot, write_summary
from sparsekern.experiment.store import (ResultStore, atomic_write, block_name, cell_id,
                                         environment, load_checkpoint, save_checkpoint)

# config sections that may differ when resuming a run directory: the grid (cells are added) and
# how many CPU threads run it
RESUMABLE_KEYS = ("grid", "threads")


def default_out_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / cfg.name


def check_resume(cfg: ExperimentConfig, out_dir: Path) -> bool:
    """True if out_dir already holds a run; ConfigError if its config.yaml differs from cfg
    outside RESUMABLE_KEYS (the results would mix two experiments)."""
    path = Path(out_dir) / "config.yaml"
    if not path.exists():
        return False
    old = yaml.safe_load(path.read_text()) or {}
    new = to_dict(cfg)
    diffs = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if not prefix and k in RESUMABLE_KEYS:
                    continue
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix[:-1]}: {a!r} -> {b!r}")

    walk(old, new, "")
    if diffs:
        raise ConfigError(f"{out_dir} holds a run with another config ({'; '.join(diffs)}); "
                          f"resume it with the same settings or choose another --out")
    return True


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Runner:
    """One invocation over a run directory; see the module docstring. `train_dense` and
    `run_cell` are the two expensive steps (tests count their calls)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.cfg, self.out = cfg, Path(out_dir)
        self.progress, self.log = progress, log
        self.device = torch.device(cfg.device)
        self.data: pipeline.Data | None = None
        self.store: ResultStore | None = None
        self.bar: tqdm | None = None

    # ---- helpers ------------------------------------------------------------------------------
    def cells(self) -> list[tuple[str, str, tuple[int, int], float, int]]:
        """The cells in run order (model, then seed, method, block, sparsity): the cells of
        one dense model run one after the other."""
        g = self.cfg.grid
        return [(m, meth, tuple(b), sp, seed) for m in g.models for seed in g.seeds
                for meth in g.methods for b in g.block_sizes for sp in g.sparsities]

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def _write(self, text: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            self.log(text)

    def _training(self) -> str:
        return "pgd-at" if self.cfg.finetune.adversarial.enabled else "natural"

    # ---- dense models ------------------------------------------------------------------------
    def dense_path(self, model: str, seed: int) -> Path:
        return self.out / "checkpoints" / f"dense-{model}-seed{seed}.pt"

    def dense_digest(self, model: str, seed: int) -> str:
        c = self.cfg
        return _digest([model, seed, to_dict(c.data), to_dict(c.train)])

    def train_dense(self, model_name: str, seed: int) -> tuple[dict, dict]:
        """Trains the dense model of (model, seed); returns (state_dict, meta)."""
        model = pipeline.build(model_name, self.data, seed, self.device)
        torch.manual_seed(seed)
        t = time.perf_counter()
        losses = pipeline.fit(model, self.data, self.cfg.train, seed,
                              status=lambda s: self._say(f"dense {model_name} seed {seed}: {s}"))
        acc = accuracy(model, self.data.x_test, self.data.y_test, self.cfg.eval.batch_size)
        meta = {"model": model_name, "seed": seed, "digest": self.dense_digest(model_name, seed),
                "losses": losses, "clean_accuracy": acc, "seconds": time.perf_counter() - t}
        return model.state_dict(), meta

    def dense_state(self, model_name: str, seed: int) -> dict:
        """The dense state_dict of (model, seed): from its checkpoint, else trained and saved."""
        path = self.dense_path(model_name, seed)
        if path.exists():
            state, meta = load_checkpoint(path, self.device)
            if meta.get("digest") == self.dense_digest(model_name, seed):
                return state
            self._write(f"{path.name} was trained with other settings; retraining")
        state, meta = self.train_dense(model_name, seed)
        save_checkpoint(path, state, meta)
        self._write(f"dense {model_name} seed {seed}: clean accuracy "
                    f"{100 * meta['clean_accuracy']:.2f}% after {self.cfg.train.epochs} epochs "
                    f"({meta['seconds']:.0f} s)")
        return state

    # ---- cells -------------------------------------------------------------------------------
    def run_cell(self, model_name: str, method: str, block: tuple[int, int], sparsity: float,
                 seed: int, dense_state: dict) -> tuple[list[dict], dict]:
        """prune -> fine-tune -> sparsify -> evaluate; returns (rows, final state_dict)."""
        c = self.cfg
        tag = f"{model_name} {method} {block_name(block)} {100 * sparsity:g}% seed {seed}"
        model = pipeline.build(model_name, self.data, seed, self.device)
        model.load_state_dict(dense_state)
        steps = c.finetune.epochs * pipeline.steps_per_epoch(self.data.x_train.shape[0],
                                                             c.finetune.batch_size)
        pruning = pipeline.Pruning(model, method, sparsity, block, c.prune, steps, seed)
        notes = []
        if c.finetune.sparse_weights:
            notes += pruning.sparsify()
        pipeline.finetune(model, self.data, c.finetune, pruning, seed,
                          status=lambda s: self._say(f"{tag}: fine-tune {s}"))
        pruning.finish()
        if not c.finetune.sparse_weights:
            notes += pruning.sparsify()
        for note in notes:
            self._write(f"{tag}: layer left masked-dense, {note}")
        rows = pipeline.evaluate(model, self.data, c.eval, seed,
                                 status=lambda s: self._say(f"{tag}: {s}"))
        return rows, model.state_dict()

    def _label(self, rows: list[dict], model: str, method: str, block, sparsity: float,
               seed: int) -> list[dict]:
        """Adds the cell columns to a cell's measurement rows."""
        total = next(r["value"] for r in rows
                     if r["metric"] == "weight_sparsity" and r["layer"] == "total")
        clean = next(r["value"] for r in rows if r["attack"] == "clean")
        cid = cell_id(model, method, block_name(block), sparsity, seed)
        key = {"experiment": self.cfg.name, "dataset": self.cfg.data.dataset, "model": model,
               "method": method, "block": block_name(block), "sparsity": sparsity,
               "seed": seed, "training": self._training()}
        return [{**key, **r, "weight_sparsity": total, "clean_accuracy": clean,
                 "cell_id": cid} for r in rows]

    def _same_dense_cell(self, model: str, sparsity: float, seed: int) -> list[dict] | None:
        """A finished 0%-cell of the same model and seed under another method / block: the
        pipeline of a 0% cell does not depend on either, so its rows are reused."""
        if sparsity != 0.0:
            return None
        for rows in self.store.cells.values():
            r = rows[0]
            if (r["model"], r["sparsity"], r["seed"]) == (model, 0.0, seed):
                return rows
        return None

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        """Runs every unfinished cell, then writes the CSV, plots and summary. Returns
        {"rows", "plots", "summary", "ran", "skipped"}."""
        c = self.cfg
        resumed = check_resume(c, self.out)
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        self.store = ResultStore(self.out)
        if self.store.dropped:
            self.log(f"{self.store.jsonl}: dropped {self.store.dropped} row(s) of an "
                     f"interrupted cell; it is redone")
        ids = {cell_id(m, meth, block_name(b), sp, s): (m, meth, b, sp, s)
               for m, meth, b, sp, s in self.cells()}
        todo = [cid for cid in ids if cid not in self.store.cells]
        done = len(ids) - len(todo)
        if todo:  # before writing anything: a missing dataset leaves no run directory
            self.data = pipeline.load_data(c, self.device)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "config.yaml", yaml.safe_dump(to_dict(c), sort_keys=False))
        env = environment(str(self.device))
        env.update({"resumed": resumed, "cells_total": len(ids), "cells_done_before": done,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        atomic_write(self.out / "env.json", json.dumps(env, indent=2) + "\n")
        if done:
            self.log(f"resuming {self.out}: {done} of {len(ids)} cells already done (delete "
                     f"the directory or choose another --out for a fresh run)")
        ran = 0
        if todo:
            self.log(f"{c.name}: {len(todo)} cell(s) to run on {self.data.name} "
                     f"({self.data.x_train.shape[0]} train / {self.data.x_test.shape[0]} test, "
                     f"attacks on {self.data.x_eval.shape[0]}) -> {self.out}")
            self.bar = tqdm(total=len(ids), initial=done, unit="cell",
                            disable=None if self.progress else True,  # None: off unless a TTY
                            dynamic_ncols=True)
            try:
                dense: dict[tuple[str, int], dict] = {}
                for cid in todo:
                    model, method, block, sparsity, seed = ids[cid]
                    t = time.perf_counter()
                    reused = self._same_dense_cell(model, sparsity, seed)
                    if reused is not None:
                        rows = [{k: v for k, v in r.items()
                                 if k not in ("cell_id", "cell_rows")} for r in reused]
                        for r in rows:
                            r["method"], r["block"] = method, block_name(block)
                            r["cell_id"] = cid
                    else:
                        if (model, seed) not in dense:
                            dense.clear()  # keep one dense model in memory
                            dense[(model, seed)] = self.dense_state(model, seed)
                        raw, state = self.run_cell(model, method, block, sparsity, seed,
                                                   dense[(model, seed)])
                        rows = self._label(raw, model, method, block, sparsity, seed)
                        if c.output.save_models:
                            save_checkpoint(self.out / "checkpoints" / "cells" /
                                            f"{cid.replace('|', '_')}.pt", state,
                                            {"cell_id": cid, "config": to_dict(c)})
                    self.store.append_cell(rows)
                    self.store.write_csv()
                    ran += 1
                    self._write(self._cell_line(rows, time.perf_counter() - t,
                                                reused is not None))
                    self.bar.update(1)
            finally:
                self.bar.close()
                self.bar = None
        self.store.write_csv()
        rows = [r for r in self.store.rows() if r["cell_id"] in ids]
        plots = plot(rows, self.out) if c.output.plots and rows else []
        summary = write_summary(rows, self.out) if rows else ""
        return {"rows": rows, "plots": plots, "summary": summary, "ran": ran, "skipped": done}

    @staticmethod
    def _cell_line(rows: list[dict], seconds: float, reused: bool) -> str:
        r0 = rows[0]
        parts = [f"{r0['model']} {r0['method']} {r0['block']} {100 * r0['sparsity']:g}% "
                 f"seed {r0['seed']}: weights {100 * r0['weight_sparsity']:.1f}% zero, "
                 f"clean {100 * r0['clean_accuracy']:.1f}%"]
        for r in rows:
            if r["attack"] in ("fgsm", "pgd"):
                parts.append(f"{r['attack']}@{r['eps']:g} {100 * r['value']:.1f}%")
            elif r["attack"] == "deepfool":
                parts.append(f"rho_{2 if r['norm'] == 'L2' else 'inf'} {r['value']:.3f}")
            elif r["attack"] == "cw":
                parts.append(f"cw {r['value']:.3f}")
        return ", ".join(parts) + (" (reused the 0% cell)" if reused else f" ({seconds:.0f} s)")


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Runs cfg into out_dir (default runs/<cfg.name>); see Runner.run."""
    return Runner(cfg, Path(out_dir) if out_dir is not None else default_out_dir(cfg),
                  progress=progress, log=log).run()
