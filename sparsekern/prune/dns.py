"""Dynamic Network Surgery (Guo, Yao, Chen, NIPS 2016), as specified in PAPER.md.

Per pruned layer, once at the start: mu, sigma = mean and (population) std of |w|; threshold
t = max(mu + c_rate * sigma, 0). At a mask refresh, for every weight (including cut ones):

    |w| <= 0.9 t  -> mask 0 (cut)
    |w| >  1.1 t  -> mask 1 (spliced back)
    otherwise     -> mask unchanged

A refresh of each layer happens at iteration `iter` with probability
(1 + gamma * iter)^(-power) while iter < iter_stop (one independent draw per layer, from the
DNS's own generator). The forward computes with weight_orig * weight_mask; the backward passes
the gradient to ALL of weight_orig unmasked (straight-through), so cut weights keep learning and
can come back.

Parametrization: the layer's `weight` Parameter is renamed `weight_orig`, a `weight_mask`
buffer is added, and a forward pre-hook sets `module.weight = weight_orig * weight_mask` through
an autograd function whose backward is the identity for weight_orig. The names match
torch.nn.utils.prune's, so sparsekern.sparsify (and sparsity_report) understand a DNS model even
before finalize(); do not mix with torch.nn.utils.prune on the same layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsekern.prune.magnitude import check_sparsity, is_torch_pruned, prunable_layers

CUT_FACTOR, SPLICE_FACTOR = 0.9, 1.1


class StraightThroughMask(torch.autograd.Function):
    """weight * mask forward; d/dweight = identity (gradient not masked); no grad to mask."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _dns_pre_hook(module: nn.Module, args) -> None:
    module.weight = StraightThroughMask.apply(module.weight_orig, module.weight_mask)


