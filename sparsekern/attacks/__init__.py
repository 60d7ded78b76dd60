"""Adversarial attacks and robustness metrics over any nn.Module (dense or sparsekern).

Convention (torchattacks): ``x_adv = Attack(model, ...)(x, y)`` with x [B, ...] floating in
[0, 1], y int64 [B]; the model returns logits [B, K] and runs in eval mode during the attack
(its modes are restored afterwards); model parameters never receive ``.grad``.

    from sparsekern.attacks import PGD, DeepFool, rho
    x_adv = PGD(model, eps=0.3, alpha=0.01, steps=40)(x, y)
    r, ok = DeepFool(model).perturbation(x, model(x).argmax(1))
    rho_2 = rho(x, x + r, p=2)
"""
from sparsekern.attacks.base import Attack, model_mode, validate_inputs
from sparsekern.attacks.cw import CW
from sparsekern.attacks.deepfool import DeepFool
from sparsekern.attacks.gradient import BIM, FGSM, PGD
from sparsekern.attacks.metrics import (accuracy, activation_sparsity, mean_l2, rho,
                                        robust_accuracy)

__all__ = ["Attack", "BIM", "CW", "DeepFool", "FGSM", "PGD", "accuracy", "activation_sparsity",
           "mean_l2", "model_mode", "rho", "robust_accuracy", "validate_inputs"]
