"""The robustness-vs-sparsity pipeline of Guo et al. (NeurIPS 2018) as resumable experiments.

    python -m sparsekern experiment --config quick                  # what `make run` runs
    python -m sparsekern experiment --config guo2018-mnist --set grid.seeds=[0] --out runs/x

A config (config.ExperimentConfig; presets in presets/*.yaml) names a grid of cells, model x
method x block x sparsity x seed. Per seed the dense model is trained once (checkpointed); each
cell prunes it (magnitude, unstructured or block-wise, or DNS), fine-tunes (optionally with PGD
adversarial training), converts it to truly sparse modules (sparsekern.sparsify) and measures
clean accuracy, FGSM / PGD robust accuracy, DeepFool rho_2 / rho_inf, optionally C&W L2, and
per-layer weight and ReLU activation sparsity. Files of a run: see runner; columns of the
results: store.COLUMNS.

    from sparsekern.experiment import load_config, run_experiment
    result = run_experiment(load_config("quick", ["grid.sparsities=[0, 0.9]"]), "runs/try")
"""
from sparsekern.experiment.config import (ConfigError, ExperimentConfig, load_config,
                                          preset_names, to_dict)
from sparsekern.experiment.runner import Runner, run_experiment
from sparsekern.experiment.store import COLUMNS

__all__ = ["COLUMNS", "ConfigError", "ExperimentConfig", "Runner", "load_config",
           "preset_names", "run_experiment", "to_dict"]
