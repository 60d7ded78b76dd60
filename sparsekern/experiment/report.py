"""Summary table and plots of a run's result rows (sparsekern.experiment.store.COLUMNS).

A "variant" is one curve: model x method x block x training; its points are the target
sparsities, each the mean over seeds, with the standard deviation as the spread.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from sparsekern.experiment.store import atomic_write

# Robustness metrics of the table and plot, in display order: (attack, metric, norm, label).
_ROBUST = [("deepfool", "rho", "L2", "rho_2"), ("deepfool", "rho", "Linf", "rho_inf"),
           ("cw", "mean_l2", "L2", "C&W L2")]


def _variant(r: dict) -> tuple:
    return (r["model"], r["method"], r["block"], r["training"])


def _variant_order(v: tuple) -> tuple:
    """Sort key: blocks by size ("4x4" before "16x16"), not as text."""
    model, method, block, training = v
    return (model, method, tuple(int(b) for b in block.split("x")), training)


def _variants(rows: list[dict]) -> list[tuple]:
    return sorted({_variant(r) for r in rows}, key=_variant_order)


def _variant_name(v: tuple, with_model: bool = True) -> str:
    model, method, block, training = v
    parts = ([model] if with_model else []) + [method, block] + \
        ([training] if training != "natural" else [])
    return " ".join(parts)


def series(rows: list[dict]) -> dict:
    """{(variant, attack, metric, norm, eps, layer): {sparsity: [value per seed]}}."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[(_variant(r), r["attack"], r["metric"], r["norm"], r["eps"], r["layer"])][
            r["sparsity"]].append(r["value"])
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _fmt(values: list[float] | None, percent: bool) -> str:
    if not values:
        return "-"
    mean, std = _stats(values)
    if math.isnan(mean):
        return "nan"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{scale * mean:.{digits}f}"
    if len(values) > 1:
        text += f"±{scale * std:.{digits}f}"
    return text


def collapsed(s: dict, v: tuple) -> set[float]:
    """Sparsities at which variant v's mean clean accuracy is below half the one at its lowest
    sparsity: the classifier has collapsed (e.g. to one class) and its attack numbers (large
    rho, robust accuracy = that class's share) say nothing about robustness."""
    clean = {sp: _stats(vals)[0] for sp, vals in s.get((v, "clean", "accuracy", "", None, ""),
                                                      {}).items()}
    if not clean:
        return set()
    ref = clean[min(clean)]
    return {sp for sp, acc in clean.items() if acc < 0.5 * ref}


