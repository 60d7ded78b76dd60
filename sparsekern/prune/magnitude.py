"""Magnitude pruning: unstructured |w| and block-wise (L1 / L2 block norms) in the GEMM view.

Blocks are defined in the view the kernels compute in: nn.Linear's weight [out, in] as is, and
nn.Conv2d's weight [C_out, C_in, R, S] as the implicit-GEMM matrix [C_out, R*S*C_in] ordered
(r, s, c) (sparsekern.nn.conv_weight_to_gemm). A (bm, bk) block is bm rows x bk columns of that
matrix; dimensions that are not a multiple of the block are padded with zeros for scoring (the
padding contributes nothing to a block's norm). The element mask of a layer is its block mask
expanded back to the weight's shape.

Masks are installed with torch.nn.utils.prune's reparametrization (weight_orig Parameter +
weight_mask buffer + forward pre-hook), which sparsekern.sparsify understands. Re-applying
updates weight_mask in place (masks may shrink or grow) rather than stacking pruning methods.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from sparsekern.nn import conv_weight_to_gemm, gemm_to_conv_weight
from sparsekern.prune.report import effective_weight

NORMS = ("l1", "l2")
SCOPES = ("layer", "global")


# ---- argument checks -------------------------------------------------------------------------
def check_sparsity(sparsity, what: str = "sparsity") -> float:
    """float in [0, 1] or ValueError."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {sparsity!r}") from None
    if isinstance(sparsity, bool) or not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} must be in [0, 1], got {sparsity!r}")
    return value


def check_block_size(block_size) -> tuple[int, int]:
    """An int b -> (b, b); a pair (bm, bk) of positive ints; else ValueError."""
    pair = (block_size, block_size) if isinstance(block_size, int) else block_size
    try:
        bm, bk = pair
    except (TypeError, ValueError):
        raise ValueError(f"block_size must be a positive int or a pair (bm, bk), got "
                         f"{block_size!r}") from None
    if (isinstance(bm, bool) or isinstance(bk, bool) or int(bm) != bm or int(bk) != bk
            or bm < 1 or bk < 1):
        raise ValueError(f"block_size must be positive integers, got {block_size!r}")
    return int(bm), int(bk)


def _check_choice(value, choices, what) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: expected one of {', '.join(choices)}")
    return value


# ---- layer selection -------------------------------------------------------------------------
def prunable_layers(model: nn.Module, layers=None, skip_first: bool = False,
                    skip_last: bool = False) -> list[str]:
    """Names of the layers to prune, in registration (named_modules) order.

    layers: None -> every nn.Linear / nn.Conv2d; a predicate (name, module) -> bool filtering
    those; or an explicit list of module names (each must hold a 2-D or 4-D `weight`).
    skip_first / skip_last drop the first / last selected layer (registration order, which is
    the forward order for sequential models), the usual exceptions of pruning recipes.
    """
    if layers is None or callable(layers):
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                 and (layers is None or layers(n, m))]
    else:
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of names or a predicate, got the string "
                             f"{layers!r}; use [{layers!r}]")
        names = list(layers)
        modules = dict(model.named_modules())
        for n in names:
            if n not in modules:
                raise ValueError(f"layers names {n!r}, which is not a module of the model")
            w = _weight_of(modules[n])
            if w is None or w.dim() not in (2, 4):
                raise ValueError(f"layer {n!r} ({type(modules[n]).__name__}) has no 2-D or 4-D "
                                 f"weight to prune")
    if skip_first:
        names = names[1:]
    if skip_last:
        names = names[:-1]
    return names


def _weight_of(module: nn.Module) -> Tensor | None:
    w = getattr(module, "weight_orig", None)
    if w is None:
        w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) else None


