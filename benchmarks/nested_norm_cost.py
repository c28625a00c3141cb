"""Accuracy cost of nested norms on trained weights (CIFAR-10 validation split).

A plain model (original LayerNorms) is trained on a seeded, stratified share of the CIFAR-10
training set; then it is wrapped in a ``SteppingNet`` and given a random nested assignment
keeping 30 / 50 / 70 / 100% of every neuron group in subnets <= 1..4
(``sliced.nested_assignment``). The full network (subnet 4) differs from the original in two
ways: the nested rule removes the synapses from larger to smaller subnets, and every norm uses
prefix statistics. Columns: ``original``; ``all-in-1`` (every neuron in subnet 1: the nested
norm must equal the original, a control); ``masks+LN`` (subnet 4's masks with the plain norms,
hooks detached); ``nested N`` (subnet 4 as SteppingNet computes it); ``norms`` = masks+LN -
nested N, the nested norms' own cost; ``total`` = original - nested N. All before any
retraining or distillation; the smaller subnets' accuracy is listed for scale.

Models: a ViT with patch 4 at 32x32 (``vit_tiny_patch16_224`` layout with ``embed_dim``,
``depth``, ``num_heads`` below) and ``convnext_atto`` (timm, random init, trained here).

Usage::

    python benchmarks/nested_norm_cost.py --data ../shared/data/cifar10/cifar10-train.npz \\
        --train-images 10000 --epochs 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

RESULTS = Path(__file__).resolve().parent / "results" / "nested_norm_cost.json"


def _models() -> dict[str, Any]:
    import timm

    return {
        "vit_p4": lambda: timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=4,
            embed_dim=96,
            depth=4,
            num_heads=3,
            num_classes=10,
        ),
        "convnext_atto": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
    }


def _accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    return 100.0 * correct / max(total, 1)


def _train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
            schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10/cifar10-train.npz"))
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="vit_p4,convnext_atto")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    from nni_steppingnet import SteppingNet
    from nni_steppingnet.data import load_dataset
    from nni_steppingnet.sliced import nested_assignment

    torch.set_num_threads(args.threads)
    train, val, info = load_dataset(
        "npz", args.data, seed=args.seed, val_fraction=args.val_fraction, train_subset=args.train_images
    )
    train_loader = DataLoader(
        train, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    val_loader = DataLoader(val, batch_size=256)
    builders = _models()
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = builders[name]()
        start = time.perf_counter()
        _train(model, train_loader, args.epochs, args.lr)
        train_s = time.perf_counter() - start
        original = _accuracy(model, val_loader)
        x = next(iter(val_loader))[0][:2]
        net = SteppingNet(model, x, 4, execution="masked")
        control = _accuracy(model, val_loader)  # every neuron in subnet 1: the original norms
        # Every neuron active in the full network: 30 / 50 / 70 / 100% of each group in subnets
        # <= 1..4, so subnet 4 differs from the original only by the nested rule's removed
        # backward synapses and by the nested norms; the norms' own share is measured by
        # detaching them (plain norms, same masks) afterwards.
        net.set_flat_assignment(nested_assignment(net, seed=args.seed, fractions=[0.3, 0.5, 0.7, 1.0]))
        subnets = []
        for s in range(1, 5):
            with net.subnet(s):
                subnets.append(_accuracy(model, val_loader))
        net.nested_norms.remove()
        with net.subnet(4):
            plain_norms = _accuracy(model, val_loader)
        rows.append(
            {
                "model": name,
                "train_s": round(train_s, 1),
                "original": original,
                "all_in_subnet_1": control,
                "nested_full": subnets[-1],
                "masks_plain_norms": plain_norms,
                "norm_cost_points": round(plain_norms - subnets[-1], 2),
                "total_cost_points": round(original - subnets[-1], 2),
                "subnets": subnets,
                "nested_norms": len(net.nested_norms),
                "heads": sum(int(h.numel()) for _, h in net.attention),
            }
        )
        net.remove()
    print(
        f"CIFAR-10 {info.eval_split} ({len(val)} images), {len(train)} training images, "
        f"{args.epochs} epochs, seed {args.seed}"
    )
    print(
        f"{'model':15s} {'original':>9s} {'all-in-1':>9s} {'masks+LN':>9s} {'nested N':>9s} "
        f"{'norms':>6s} {'total':>6s}  subnets 1-4 (no retraining)"
    )
    for r in rows:
        subs = " / ".join(f"{a:.1f}" for a in r["subnets"])
        print(
            f"{r['model']:15s} {r['original']:9.2f} {r['all_in_subnet_1']:9.2f} {r['masks_plain_norms']:9.2f} "
            f"{r['nested_full']:9.2f} {r['norm_cost_points']:6.2f} {r['total_cost_points']:6.2f}  {subs}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        # file names only: the results do not record this machine's directories
        "settings": {k: v.name if isinstance(v, Path) else v for k, v in vars(args).items()},
        "eval_split": info.eval_split,
        "val_images": len(val),
        "train_images": len(train),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
