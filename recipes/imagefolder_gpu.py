"""Grow a timm backbone on your own ImageFolder / CIFAR-style data, on GPU when there is one.

    python recipes/imagefolder_gpu.py --data /path/to/dataset --model resnet18 \
        --checkpoint trained.safetensors --budget params=1.2 --out grown/

``--data`` is a local folder in torchvision ImageFolder layout (``train/<class>/*.png`` and
optionally ``val/<class>/*.png``; without ``val/`` 10 % of train is held out). Nothing is
downloaded: pass your trained weights with ``--checkpoint`` or train a base with ``--base-epochs``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

import growkit
from growkit.data import image_folder, split
from growkit.train import evaluate, train_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--base-epochs", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--search-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--budget", default="params=1.2")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", default="grown")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    root = Path(args.data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    train_ds = image_folder(train_dir, args.image_size, train=True)
    if (root / "val").is_dir():
        val_ds = image_folder(root / "val", args.image_size, train=False)
    else:
        n_val = len(train_ds) // 10
        train_ds, val_ds = split(train_ds, [len(train_ds) - n_val, n_val])
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    train_l = DataLoader(train_ds, shuffle=True, drop_last=True, **kw)
    val_l = DataLoader(val_ds, **kw)
    num_classes = len(getattr(train_ds, "classes", None) or train_ds.dataset.classes)

    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes).to(device)
    if args.checkpoint:
        from growkit.cli import _load_checkpoint

        _load_checkpoint(model, args.checkpoint)
    if args.base_epochs:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.base_epochs * len(train_l))
        train_steps(model, train_l, opt, epochs=args.base_epochs, scheduler=sched, device=device, progress=True, desc="base")
    print(f"base val acc {100 * evaluate(model, val_l, device=device)['accuracy']:.2f} %")
    res = growkit.grow(model, train_l, val_l, budget=growkit.Budget.parse(args.budget), rounds=args.rounds,
                       search_epochs=args.search_epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
                       device=device, checkpoint_dir=args.out)
    growkit.save(res, args.out)
    res.plot(Path(args.out) / "gallery.png")
    print(res.report())


if __name__ == "__main__":
    main()
