"""Gradual magnitude pruning with the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to
prune", arXiv 1710.01878)."""
from __future__ import annotations

from torch import nn

from sparsekern.prune.magnitude import (NORMS, SCOPES, _check_choice, apply_masks,
                                        check_block_size, check_sparsity, compute_masks)


def _check_schedule(begin_step, end_step, frequency):
    if int(frequency) != frequency or frequency < 1:
        raise ValueError(f"frequency must be a positive integer, got {frequency!r}")
    if end_step < begin_step:
        raise ValueError(f"end_step ({end_step}) must be >= begin_step ({begin_step})")


def cubic_sparsity(step: int, final_sparsity: float, begin_step: int, end_step: int,
                   initial_sparsity: float = 0.0, frequency: int = 1) -> float:
    """Target sparsity at `step`:

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,   n * dt = end_step - begin_step

    where t is `step` rounded down to the last pruning step t0 + k * dt (dt = frequency), so
    the value changes only every `frequency` steps. Before begin_step: initial_sparsity; at and
    after end_step: final_sparsity (also when end_step - begin_step is not a multiple of dt).
    """
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    s_i = check_sparsity(initial_sparsity, "initial_sparsity")
    _check_schedule(begin_step, end_step, frequency)
    if step < begin_step:
        return s_i
    if step >= end_step:
        return s_f
    t = begin_step + ((step - begin_step) // frequency) * frequency
    return s_f + (s_i - s_f) * (1.0 - (t - begin_step) / (end_step - begin_step)) ** 3


class GradualPruner:
    """Recomputes magnitude masks along the cubic schedule.

    Call .step(global_step) once per training step (e.g. before the forward); at steps where
    the scheduled sparsity changes (every `frequency` steps from begin_step, and at end_step)
    masks are recomputed with compute_masks(...) and installed/updated in place with
    apply_masks (torch.nn.utils.prune reparametrization, so sparsekern.sparsify converts the
    model afterwards). Arguments as in cubic_sparsity and compute_masks.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, begin_step: int, end_step: int,
                 frequency: int = 1, block_size=(1, 1), norm: str = "l1", scope: str = "layer",
                 layers=None, initial_sparsity: float = 0.0):
        self.model = model
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        _check_schedule(begin_step, end_step, frequency)
        if not callable(block_size):
            check_block_size(block_size)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, int(frequency)
        self.block_size = block_size
        self.norm = _check_choice(norm, NORMS, "norm")
        self.scope = _check_choice(scope, SCOPES, "scope")
        self.layers = layers
        self.sparsity: float | None = None  # last sparsity applied; None before the first

    def target(self, global_step: int) -> float:
        return cubic_sparsity(global_step, self.final_sparsity, self.begin_step, self.end_step,
                              self.initial_sparsity, self.frequency)

    def step(self, global_step: int) -> bool:
        """Updates the masks if the schedule says so; returns whether it did."""
        if global_step < self.begin_step:
            return False
        target = self.target(global_step)
        if self.sparsity is not None and target == self.sparsity:
            return False
        apply_masks(self.model, compute_masks(self.model, target, self.block_size, self.norm,
                                              self.scope, self.layers))
        self.sparsity = target
        return True
