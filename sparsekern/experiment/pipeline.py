"""The science of one experiment cell, step by step: data, dense training, pruning, fine-tuning,
conversion to truly sparse modules, and the evaluation that produces the result rows.

Every function takes the parts of the config it needs; sparsekern.experiment.runner strings
them together, handles checkpoints and resuming, and writes the files.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

import sparsekern
from sparsekern import prune as skp
from sparsekern.attacks import (CW, FGSM, PGD, DeepFool, accuracy, activation_sparsity, mean_l2,
                                rho, robust_accuracy)
from sparsekern.attacks.base import model_mode
from sparsekern.experiment.config import (EvalConfig, ExperimentConfig, FinetuneConfig,
                                          PruneConfig, TrainConfig)
from sparsekern.train import train_epoch

EVAL_SUBSET_SEED = 1234  # the attack images are the same for every cell, seed and run


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Data:
    """Tensors on the run's device: train split, test split (clean accuracy) and the fixed
    evaluation subset of the test split (attacks, activation sparsity)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_eval: Tensor
    y_eval: Tensor
    num_classes: int
    in_channels: int


def load_data(cfg: ExperimentConfig, device: torch.device) -> Data:
    """The configured dataset (sparsekern.data); a missing dataset raises FileNotFoundError
    saying where it looked, how to get it, and which config keys choose it."""
    from sparsekern.data import dataset_info, load_dataset

    d = cfg.data
    info = dataset_info(d.dataset)
    try:
        x_train, y_train = load_dataset(d.dataset, "train", root=d.root)
        x_test, y_test = load_dataset(d.dataset, "test", root=d.root)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}\nIn an experiment config: data.root (--set data.root=DIR) "
                                f"and data.dataset (--set data.dataset=mnist-sample).") from None
    if d.train_size is not None:
        x_train, y_train = x_train[:d.train_size], y_train[:d.train_size]
    if d.test_size is not None:
        x_test, y_test = x_test[:d.test_size], y_test[:d.test_size]
    n_eval = min(cfg.eval.images, x_test.shape[0])
    order = torch.randperm(x_test.shape[0], generator=torch.Generator().manual_seed(
        EVAL_SUBSET_SEED))[:n_eval]
    return Data(d.dataset, x_train.to(device), y_train.to(device), x_test.to(device),
                y_test.to(device), x_test[order].to(device), y_test[order].to(device),
                info.num_classes, info.input_shape[0])


