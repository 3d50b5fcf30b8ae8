"""Weak learning under DistributedDataParallel: CPU processes (gloo) or one process per GPU (nccl).

    torchrun --nproc_per_node 2 recipes/ddp_weak_learning.py [--out ddp_out] [--batch-size 64]

Trains a small timm ResNet on sklearn's digits under DDP, injects Petridish candidates,
weak-learns them under DDP (growkit.distributed.prepare_ddp: global-batch BatchNorm statistics,
gradient RMS and candidate scores, so every rank sees what one process on the global batch
would), grows the best points, fine-tunes the grown model under DDP and saves it on rank 0 with
growkit.save. Every rank prints its own figures; rank 0 prints the global ones. Nothing is
downloaded; on 2 CPU cores it takes a few minutes.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

import growkit
from growkit.data import digits_dataset, split
from growkit.distributed import desync, prepare_ddp
from growkit.train import PhaseStats, evaluate, train_steps


def main() -> None:
    p = argparse.ArgumentParser(description="growkit weak learning under DDP on sklearn digits")
    p.add_argument("--out", default="ddp_out")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split evenly across ranks)")
    p.add_argument("--base-epochs", type=int, default=8)
    p.add_argument("--search-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--points", type=int, default=2, help="grow the best this many points by score")
    p.add_argument("--max-ops", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not cuda:  # share the cores between the local processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    local_batch = args.batch_size // world

    def say(msg: str, every_rank: bool = False) -> None:
        """Rank 0 prints ``msg``; with ``every_rank`` it prints every rank's message, in rank order."""
        msgs = [msg]
        if every_rank:
            msgs = [None] * world
            dist.all_gather_object(msgs, msg)
            msgs = [f"  rank {r}: {m}" for r, m in enumerate(msgs)]
        if rank == 0:
            print("\n".join(msgs), flush=True)

    def global_stats(st: PhaseStats) -> tuple[float, float]:
        t = torch.tensor([st.loss_sum, st.steps, st.correct, st.seen], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t[0] / t[1]), float(t[2] / t[3])

    def global_eval(model: torch.nn.Module) -> float:
        r = evaluate(model, test_l, device=device)
        t = torch.tensor([r["accuracy"] * r["n"], r["n"]], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t[0] / t[1])

    # Same data and split on every rank; each rank trains on its DistributedSampler shard and
    # evaluates every world-th test image (no padding, so the global accuracy is exact).
    train_ds, _, test_ds = split(digits_dataset(16), [1200, 300, 297], seed=args.seed)
    sampler = DistributedSampler(train_ds, shuffle=True, seed=args.seed, drop_last=True)
    train_l = DataLoader(train_ds, batch_size=local_batch, sampler=sampler, drop_last=True)
    test_l = DataLoader(Subset(test_ds, range(rank, len(test_ds), world)), batch_size=256)
    probe = next(iter(train_l))[0]
    say(f"{world} processes ({'nccl, GPU' if cuda else 'gloo, CPU'}), global batch {args.batch_size} = "
        f"{world} x {local_batch}, {len(train_l)} steps per epoch on {len(sampler)} samples per rank")

    def next_epoch(ep: int, st: PhaseStats) -> None:
        sampler.set_epoch(ep + 1)

    # 1. the base model, trained under DDP (BatchNorm statistics over the global batch)
    torch.manual_seed(args.seed)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1,
                              channels=(4, 8, 16, 32), stem_width=4).to(device)
    ddp = prepare_ddp(model, probe_batch=probe)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = args.base_epochs * len(train_l)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    sampler.set_epoch(0)
    st = train_steps(ddp, train_l, opt, epochs=args.base_epochs, scheduler=sched, device=device, on_epoch_end=next_epoch)
    base = desync(ddp)  # an ordinary module again, to trace and inject
    loss, acc = global_stats(st)
    base_acc = global_eval(base)
    say(f"base: global train loss {loss:.4f}, acc {100 * acc:.2f} %; global test acc {100 * base_acc:.2f} %")
    say(f"local train loss {st.mean_loss:.4f}, acc {100 * st.train_accuracy:.2f} % on {st.seen} samples", True)

    # 2. weak learning under DDP: same seed on every rank (DDP broadcasts rank 0's weights anyway)
    torch.manual_seed(args.seed + 1)
    cm = growkit.inject(base, probe[:1].to(device), normalize_grad=True).to(device)
    ddp = prepare_ddp(cm, probe_batch=probe)
    ids = {id(q) for q in cm.candidate_parameters()}
    opt = torch.optim.SGD([q for q in cm.parameters() if id(q) not in ids], lr=0.01, momentum=0.9, weight_decay=5e-4)
    cand_opt = torch.optim.Adam(cm.candidate_parameters(), lr=3e-3)
    steps = args.search_epochs * len(train_l)
    count = {"n": 0}

    def after_step() -> None:  # score the second half only, as growkit.grow does
        count["n"] += 1
        if count["n"] == steps // 2:
            cm.reset_scores()

    sampler.set_epoch(0)
    st = train_steps(ddp, train_l, [opt, cand_opt], epochs=args.search_epochs, extra_loss=cm.extra_loss,
                     device=device, after_step=after_step, on_epoch_end=next_epoch)
    loss, acc = global_stats(st)
    scores = cm.scores()
    hi = torch.tensor(list(scores.values()), dtype=torch.float64, device=device)
    lo = hi.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    same = torch.equal(hi, lo)
    cm_acc = global_eval(cm)
    say(f"weak learning: global train loss {loss:.4f}, acc {100 * acc:.2f} %; global test acc {100 * cm_acc:.2f} %; "
        f"scores equal on every rank: {same}")
    say(f"local train loss {st.mean_loss:.4f}, acc {100 * st.train_accuracy:.2f} %; "
        f"scores {', '.join(f'{k} {v:+.4f}' for k, v in scores.items())}", True)

    # 3. grow the best points (the replicas are identical, so every rank grows the same model)
    best = sorted(scores, key=lambda k: -scores[k])[: args.points]
    grown = growkit.finalize(cm, max_ops=args.max_ops, points=best)  # a copy: single-process again
    cm.eval(), grown.eval()
    with torch.no_grad():
        x = next(iter(test_l))[0].to(device)
        exact = torch.equal(cm(x), grown(x))
    say(f"grew {', '.join(best)} with <= {args.max_ops} ops each; grown == candidate model at eta 0: {exact}")

    # 4. fine-tune the grown model under DDP, save on rank 0
    ddp = prepare_ddp(grown, probe_batch=probe)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sampler.set_epoch(0)
    st = train_steps(ddp, train_l, opt, epochs=args.finetune_epochs, device=device, on_epoch_end=next_epoch)
    desync(ddp)
    loss, acc = global_stats(st)
    grown_acc = global_eval(grown)
    say(f"fine-tune: global train loss {loss:.4f}, acc {100 * acc:.2f} %; global test acc {100 * grown_acc:.2f} %")
    say(f"local train loss {st.mean_loss:.4f}, acc {100 * st.train_accuracy:.2f} %", True)
    if rank == 0:
        out = Path(args.out)
        growkit.save(grown, out)
        reloaded = growkit.load(out, base_model=base, example_input=x[:1]).to(device).eval()
        grown.eval()
        with torch.no_grad():
            same = torch.equal(reloaded(x), grown(x))
        n_base = sum(q.numel() for q in base.parameters())
        n_grown = sum(q.numel() for q in grown.parameters())
        say(f"base test acc {100 * base_acc:.2f} % ({n_base:,} params) -> grown {100 * grown_acc:.2f} % "
            f"({n_grown:,} params, {len(growkit.plan_of(grown).edits)} branches); saved to {out}/, reload identical: {same}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
