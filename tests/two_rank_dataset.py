"""Launched as each of two processes (`accelerate launch --multi_gpu --num_processes 2 tests/two_rank_dataset.py
CACHE DATA OUT`): runs `kt-student train` recording the keys of every batch its step receives, then reads a
`CacheDataset` whose rank and world size come from the process group, and writes both to OUT/rank{R}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kt.models import create_model
from kt.student import distill
from kt.student.cli import main
from kt.student.dataset import CacheDataset

if __name__ == "__main__":
    cache, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    consumed = []
    forward = distill.Distiller.forward

    def recording(self, batch):
        consumed.append(list(batch["keys"]))
        return forward(self, batch)

    distill.Distiller.forward = recording
    code = main(["train", "--model", "test_vit", "--cache", cache, "--data", data, "--image-size", "32",
                 "--batch-size", "16", "--epochs", "2", "--workers", "0", "--seed", "3", "--objective", "task",
                 "--out", str(out / "run")])
    student = create_model("test_vit", image_size=32)
    dataset = CacheDataset(cache, data, image_size=32, mean=student.mean, std=student.std, targets=["logits"],
                           batch_size=16, workers=0, seed=3)
    epochs = []  # the batches' keys, per epoch
    for epoch in range(2):
        dataset.set_epoch(epoch)
        epochs.append([list(batch["keys"]) for batch in dataset.loader()])
    rank = dataset.spec.rank
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": dataset.spec.world_size, "train": consumed,
                                                       "epochs": epochs}))
    sys.exit(code)