def summary_table(rows: list[dict]) -> str:
    """One block per variant: a line per sparsity with achieved weight sparsity, clean and
    robust accuracy (%), rho_2 / rho_inf / C&W L2 (mean±std over seeds), then where each
    robustness curve peaks (collapsed models, marked *, left out)."""
    s = series(rows)
    variants = _variants(rows)
    out = []
    any_collapsed = False
    for v in variants:
        keys = sorted({(k[1], k[2], k[3], k[4]) for k in s if k[0] == v and k[1] != "none"},
                      key=lambda k: (["clean", "fgsm", "pgd", "deepfool", "cw"].index(k[0]),
                                     k[3] or 0))
        cols = [("weights", ("none", "weight_sparsity", "", None), True, "total")]
        for attack, metric, norm, eps in keys:
            if attack == "clean":
                cols.append(("clean", (attack, metric, norm, eps), True, ""))
            elif attack in ("fgsm", "pgd"):
                cols.append((f"{attack.upper()}@{eps:g}", (attack, metric, norm, eps), True, ""))
        for attack, metric, norm, label in _ROBUST:
            if (attack, metric, norm, None) in keys:
                cols.append((label, (attack, metric, norm, None), False, ""))
        sparsities = sorted({r["sparsity"] for r in rows if _variant(r) == v})
        seeds = sorted({r["seed"] for r in rows if _variant(r) == v})
        broken = collapsed(s, v)
        any_collapsed |= bool(broken)
        table = [["sparsity"] + [c[0] for c in cols]]
        for sp in sparsities:
            line = [f"{'*' if sp in broken else ''}{100 * sp:g}%"]
            for _, (a, m, n, e), pct, layer in cols:
                line.append(_fmt(s.get((v, a, m, n, e, layer), {}).get(sp), pct))
            table.append(line)
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        out.append(f"{_variant_name(v)}  ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; "
                   f"accuracies and weight sparsity in %)")
        for row in table:
            out.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        peaks = []
        for label, (a, m, n, e), pct, layer in cols:
            if a in ("none", "clean"):
                continue
            points = {sp: _stats(vals)[0] for sp, vals in s.get((v, a, m, n, e, layer),
                                                                 {}).items() if sp not in broken}
            points = {sp: val for sp, val in points.items() if not math.isnan(val)}
            if len(points) > 1:
                best = max(points, key=lambda sp: (points[sp], -sp))
                shown = f"{100 * points[best]:.1f}%" if pct else f"{points[best]:.3f}"
                peaks.append(f"{label} {shown} at {100 * best:g}%")
        if peaks:
            out.append("  peak: " + "; ".join(peaks))
        out.append("")
    if any_collapsed:
        out.append("* collapsed: clean accuracy below half the lowest-sparsity one; its attack "
                   "numbers are not robustness (left out of the peaks)")
    return "\n".join(out).rstrip() + "\n"


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """plots/<model>.png per model: clean accuracy, FGSM and PGD accuracy per eps, rho_2,
    rho_inf, C&W L2 and per-layer ReLU activation sparsity against target sparsity, one colour
    per variant, mean over seeds with a +-std band. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(rows)
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        variants = _variants(mrows)
        sparsities = sorted({r["sparsity"] for r in mrows})
        pos = {sp: i for i, sp in enumerate(sparsities)}
        n_seeds = len({r["seed"] for r in mrows})
        panels = [("clean accuracy", [("clean", "accuracy", "", None, "")], "accuracy")]
        for attack, title in (("fgsm", "FGSM (Linf) accuracy"), ("pgd", "PGD (Linf) accuracy")):
            eps = sorted({r["eps"] for r in mrows if r["attack"] == attack})
            if eps:
                panels.append((title, [(attack, "accuracy", "Linf", e, "") for e in eps],
                               "accuracy"))
        for attack, metric, norm, label in _ROBUST:
            if any(r["attack"] == attack and r["norm"] == norm for r in mrows):
                title = {"rho_2": "DeepFool rho_2 = mean ||r||_2 / ||x||_2",
                         "rho_inf": "DeepFool rho_inf = mean ||r||_inf / ||x||_inf",
                         "C&W L2": "C&W mean L2 of successful examples"}[label]
                panels.append((title, [(attack, metric, norm, None, "")], label))
        layers = [r["layer"] for r in mrows if r["metric"] == "activation_sparsity"]
        layers = list(dict.fromkeys(layers))
        if layers:
            panels.append(("ReLU activation sparsity (eval images)",
                           [("none", "activation_sparsity", "", None, l) for l in layers],
                           "fraction of zeros"))
        cols = 3
        nrows = -(-len(panels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = ["-", "--", ":", "-."]
        markers = ["o", "s", "^", "D", "v", "x"]
        for ax, (title, curves, ylabel) in zip(axes.flat, panels):
            for vi, v in enumerate(variants):
                for ci, (a, m, n, e, layer) in enumerate(curves):
                    data = s.get((v, a, m, n, e, layer))
                    if not data:
                        continue
                    xs = sorted(data)
                    st = [_stats(data[x]) for x in xs]
                    mean = [p[0] for p in st]
                    std = [p[1] for p in st]
                    xp = [pos[x] for x in xs]
                    label = _variant_name(v, with_model=False) if len(variants) > 1 else ""
                    if e is not None:
                        label = f"{label} eps={e:g}".strip()
                    elif layer:
                        label = f"{label} {layer}".strip()
                    color = colors[(vi if len(variants) > 1 else ci) % len(colors)]
                    ax.plot(xp, mean, styles[ci % len(styles)] if len(variants) > 1 else "-",
                            marker=markers[ci % len(markers)], color=color, label=label or None,
                            markersize=4)
                    broken = [(p_, m_) for x, p_, m_ in zip(xs, xp, mean)
                              if x in collapsed(s, v)]
                    if broken:
                        ax.scatter(*zip(*broken), marker="x", s=60, color="red", zorder=3)
                    if n_seeds > 1:
                        ax.fill_between(xp, [a_ - b_ for a_, b_ in zip(mean, std)],
                                        [a_ + b_ for a_, b_ in zip(mean, std)], color=color,
                                        alpha=0.2, linewidth=0)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_xticks(range(len(sparsities)), [f"{100 * sp:g}" for sp in sparsities],
                          fontsize=8)
            ax.set_xlabel("target weight sparsity (%)", fontsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed"
        note = "; red x: collapsed classifier (clean accuracy < half)" if any(
            collapsed(s, v) for v in variants) else ""
        fig.suptitle(f"{model}: robustness vs sparsity ({spread}{note})", fontsize=11)
        fig.tight_layout()
        path = Path(out_dir) / "plots" / f"{model}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_summary(rows: list[dict], out_dir: Path) -> str:
    """summary.txt of the run (atomically); returns the table."""
    text = summary_table(rows)
    atomic_write(Path(out_dir) / "summary.txt", text)
    return text