# ---- GEMM view -------------------------------------------------------------------------------
def to_gemm(weight: Tensor) -> Tensor:
    """[M, K] -> itself; conv [C_out, C_in, R, S] -> [C_out, R*S*C_in] ordered (r, s, c)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        return conv_weight_to_gemm(weight)
    raise ValueError(f"expected a 2-D (linear) or 4-D (conv) weight, got shape "
                     f"{tuple(weight.shape)}")


def from_gemm(matrix: Tensor, like: Tensor) -> Tensor:
    """Inverse of to_gemm for a tensor shaped like `like`."""
    if like.dim() == 2:
        return matrix
    return gemm_to_conv_weight(matrix, like.shape[1], like.shape[2:]).contiguous()


# ---- scores ----------------------------------------------------------------------------------
def unstructured_scores(weight: Tensor) -> Tensor:
    """|w|, same shape as weight."""
    return weight.detach().abs()


def block_scores(weight: Tensor, block_size=(1, 1), norm: str = "l1") -> Tensor:
    """Block norms [ceil(M/bm), ceil(K/bk)] of weight's GEMM view [M, K] (see module docstring).

    norm "l1": sum |w| over the block; "l2": sqrt(sum w^2). Out-of-range entries of edge blocks
    count as zeros. With block_size (1, 1) both are |w| in the GEMM view.
    """
    bm, bk = check_block_size(block_size)
    _check_choice(norm, NORMS, "norm")
    g = to_gemm(weight.detach())
    M, K = g.shape
    n_br, n_bc = -(-M // bm), -(-K // bk)
    padded = g.new_zeros(n_br * bm, n_bc * bk)
    padded[:M, :K] = g
    blocks = padded.reshape(n_br, bm, n_bc, bk)
    if norm == "l1":
        return blocks.abs().sum(dim=(1, 3))
    return blocks.square().sum(dim=(1, 3)).sqrt()


def expand_block_mask(block_mask: Tensor, block_size, like: Tensor) -> Tensor:
    """Block mask [n_br, n_bc] -> element mask shaped like `like` (a weight), dtype of like."""
    bm, bk = check_block_size(block_size)
    M, K = to_gemm(like).shape
    elem = block_mask.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:M, :K]
    return from_gemm(elem.to(like.dtype), like)


def _global_scale(block_size, norm: str) -> float:
    """Divisor making block scores of different block sizes comparable in global ranking."""
    bm, bk = block_size
    n = bm * bk
    return float(n) if norm == "l1" else math.sqrt(n)


def _smallest(scores: Tensor, k: int) -> Tensor:
    """Boolean [n] with exactly the k smallest scores set (ties broken by position)."""
    flat = scores.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        out[torch.argsort(flat, stable=True)[:k]] = True
    return out


@torch.no_grad()
def compute_masks(model: nn.Module, sparsity: float, block_size=(1, 1), norm: str = "l1",
                  scope: str = "layer", layers=None) -> dict[str, Tensor]:
    """Magnitude masks {module_name: element mask shaped like the module's weight}.

    Units are single weights (block_size (1, 1)) or (bm, bk) blocks of the GEMM view; a layer
    with an [M, K] GEMM view has ceil(M/bm) * ceil(K/bk) units. Scores are taken on the weight
    the layer currently computes with (weight_orig * weight_mask when already masked), so a
    pruned unit scores 0 and stays pruned when sparsity grows (gradual pruning is monotone).

    scope "layer": each layer loses exactly round(sparsity * n_units) of its lowest-scoring
    units. scope "global": all layers' units are ranked together and exactly
    round(sparsity * total_units) are pruned. For global ranking a block's norm is divided by
    its nominal element count, to the power 1 for L1 and 1/2 for L2 (i.e. mean |w| and RMS of
    the block), so a block of equal entries a scores a whatever its size; with one block size
    for all layers this is the ranking by raw block norm. Ties go to the earlier unit.
    round() is Python's (half to even).

    block_size: int, pair, or a function (name, module) -> pair for per-layer sizes.
    norm: "l1" | "l2". scope: "layer" | "global".
    layers: None (every nn.Linear / nn.Conv2d), a list of names, or a predicate (name, module)
    -> bool; see prunable_layers (e.g. layers=prunable_layers(model, skip_first=True)).
    Returned masks have the weight's dtype and device; 1 = keep, 0 = pruned.
    """
    sparsity = check_sparsity(sparsity)
    _check_choice(norm, NORMS, "norm")
    _check_choice(scope, SCOPES, "scope")
    if not callable(block_size):
        check_block_size(block_size)
    names = prunable_layers(model, layers)
    entries = []  # (name, weight, block, scores)
    for name in names:
        module = model.get_submodule(name)
        block = check_block_size(block_size(name, module) if callable(block_size)
                                 else block_size)
        weight = effective_weight(module)
        entries.append((name, weight, block, block_scores(weight, block, norm)))
    masks: dict[str, Tensor] = {}
    if scope == "layer":
        for name, weight, block, scores in entries:
            pruned = _smallest(scores, round(sparsity * scores.numel())).reshape(scores.shape)
            masks[name] = expand_block_mask(~pruned, block, weight)
        return masks
    if not entries:
        return masks
    device = entries[0][3].device
    flat = torch.cat([(s / _global_scale(b, norm)).reshape(-1).to(device=device,
                                                                  dtype=torch.float64)
                      for _, _, b, s in entries])
    pruned = _smallest(flat, round(sparsity * flat.numel()))
    start = 0
    for name, weight, block, scores in entries:
        part = pruned[start:start + scores.numel()].reshape(scores.shape).to(scores.device)
        start += scores.numel()
        masks[name] = expand_block_mask(~part, block, weight)
    return masks


def is_torch_pruned(module: nn.Module, name: str = "weight") -> bool:
    """True when torch.nn.utils.prune's reparametrization of `name` is installed."""
    return any(isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == name
               for h in module._forward_pre_hooks.values())


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Installs (first call) or updates in place (later calls) torch.nn.utils.prune's
    reparametrization of each named module's weight with the given element mask (shaped like
    the weight). Updating replaces the mask (pruned weights may come back: their weight_orig
    values were kept), it does not intersect it with the previous one.
    """
    for name, mask in masks.items():
        module = model.get_submodule(name)
        if getattr(module, "_dns_hook", None) is not None:
            raise ValueError(f"layer {name!r} is managed by sparsekern.prune.DNS; finalize it "
                             f"before magnitude pruning")
        weight = _weight_of(module)
        if weight is None or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, expected the "
                             f"weight's {None if weight is None else tuple(weight.shape)}")
        if is_torch_pruned(module):
            module.weight_mask.copy_(mask.to(module.weight_mask))
            module.weight = module.weight_orig * module.weight_mask
        else:
            if hasattr(module, "weight_mask"):
                raise ValueError(f"layer {name!r} has a weight_mask but no torch.nn.utils.prune "
                                 f"hook; remove it first")
            prune.custom_from_mask(module, "weight", mask.to(device=weight.device))


def remove_masks(model: nn.Module) -> None:
    """Makes torch.nn.utils.prune masks permanent (weight = weight_orig * weight_mask, plain
    Parameter with zeros) on every module that has them; sparsify still converts the result
    (it recognizes zeros)."""
    for module in model.modules():
        if is_torch_pruned(module):
            prune.remove(module, "weight")


def magnitude_prune(model: nn.Module, sparsity: float, block_size=(1, 1), norm: str = "l1",
                    scope: str = "layer", layers=None) -> dict[str, Tensor]:
    """compute_masks + apply_masks; returns the masks."""
    masks = compute_masks(model, sparsity, block_size, norm, scope, layers)
    apply_masks(model, masks)
    return masks