def build(name: str, data: Data, seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised dense model (sparsekern.models) for the data, on device."""
    from sparsekern.models import build_model

    return build_model(name, num_classes=data.num_classes, in_channels=data.in_channels,
                       seed=seed).to(device)


# ---- training --------------------------------------------------------------------------------
def shuffled_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator,
                     before_step: Callable[[], None] | None = None
                     ) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled (x, y) minibatches; before_step() runs before each one is handed
    out (pruning schedules hook in here)."""
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    for i in range(0, x.shape[0], batch_size):
        if before_step is not None:
            before_step()
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def fit(model: nn.Module, data: Data, tc: TrainConfig, seed: int,
        attack: Callable | None = None, before_step: Callable[[], None] | None = None,
        status: Callable[[str], None] | None = None) -> list[float]:
    """tc.epochs epochs of (adversarial when `attack` is given) training on the train split;
    returns the mean loss of each epoch. Deterministic for a given seed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum,
                              weight_decay=tc.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(tc.epochs, 1))
             if tc.schedule == "cosine" else None)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(tc.epochs):
        if status is not None:
            status(f"epoch {epoch + 1}/{tc.epochs}")
        batches = shuffled_batches(data.x_train, data.y_train, tc.batch_size, gen, before_step)
        losses.append(train_epoch(model, batches, opt, attack))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training diverged (loss {losses[-1]} in epoch "
                                     f"{epoch + 1}); lower the learning rate")
        if sched is not None:
            sched.step()
    return losses


# ---- pruning ---------------------------------------------------------------------------------
def layers_to_prune(model: nn.Module, pc: PruneConfig) -> list[str]:
    """Names of the layers a cell prunes (see PruneConfig.layers)."""
    keep = set(getattr(model, "keep_dense", ())) if pc.layers == "model" else set()
    return [n for n in skp.prunable_layers(model) if n not in keep]


class Pruning:
    """Prunes a dense model to a cell's sparsity with the configured method, around
    fine-tuning: .before_step() runs before every fine-tuning step (gradual schedule, DNS mask
    refreshes) and .finish() leaves masks that sparsekern.sparsify converts.

    sparsity 0 prunes nothing (the 0% cell is the fine-tuned dense model for every method).
    """

    def __init__(self, model: nn.Module, method: str, sparsity: float, block: tuple[int, int],
                 pc: PruneConfig, total_steps: int, seed: int):
        self.model, self.method, self.sparsity, self.block = model, method, sparsity, block
        self.layers = layers_to_prune(model, pc) if sparsity > 0 else []
        self.step = 0
        self.gradual = self.dns = None
        if not self.layers:
            return
        if method == "dns":
            d = pc.dns
            self.dns = skp.DNS(model, target_sparsity=sparsity, gamma=d.gamma, power=d.power,
                               iter_stop=d.iter_stop, layers=self.layers, seed=seed,
                               initial_update=True)
        elif pc.schedule == "gradual" and total_steps > 0:
            end = max(1, round(pc.gradual_fraction * total_steps))
            self.gradual = skp.GradualPruner(model, sparsity, begin_step=0, end_step=end,
                                             frequency=max(1, end // 20), block_size=block,
                                             norm=pc.norm, scope=pc.scope, layers=self.layers)
            self.gradual.step(0)
        else:
            skp.magnitude_prune(model, sparsity, block_size=block, norm=pc.norm, scope=pc.scope,
                                layers=self.layers)

    def before_step(self) -> None:
        if self.dns is not None:
            self.dns.step()
        elif self.gradual is not None:
            self.gradual.step(self.step)
        self.step += 1

    def finish(self) -> None:
        """Final masks as torch.nn.utils.prune weight_mask buffers."""
        if self.dns is not None:
            self.dns.finalize(keep_mask=True)
        elif self.gradual is not None:
            self.gradual.step(max(self.step, self.gradual.end_step))  # the final sparsity

    def sparsify(self, model: nn.Module | None = None) -> list[str]:
        """Converts the pruned layers to SparseLinear / SparseConv2d, each nn.ReLU right after
        one folded into it (same numbers, fewer passes over memory; activation sparsity keeps
        the ReLUs' names); returns a note per pruned layer that could not be converted (it stays
        a masked dense layer)."""
        if not self.layers:
            return []
        names = set(self.layers)
        report = sparsekern.sparsify(model or self.model, block_size=self.block,
                                     include=lambda n, m: n in names, fuse_relu=True)
        return [f"{e.name}: {e.reason}" for e in report.entries
                if e.name in names and not e.converted]


def finetune(model: nn.Module, data: Data, fc: FinetuneConfig, pruning: Pruning, seed: int,
             status: Callable[[str], None] | None = None) -> list[float]:
    """fc.epochs of fine-tuning (PGD adversarial training when fc.adversarial.enabled), with the
    pruning's per-step hook."""
    attack = None
    if fc.adversarial.enabled:
        a = fc.adversarial
        attack = PGD(model, eps=a.eps, alpha=a.alpha, steps=a.steps, random_start=True)
    torch.manual_seed(seed)  # PGD-AT random starts, dropout
    return fit(model, data, fc, seed + 1, attack=attack, before_step=pruning.before_step,
               status=status)


# ---- evaluation ------------------------------------------------------------------------------
def _row(attack, metric, value, *, norm="", eps=None, layer="", n=None, success_rate=None,
         seconds=None) -> dict:
    return {"attack": attack, "norm": norm, "eps": eps, "metric": metric, "layer": layer,
            "value": float(value), "n": n, "success_rate": success_rate,
            "seconds": None if seconds is None else round(seconds, 3)}


def _predicted(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad(), model_mode(model, False):
        return torch.cat([model(x[i:i + batch_size]).argmax(1)
                          for i in range(0, x.shape[0], batch_size)])


def _batched_attack(attack, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(x_adv, success) over x in batches, for attacks that keep `last_success`."""
    advs, oks = [], []
    for i in range(0, x.shape[0], batch_size):
        advs.append(attack(x[i:i + batch_size], y[i:i + batch_size]))
        oks.append(attack.last_success)
    return torch.cat(advs), torch.cat(oks)


def evaluate(model: nn.Module, data: Data, ec: EvalConfig, seed: int,
             status: Callable[[str], None] | None = None) -> list[dict]:
    """The measurement rows of a (converted) model; see sparsekern.experiment.store.COLUMNS.

    clean accuracy on the test split; FGSM / PGD (Linf) robust accuracy at each eps with the
    true labels; DeepFool rho_2 / rho_inf and C&W mean L2 on the model's own predictions
    (label-free, averaged over the successful examples; success_rate says how many); per-layer
    weight sparsity (and the total) and per-layer ReLU activation sparsity on the eval images.
    """
    say = status or (lambda s: None)
    x, y, bs = data.x_eval, data.y_eval, ec.batch_size
    n = x.shape[0]
    rows = []
    t = time.perf_counter()
    say("clean accuracy")
    rows.append(_row("clean", "accuracy", accuracy(model, data.x_test, data.y_test, bs),
                     n=data.x_test.shape[0], seconds=time.perf_counter() - t))
    if ec.fgsm.enabled:
        for eps in ec.fgsm.eps:
            say(f"FGSM eps={eps:g}")
            t = time.perf_counter()
            acc = robust_accuracy(model, FGSM(model, eps=eps), x, y, bs)
            rows.append(_row("fgsm", "accuracy", acc, norm="Linf", eps=eps, n=n,
                             seconds=time.perf_counter() - t))
    if ec.pgd.enabled:
        p = ec.pgd
        for eps in p.eps:
            say(f"PGD eps={eps:g}")
            t = time.perf_counter()
            attack = PGD(model, eps=eps, alpha=p.alpha, steps=p.steps, restarts=p.restarts,
                         random_start=True, seed=seed)
            acc = robust_accuracy(model, attack, x, y, bs)
            rows.append(_row("pgd", "accuracy", acc, norm="Linf", eps=eps, n=n,
                             seconds=time.perf_counter() - t))
    pred = None
    if ec.deepfool.enabled:
        d = ec.deepfool
        pred = _predicted(model, x, bs)
        for norm in d.norms:
            say(f"DeepFool {norm}")
            t = time.perf_counter()
            attack = DeepFool(model, steps=d.steps, overshoot=d.overshoot, norm=norm,
                              num_classes=d.candidates)
            x_adv, ok = _batched_attack(attack, x, pred, bs)
            p_norm = 2 if norm == "L2" else math.inf
            rows.append(_row("deepfool", "rho", rho(x, x_adv, p=p_norm, mask=ok), norm=norm, n=n,
                             success_rate=float(ok.float().mean()),
                             seconds=time.perf_counter() - t))
    if ec.cw.enabled:
        c = ec.cw
        m = n if c.images is None else min(c.images, n)
        pred = _predicted(model, x, bs) if pred is None else pred
        say(f"C&W L2 on {m} images")
        t = time.perf_counter()
        attack = CW(model, c=c.c, kappa=c.kappa, steps=c.steps, lr=c.lr,
                    binary_search_steps=c.binary_search_steps)
        x_adv, ok = _batched_attack(attack, x[:m], pred[:m], bs)
        rows.append(_row("cw", "mean_l2", mean_l2(x[:m], x_adv, ok), norm="L2", n=m,
                         success_rate=float(ok.float().mean()), seconds=time.perf_counter() - t))
    say("sparsity")
    report = skp.sparsity_report(model)
    for layer in report.layers + [report.total]:
        rows.append(_row("none", "weight_sparsity", layer.sparsity, layer=layer.name,
                         n=layer.numel))
    for layer, value in activation_sparsity(model, x, bs, per_call=True).items():
        rows.append(_row("none", "activation_sparsity", value, layer=layer, n=n))
    return rows