def dns_mask_update(weight: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """The DNS rule: new mask (dtype of mask) from weights, previous mask and threshold t."""
    a = weight.detach().abs()
    cut = a <= CUT_FACTOR * threshold
    splice = a > SPLICE_FACTOR * threshold
    keep = torch.where(cut, torch.zeros_like(cut), torch.where(splice, torch.ones_like(cut),
                                                                mask != 0))
    return keep.to(mask.dtype)


def refresh_probability(iteration: int, gamma: float = 1e-4, power: float = 1.0,
                        iter_stop: int | None = None) -> float:
    """(1 + gamma * iteration)^(-power) for iteration < iter_stop (None: never stops), else 0."""
    if iter_stop is not None and iteration >= iter_stop:
        return 0.0
    return float((1.0 + gamma * iteration) ** (-power))


def abs_stats(weight: Tensor) -> tuple[float, float]:
    """(mean, population std) of |w|."""
    a = weight.detach().abs().double().reshape(-1)
    if a.numel() == 0:
        return 0.0, 0.0
    return float(a.mean()), float(a.std(unbiased=False))


def solve_c_rate(weight: Tensor, target_sparsity: float) -> float:
    """c_rate such that the first refresh (from an all-ones mask) cuts round(target * n) weights.

    Solved exactly on the sorted magnitudes a_1 <= ... <= a_n: with k = round(target * n) the
    cut bound 0.9 t is put midway between a_k and a_{k+1} (a_n itself for k = n, a_1 / 2 for
    k = 0), then c_rate = (t - mu) / sigma. Ties in |w| at the boundary can make the count
    differ; with sigma = 0 (all |w| equal) c_rate is 0 or +-inf accordingly.
    """
    target = check_sparsity(target_sparsity, "target_sparsity")
    a = weight.detach().abs().double().reshape(-1).sort().values
    n = a.numel()
    k = round(target * n)
    if k <= 0:
        bound = float(a[0]) / 2
    elif k >= n:
        bound = float(a[-1])
    else:
        bound = (float(a[k - 1]) + float(a[k])) / 2
    t = bound / CUT_FACTOR
    mu, sigma = abs_stats(weight)
    if sigma == 0.0:
        return 0.0 if k == 0 else float("inf")
    return (t - mu) / sigma


class DNS:
    """Dynamic Network Surgery on a model's layers.

    Args:
        model: holds the layers; they are reparametrized in place at construction.
        c_rate: float for every layer, or {layer name: float}; exclusive with target_sparsity.
        target_sparsity: float or {layer name: float}; c_rate of each layer is solved so that
            the first refresh cuts that fraction (solve_c_rate). Later refreshes move the
            sparsity as the weights train (DNS has no exact sparsity control).
        gamma, power, iter_stop: refresh probability (1 + gamma*iter)^(-power) while
            iter < iter_stop (None = forever).
        layers: as in sparsekern.prune.magnitude.prunable_layers (default: every nn.Linear /
            nn.Conv2d).
        seed / generator: randomness of the refreshes (a CPU torch.Generator).
        initial_update: refresh every mask once at construction (iteration 0 refreshes with
            probability 1 anyway).

    Usage: call .step() once per training iteration (before the forward or after
    optimizer.step()); at the end .finalize() leaves plain weights with zeros (or, with
    keep_mask=True, torch.nn.utils.prune's weight_orig/weight_mask pair) for sparsekern.sparsify.
    Attributes: iteration, thresholds {name: t}, mu, sigma, c_rates {name: c}.
    """

    def __init__(self, model: nn.Module, c_rate=None, target_sparsity=None,
                 gamma: float = 1e-4, power: float = 1.0, iter_stop: int | None = None,
                 layers=None, seed: int | None = None,
                 generator: torch.Generator | None = None, initial_update: bool = False):
        if (c_rate is None) == (target_sparsity is None):
            raise ValueError("give exactly one of c_rate and target_sparsity")
        if gamma < 0 or power < 0:
            raise ValueError(f"gamma and power must be >= 0, got gamma={gamma}, power={power}")
        if iter_stop is not None and iter_stop < 0:
            raise ValueError(f"iter_stop must be >= 0 or None, got {iter_stop}")
        self.model = model
        self.gamma, self.power, self.iter_stop = float(gamma), float(power), iter_stop
        if generator is None:
            generator = torch.Generator()
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        self.generator = generator
        self.names = prunable_layers(model, layers)
        if not self.names:
            raise ValueError("DNS found no layer to prune")
        self.iteration = 0
        self.mu: dict[str, float] = {}
        self.sigma: dict[str, float] = {}
        self.c_rates: dict[str, float] = {}
        self.thresholds: dict[str, float] = {}
        for name in self.names:
            module = model.get_submodule(name)
            if is_torch_pruned(module) or hasattr(module, "weight_orig"):
                raise ValueError(f"layer {name!r} is already reparametrized (weight_orig); call "
                                 f"torch.nn.utils.prune.remove or finalize first")
            weight = module.weight.detach()
            self.mu[name], self.sigma[name] = abs_stats(weight)
            if c_rate is not None:
                c = float(self._per_layer(c_rate, name, "c_rate"))
            else:
                c = solve_c_rate(weight, self._per_layer(target_sparsity, name, "target_sparsity"))
            self.c_rates[name] = c
            self.thresholds[name] = self.threshold_for(name, c)
        for name in self.names:
            self._install(model.get_submodule(name))
        if initial_update:
            self.update_masks()

    @staticmethod
    def _per_layer(value, name, what):
        if isinstance(value, dict):
            if name not in value:
                raise ValueError(f"{what} has no entry for layer {name!r}")
            return value[name]
        return value

    def threshold_for(self, name: str, c_rate: float) -> float:
        """t = max(mu + c_rate * sigma, 0) with the layer's initial statistics."""
        sigma = self.sigma[name]
        if sigma == 0.0 and abs(c_rate) == float("inf"):  # from solve_c_rate on equal |w|
            return float("inf") if c_rate > 0 else 0.0
        return max(self.mu[name] + c_rate * sigma, 0.0)

    @staticmethod
    def _install(module: nn.Module) -> None:
        weight = module._parameters.pop("weight")
        module.register_parameter("weight_orig", weight)
        module.register_buffer("weight_mask", torch.ones_like(weight, memory_format=torch.
                                                              contiguous_format))
        module.weight = weight.detach() * module.weight_mask
        module._dns_hook = module.register_forward_pre_hook(_dns_pre_hook)

    def modules(self):
        return [(n, self.model.get_submodule(n)) for n in self.names]

    @torch.no_grad()
    def update_masks(self, names=None) -> None:
        """Applies the cut/splice rule now to the given layers (default all)."""
        for name in (self.names if names is None else names):
            module = self.model.get_submodule(name)
            module.weight_mask.copy_(dns_mask_update(module.weight_orig, module.weight_mask,
                                                     self.thresholds[name]))
            module.weight = module.weight_orig.detach() * module.weight_mask

    def probability(self, iteration: int | None = None) -> float:
        it = self.iteration if iteration is None else iteration
        return refresh_probability(it, self.gamma, self.power, self.iter_stop)

    def step(self) -> list[str]:
        """One training iteration: each layer's mask is refreshed with probability
        probability(iteration); then iteration += 1. Returns the names refreshed."""
        p = self.probability()
        refreshed = []
        if p > 0:
            draws = torch.rand(len(self.names), generator=self.generator)
            refreshed = [n for n, r in zip(self.names, draws.tolist()) if r < p]
            self.update_masks(refreshed)
        self.iteration += 1
        return refreshed

    def masks(self) -> dict[str, Tensor]:
        return {n: m.weight_mask.detach().clone() for n, m in self.modules()}

    @torch.no_grad()
    def finalize(self, keep_mask: bool = False) -> None:
        """Removes the DNS parametrization: `weight` becomes a plain Parameter equal to
        weight_orig * weight_mask (cut weights are zero). keep_mask=True then reinstalls the mask
        as torch.nn.utils.prune's weight_orig/weight_mask pair (custom_from_mask), which
        sparsekern.sparsify uses as the mask."""
        from torch.nn.utils import prune

        for name, module in self.modules():
            hook = getattr(module, "_dns_hook", None)
            if hook is None:
                continue
            hook.remove()
            del module._dns_hook
            orig, mask = module.weight_orig, module.weight_mask
            del module.weight
            del module._parameters["weight_orig"]
            del module._buffers["weight_mask"]
            module.weight = nn.Parameter((orig * mask).detach(), requires_grad=orig.requires_grad)
            if keep_mask:
                prune.custom_from_mask(module, "weight", mask)
