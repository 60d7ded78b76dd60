"""One PGD-10 adversarial-training step (10 attack iterations + the weight update) of a CIFAR-size
CNN at 90% block sparsity vs the same CNN dense, in one process, CPU.

Correctness first: the sparse model is the dense one pruned to the same mask and converted with
sparsify, and its logits must match. Then medians of full AT steps, round-robin over three
models: dense, sparse (sparsify as it comes: the nn.ReLU modules stay) and sparse with
sparsify(fuse_relu=True) (each ReLU folded into the sparse layer before it).

    python benchmarks/bench_adv_train.py [--batch 128] [--sparsity 0.9] [--block 32]

Timed twice by default, same process: first with glibc's malloc as it comes (every freed block
of 32 MiB or more goes back to the kernel and is faulted in again on the next allocation), then
after sparsekern.retain_freed_cpu_memory() (freed blocks are reused). Both models run under the
same allocator in each round.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.utils.prune as prune
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians_ms, machine_info, write_json  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.attacks import PGD  # noqa: E402
from sparsekern.nn import conv_weight_to_gemm, gemm_to_conv_weight  # noqa: E402
from sparsekern.train import adversarial_step  # noqa: E402


def vgg_like() -> nn.Sequential:
    """A CIFAR-10 VGG-like CNN: 6 conv layers (64-64-128-128-256-256) and 2 fc layers."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 64), *block(64, 64), nn.MaxPool2d(2),
                         *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
                         *block(128, 256), *block(256, 256), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(inplace=True), nn.Linear(256, 10))


def prune_blocks(model: nn.Module, sparsity: float, block: int) -> list[str]:
    """Block-magnitude pruning of every layer but the first conv and the last fc; returns names."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    pruned = []
    for name, m in layers[1:-1]:
        gemm = conv_weight_to_gemm(m.weight.detach()) if m.weight.dim() == 4 else m.weight.detach()
        M, K = gemm.shape
        norms = gemm.reshape(M // block, block, K // block, block).abs().sum((1, 3))
        keep = max(1, int(round((1 - sparsity) * norms.numel())))
        grid = torch.zeros(norms.numel())
        grid[norms.flatten().topk(keep).indices] = 1
        elem = grid.reshape(norms.shape).repeat_interleave(block, 0).repeat_interleave(block, 1)
        if m.weight.dim() == 4:
            elem = gemm_to_conv_weight(elem, m.in_channels, m.kernel_size)
        prune.custom_from_mask(m, "weight", elem)
        pruned.append(name)
    return pruned


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--format", choices=["channels_last", "nchw"], default="channels_last",
                        help="memory format of the input batch (and so of every activation)")
    parser.add_argument("--allocator", choices=["both", "glibc", "retain"], default="both",
                        help="time with malloc as it comes, after retain_freed_cpu_memory(), or "
                             "both in that order")
    parser.add_argument("--json", default="benchmarks/results/bench_adv_train_cpu.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dense = vgg_like()
    pruned = prune_blocks(dense, args.sparsity, args.block)
    report = sparsekern.sparsify(dense, block_size=(args.block, args.block),
                                 include=lambda n, m: n in pruned, inplace=False)
    sparse = report.model
    fused = sparsekern.sparsify(dense, block_size=(args.block, args.block),
                                include=lambda n, m: n in pruned, inplace=False,
                                fuse_relu=True).model
    for name in pruned:  # the dense baseline: a plain model with the same (masked) weights
        prune.remove(dense.get_submodule(name), "weight")
    x = torch.rand(args.batch, 3, 32, 32)
    if args.format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        err = max((dense(x) - m(x)).abs().max().item() for m in (sparse, fused))
    if err > 1e-3:
        raise SystemExit(f"sparse and dense logits differ by {err}")
    print(report)

    def at_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
        return lambda: adversarial_step(model, x, y, opt, attack)

    info = machine_info()
    steps = {"dense": at_step(dense), "sparse": at_step(sparse), "fused": at_step(fused)}
    rows = []
    for allocator in (["glibc", "retain"] if args.allocator == "both" else [args.allocator]):
        if allocator == "retain" and not sparsekern.retain_freed_cpu_memory():
            print("retain_freed_cpu_memory: not available here (not glibc); skipped")
            continue
        t = interleaved_medians_ms(steps, args.repeats)
        t_dense, t_sparse, t_fused = t["dense"], t["sparse"], t["fused"]
        row = {"model": "VGG-like CIFAR", "batch": args.batch, "format": args.format,
               "allocator": allocator, "sparsity": args.sparsity,
               "block": f"{args.block}x{args.block}", "dense_ms": t_dense, "sparse_ms": t_sparse,
               "speedup": t_dense / t_sparse, "sparse_fused_relu_ms": t_fused,
               "speedup_fused_relu": t_dense / t_fused}
        rows.append(row)
        print(f"PGD-10 AT step, batch {args.batch} ({args.format}, malloc: {allocator}), "
              f"{args.block}x{args.block} blocks at {100 * args.sparsity:.0f}%: dense "
              f"{t_dense:.1f} ms, sparse {t_sparse:.1f} ms ({row['speedup']:.2f}x), sparse "
              f"with fused ReLUs {t_fused:.1f} ms ({row['speedup_fused_relu']:.2f}x)")
    print(info)
    write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
