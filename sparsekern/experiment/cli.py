"""`sparsekern experiment --config PRESET_OR_YAML [--set key=value ...] [--out DIR]`."""
from __future__ import annotations

import argparse
import sys

import yaml

from sparsekern.experiment.config import ConfigError, load_config, preset_names, to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="PRESET_OR_YAML",
                        help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 "
                             "--set grid.seeds=[0,1] (values are YAML; repeatable)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="run directory (default runs/<name>); running again into the same "
                             "directory resumes, skipping the finished cells")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the number of cells, and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's malloc as it comes (by default a CPU run calls "
                             "sparsekern.retain_freed_cpu_memory: large activations are reused "
                             "instead of faulted in again every pass)")


def main(args: argparse.Namespace) -> int:
    """Runs the experiment of parsed arguments; config errors exit with status 2."""
    from sparsekern.experiment.runner import default_out_dir, run_experiment

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            g = cfg.grid
            n = len(g.models) * len(g.methods) * len(g.block_sizes) * len(g.sparsities) * \
                len(g.seeds)
            print(f"# {n} cells -> {args.out or default_out_dir(cfg)}")
            return 0
        if cfg.device == "cpu" and not args.malloc_defaults:  # this process is ours to tune
            from sparsekern.memory import retain_freed_cpu_memory
            retain_freed_cpu_memory()
        result = run_experiment(cfg, args.out, progress=not args.no_progress)
    except ConfigError as e:
        print(f"sparsekern experiment: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a dataset that is not there
        print(f"sparsekern experiment: {e}", file=sys.stderr)
        return 1
    out = args.out or default_out_dir(cfg)
    print()
    print(result["summary"], end="")
    print(f"ran {result['ran']} cell(s), {result['skipped']} already done; results in {out}/"
          f"results.csv")
    for path in result["plots"]:
        print(f"plot: {path}")
    return 0
