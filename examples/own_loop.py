"""Distill a timm model from a kt cache in a plain PyTorch loop: KL to the teacher's cached logits.

    python examples/own_loop.py --cache runs/cache.zarr --data data/transfer --model mobilevitv2_050 \
        --image-size 64 --epochs 10 --out student.safetensors
    torchrun --nproc_per_node 8 examples/own_loop.py ...      # DDP: each process reads its own shards

`CacheDataset` gives the batches `kt-student train` would train on (same views, targets, checks and sharding);
the rest is an ordinary loop. The output is the timm model's state dict (`timm.create_model(MODEL,
num_classes=K)` loads it); `kt-student finetune --pretrained FILE` takes it for the labeled stage.
"""

import argparse
import json
import os

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kt.student.dataset import CacheDataset
from kt.teacher_cache.reader import CacheReader


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--data", required=True, help="the transfer-set shards the cache was built from")
    parser.add_argument("--model", default="mobilevitv2_050")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="student.safetensors")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # started by torchrun
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=CacheReader(args.cache).num_classes).to(device)
    norm = timm.data.resolve_data_config({}, model=model)
    data = CacheDataset(args.cache, args.data, image_size=args.image_size, mean=norm["mean"], std=norm["std"],
                        targets=["logits"], batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    net = model
    if torch.distributed.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(data))
    t = args.temperature
    losses, agree = [], []
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        for batch in data.loader(pin_memory=cuda):
            x = batch["x"].to(device, non_blocking=True)
            teacher = batch["targets"]["logits"].to(device, non_blocking=True)
            student = net(x)
            loss = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                            reduction="batchmean") * t * t
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            agree.append((epoch, (student.argmax(1) == teacher.argmax(1)).float().mean().item()))
    rank = data.spec.rank
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, args.out)
    last = [a for e, a in agree if e == args.epochs - 1]
    summary = {"rank": rank, "processes": data.spec.world_size, "steps": len(losses), "losses": losses,
               "agreement_last_epoch": sum(last) / max(1, len(last))}
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
