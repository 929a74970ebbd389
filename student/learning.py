"""What a distillation run learned, against what it cost: the Learning contract of DESIGN.md.

`kt-student train` reports, beside its checkpoint:
- the student's top-1 agreement with the teacher on the views it trained on, per epoch (the objective's `agree`,
  averaged over the epoch's batches on the main process): how close it came to the function it was asked to copy;
- with `--val-data` (labeled shards the transfer set does not hold), the student's accuracy as distilled (top-1,
  or mIoU for segmentation) at the end and every `--eval-every` optimizer steps: what the copy is worth on the task;
- each against the samples seen (optimizer steps x batch size x accumulation x processes, nominal: an epoch's last
  batches may hold fewer) and the CPU seconds spent (this process and its DataLoader workers, `resource.getrusage`;
  workers count once they have exited, at each epoch's end, so records inside an epoch miss the current workers'
  share) and the wall time.

One JSON line per record in `OUT/learning.jsonl` (a curve: agreement and accuracy vs samples and CPU time) and the
last one, with the per-epoch agreement, in `OUT/learning.json`. A resumed run continues the counts from the last
record (CPU time spent after it by the killed process is lost to the count). Evaluation runs on the main process;
the other ranks wait for it at their next collective.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Sequence

LEARNING_LOG = "learning.jsonl"
LEARNING_SUMMARY = "learning.json"


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its exited children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Learning:
    """Records agreement and, with validation data, accuracy against samples seen and CPU time (module docstring)."""

    def __init__(self, out: Path, samples_per_step: int, val_urls: Sequence[str] | None = None,
                 eval_every: int = 0, task: str = "classification", is_main: bool = True, workers: int = 0):
        self.out, self.samples_per_step, self.val_urls = Path(out), samples_per_step, list(val_urls or [])
        self.eval_every, self.task, self.is_main, self.workers = eval_every, task, is_main, workers
        self.cpu0, self.wall0 = cpu_seconds(), time.perf_counter()
        self.cpu_before = self.wall_before = 0.0  # what earlier invocations of a resumed run spent
        self.epochs: dict[int, list[float]] = {}  # epoch -> [sum of agree, batches]
        log = self.out / LEARNING_LOG
        if log.exists() and log.read_text().strip():
            last = json.loads(log.read_text().strip().splitlines()[-1])
            self.cpu_before, self.wall_before = last["cpu_s"], last["wall_s"]
            self.epochs = {int(k): v for k, v in last.get("agree_sums", {}).items()}

    def observe(self, epoch: int, metrics: dict) -> None:
        """One batch's objective metrics (its `agree`, where the objective has one)."""
        if "agree" in metrics:
            s = self.epochs.setdefault(epoch, [0.0, 0])
            s[0] += float(metrics["agree"])
            s[1] += 1

    def agreement(self) -> dict[int, float]:
        return {e: s / n for e, (s, n) in sorted(self.epochs.items()) if n}

    def step(self, global_step: int, epoch: int, model) -> None:
        """After each optimizer step: evaluate when `--eval-every` says so."""
        if self.eval_every and self.val_urls and global_step % self.eval_every == 0:
            self.record(global_step, epoch, model)

    def record(self, global_step: int, epoch: int, model) -> dict:
        """Append one record (evaluating `model` on the validation data, if any) and return it."""
        rec = {"step": global_step, "epoch": epoch, "samples": global_step * self.samples_per_step,
               "cpu_s": round(self.cpu_before + cpu_seconds() - self.cpu0, 1),
               "wall_s": round(self.wall_before + time.perf_counter() - self.wall0, 1)}
        agree = self.agreement()
        if agree:
            rec["agree"] = round(agree[max(agree)], 4)  # the latest epoch's mean so far
        if self.is_main and self.val_urls:
            rec.update(self.evaluate(model))
        rec["agree_sums"] = {str(e): v for e, v in self.epochs.items()}
        self.last = rec
        if self.is_main:
            with open(self.out / LEARNING_LOG, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def evaluate(self, model) -> dict:
        import torch

        was_training = model.training
        try:
            with torch.no_grad():
                if self.task == "segmentation":
                    from kt.student.segmentation import evaluate_segmentation

                    return {"val_miou": round(evaluate_segmentation(model, self.val_urls, workers=self.workers)["miou"], 4)}
                from kt.student.evaluate import evaluate

                return {"val_top1": round(evaluate(model, self.val_urls, workers=self.workers)["top1"], 4)}
        finally:
            model.train(was_training)

    def finish(self, global_step: int, epoch: int, model) -> dict:
        """The final record, also written as `learning.json` with the per-epoch agreement."""
        last = getattr(self, "last", None)
        evaluated = last is not None and (not self.val_urls or {"val_top1", "val_miou"} & set(last))
        rec = dict(last) if evaluated and last["step"] == global_step else self.record(global_step, epoch, model)
        rec.pop("agree_sums", None)
        summary = {**rec, "agree_per_epoch": [round(a, 4) for a in self.agreement().values()]}
        if self.is_main:
            (self.out / LEARNING_SUMMARY).write_text(json.dumps(summary, indent=1))
        return summary
