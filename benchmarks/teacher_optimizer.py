"""The teacher's optimizer on the CIFAR-10 transformer recipes: SGD (the paper's) against AdamW.

For each recipe and seed, the teacher (the original network) is trained exactly as ``compare``
and ``run`` train it (``flow.train_teacher_model``: the recipe's epochs, per-epoch cosine
schedule) once with ``teacher.optimizer=sgd`` at the paper's settings (lr 0.05, momentum 0.9,
weight decay 5e-4) and once with ``teacher.optimizer=adamw`` at the recipes' settings (lr 1e-3,
beta1 0.9, weight decay 0.05), and evaluated on the recipe's validation split (a seeded,
stratified 10% of the CIFAR-10 training images; the test set is withheld). Prints a table and
writes JSON.

    python3 benchmarks/teacher_optimizer.py --data ../shared/data/cifar10/cifar10-train.npz \\
        --set data.train_subset=6000 --set teacher.epochs=8 --seeds 0
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nni_steppingnet.checkpoint import atomic_write_json, seed_everything
from nni_steppingnet.config import load_recipe
from nni_steppingnet.flow import build_data, train_teacher_model
from nni_steppingnet.train import evaluate_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "teacher_optimizer.json"
RECIPES = {"vit_p4_cifar10": ["model.kwargs.num_heads=6"], "convnext_atto_cifar10": []}
#: the paper's SGD settings, and the AdamW settings the recipes ship
SETTINGS = {
    "sgd": ["teacher.optimizer=sgd", "teacher.lr=0.05", "teacher.weight_decay=5.0e-4"],
    "adamw": ["teacher.optimizer=adamw", "teacher.lr=1.0e-3", "teacher.weight_decay=0.05"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the CIFAR-10 training arrays (.npz)")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for every run")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows: list[dict[str, Any]] = []
    for name in args.recipes.split(","):
        for seed in seeds:
            for optimizer, settings in SETTINGS.items():
                overrides = [
                    "data.name=npz",
                    f"data.root={args.data}",
                    f"seed={seed}",
                    *RECIPES[name],
                    *args.set,
                    *settings,
                ]
                recipe = load_recipe(name, overrides)
                device = torch.device("cpu")
                train_loader, val_loader, info = build_data(recipe, device)
                seed_everything(seed)
                begin = time.perf_counter()
                model, losses = train_teacher_model(recipe, info, train_loader, device)
                accuracy = evaluate_model(model, val_loader, device=device)
                row = {
                    "recipe": name,
                    "seed": seed,
                    "optimizer": optimizer,
                    "accuracy": accuracy,
                    "final_loss": losses[-1] if losses else None,
                    "wall_s": round(time.perf_counter() - begin, 1),
                    "overrides": overrides,
                }
                rows.append(row)
                print(
                    f"{name:24s} seed {seed} {optimizer:6s} val accuracy {100 * accuracy:6.2f}%  "
                    f"final loss {row['final_loss']:.3f}  ({row['wall_s']:.0f} s)",
                    flush=True,
                )
    atomic_write_json(
        args.out,
        {
            "command": "python3 benchmarks/teacher_optimizer.py " + " ".join(argv or sys.argv[1:]),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
