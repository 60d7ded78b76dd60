"""Pruning for sparsekern: magnitude (unstructured / block, layer-wise / global), the cubic
gradual schedule of Zhu & Gupta 2017, and Dynamic Network Surgery (Guo et al. 2016).

Masks live as weight_orig / weight_mask pairs during fine-tuning; sparsekern.sparsify converts
the pruned model at the end:

    import sparsekern
    from sparsekern import prune as skp
    pruner = skp.GradualPruner(model, 0.9, begin_step=0, end_step=1000, frequency=100,
                               block_size=(4, 4))
    for step in range(n_steps):
        pruner.step(step); train_step(model)
    print(skp.sparsity_report(model))
    sparsekern.sparsify(model, block_size=(4, 4))
"""
from sparsekern.prune.dns import (DNS, StraightThroughMask, dns_mask_update, refresh_probability,
                                  solve_c_rate)
from sparsekern.prune.magnitude import (apply_masks, block_scores, compute_masks,
                                        expand_block_mask, magnitude_prune, prunable_layers,
                                        remove_masks, unstructured_scores)
from sparsekern.prune.report import LayerSparsity, SparsityReport, sparsity_report
from sparsekern.prune.schedule import GradualPruner, cubic_sparsity

__all__ = ["DNS", "GradualPruner", "LayerSparsity", "SparsityReport", "StraightThroughMask",
           "apply_masks", "block_scores", "compute_masks", "cubic_sparsity", "dns_mask_update",
           "expand_block_mask", "magnitude_prune", "prunable_layers", "refresh_probability",
           "remove_masks", "solve_c_rate", "sparsity_report", "unstructured_scores"]
