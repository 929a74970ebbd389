"""One Accelerate loop for every kt training job: finetuning (any model, the teacher included) and
distillation from the cache.

A job hands `fit` its trainable modules, a loader factory `make_loader(epoch)` whose batches are a pure
function of (seed, epoch, position), and a loss function. `fit` owns everything else: AdamW, cosine decay
with linear warm-up (per step), mixed precision through `accelerate`, gradient accumulation in windows
that end at every epoch end (so an epoch-end save never drops half-accumulated gradients), a progress
bar, metrics as JSONL plus TensorBoard through accelerate's trackers, and exact resume: the
accelerate state (model, optimizer, scheduler, RNG) and the position (epoch, step in epoch) are saved
every `save_every` optimizer steps, whenever `save_minutes` have passed since the last save, and at the end,
and a rerun of the same command continues from the last save, skipping the batches of the interrupted epoch
it had already taken. Saves are not tied to epochs: a finetune on 100 images has 3 steps an epoch, and a
save per epoch cost as much as the steps (docs/benchmarks.md). Every save falls between accumulation windows,
so wherever it falls, resume is exact.

A loader factory may also hand back the same loader every epoch (a DataLoader with persistent workers whose
sampler takes the epoch through `set_epoch`, `kt.student.data.labeled_loader`): `fit` then prepares it once
and sets the epoch on it, so worker processes start once per run instead of once per epoch.

The loop also owns the run-folder policy every command shares: an `--out` that holds the same run resumes,
one that holds another run (a field outside `RESUMABLE_CHANGES` differs) is refused, and `init_from_run` starts
a job from the model another run left in `checkpoint/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import yaml
from torch import nn

from kt.config import accelerate_cpu, config_dict, field
from kt.device import BOUND_MIN_S, BOUND_SHARE, CHANNELS_LAST_HELP, set_channels_last
from kt.errors import UserError
# CHECKPOINT_DIR, where a run leaves its model, is defined beside the checkpoint format (kt.checkpoints
# resolves run folders with it) and re-exported here for the commands that write runs.
from kt.checkpoints import CHECKPOINT_DIR, load_model  # noqa: F401

STATE_DIR = "state"


@dataclass
class OptimConfig:
    """What `fit` needs: the optimisation and bookkeeping half of every training config."""

    epochs: int = field(30, "passes over the data; small labeled sets need many", min=1)
    lr: float = field(1e-3, "AdamW peak learning rate after warm-up (0 freezes: tests)", min=0)
    weight_decay: float = field(0.05, "AdamW decoupled weight decay, the usual value for small nets", min=0)
    warmup_epochs: float = field(1.0, "linear warm-up length; keeps early steps from wrecking pretrained weights",
                                min=0)
    min_lr_ratio: float = field(0.01, "cosine decays to this fraction of lr", min=0, max=1)
    grad_accum: int = field(1, "optimizer step every N batches (effective batch = batch_size * N * processes); "
                               "the last window of an epoch may be shorter", min=1)
    grad_clip: float = field(0.0, "max gradient norm; 0 disables", min=0)
    mixed_precision: str = field("no", "accelerate mixed precision: no | fp16 | bf16",
                                 choices=("no", "fp16", "bf16"))
    save_every: int = field(0, "save resumable state every N optimizer steps (0: by time and at the end only)",
                            min=0)
    save_minutes: float = field(10.0, "also save resumable state when this many minutes have passed since the "
                                      "last save (0: never by time); a kill loses at most this much work", min=0)
    stop_after_steps: int = field(0, "stop (as if killed) after N optimizer steps; 0 runs to the end "
                                     "(tests, smoke runs)", min=0)
    log_every: int = field(10, "optimizer steps between metric log lines", min=1)
    channels_last: bool = field(False, CHANNELS_LAST_HELP)
    seed: int = field(0, "seeds data order, views and initialisation", min=0)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def create_accelerator(cfg: OptimConfig, out_dir: str | Path):
    """An Accelerator for one run. accelerate keeps its settings in a process-wide singleton; resetting
    it (but not the distributed state) lets one process run several jobs with different precision,
    as the demo harness, notebooks and in-process tests do."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    # without CUDA, accelerate only forms a multi-process (gloo) group when told it runs on CPU
    cpu = accelerate_cpu()
    # prepared loaders copy batches to the GPU asynchronously; the loaders pin them (kt.device.placement).
    # Gradient accumulation is fit's own (windows cut at epoch ends, which accelerate only does for loaders it
    # prepared itself, and the distillation stream is not one), so accelerate is told to step every batch
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1,
                       log_with="tensorboard", project_dir=str(out_dir), cpu=cpu,
                       dataloader_config=DataLoaderConfiguration(non_blocking=not cpu))


def _read_progress(out_dir: Path) -> dict | None:
    path = out_dir / STATE_DIR / "progress.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _state_paths(out_dir: Path) -> tuple[Path, Path, Path]:
    """The saved state, the save being written, the save being replaced."""
    return out_dir / STATE_DIR, out_dir / (STATE_DIR + ".tmp"), out_dir / (STATE_DIR + ".old")


def _complete(state: Path) -> bool:
    """Whether a saved state folder is whole. Its progress.json is written last, after a barrier that every
    rank's files precede, and a kill mid-write leaves a prefix of a JSON object, which never parses: a
    progress.json that parses proves the folder complete."""
    try:
        return isinstance(json.loads((state / "progress.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def _discard(state: Path) -> None:
    """Remove a state folder, its progress.json first, so a kill mid-removal never leaves one that looks whole."""
    if state.exists():
        (state / "progress.json").unlink(missing_ok=True)
        shutil.rmtree(state)


def _recover_state(out_dir: Path) -> None:
    """Leave the newest complete save in `state/`, whichever step of `_save_state` a kill interrupted.

    A save writes `state.tmp` (progress.json last), renames `state` to `state.old`, renames `state.tmp` to
    `state`, then removes `state.old`. A kill between the two renames left only `state.old` and a whole
    `state.tmp`, and the rerun started from step 0; a kill before the first left `state` one save behind a
    whole `state.tmp`. A whole `state.tmp` is always the newest save; else `state`; else `state.old`."""
    final, tmp, old = _state_paths(out_dir)
    if _complete(tmp):
        _discard(final)
        os.replace(tmp, final)
    elif not _complete(final) and _complete(old):
        _discard(final)
        os.replace(old, final)
    _discard(tmp)
    _discard(old)


def _save_state(accelerator, out_dir: Path, progress: dict) -> None:
    """Save to a fresh folder, then swap it in, so a kill during the save keeps the previous state (and a kill
    during the swap keeps one of the two: `_recover_state`)."""
    accelerator.wait_for_everyone()
    final, tmp, old = _state_paths(out_dir)
    if accelerator.is_main_process:
        _discard(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are written before progress.json marks the save whole
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress))
        _discard(old)  # a kill mid-removal left it; a folder in the way fails the rename
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _discard(old)
    accelerator.wait_for_everyone()


@dataclass
class FitResult:
    completed: bool
    global_step: int
    epoch: int
    last_metrics: dict
    is_main_process: bool = True


def _broadcast_flag(accelerator, flag: bool) -> bool:
    """The main process's `flag` on every process (one tiny collective; free with one process)."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    t = torch.tensor([int(flag)], device=accelerator.device)
    return bool(broadcast(t, from_process=0).item())


def _with_last(batches: Iterable) -> Iterator[tuple[Any, bool]]:
    """(batch, is_last_of_epoch): one batch of lookahead tells where the epoch ends, whatever the loader."""
    it = iter(batches)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


class LoaderClock:
    """How long the training loop waited for its batches, the first of each epoch left out (worker start-up):
    a step that waits on the DataLoader for a large share of the run is data-bound, whatever the model does."""

    SHARE, MIN_S = BOUND_SHARE, BOUND_MIN_S  # kt.device: when the data path is named as the run's limit

    def __init__(self):
        self.start, self.waited, self.startup = time.perf_counter(), 0.0, 0.0

    def batches(self, batches: Iterable) -> Iterator:
        it, first = iter(batches), True
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            spent = time.perf_counter() - t
            if first:
                self.startup += spent
            else:
                self.waited += spent
            first = False
            yield item

    def hint(self, desc: str, render_flag: bool = False) -> str | None:
        """One line naming the data path as the run's limit, or None; `render_flag`: the command has
        `--render cuda` to suggest."""
        run = time.perf_counter() - self.start - self.startup
        share = self.waited / max(run, 1e-9)
        if run < self.MIN_S or share <= self.SHARE:
            return None
        render = " or --render cuda (the workers then only decode)" if render_flag and torch.cuda.is_available() else ""
        return (f"{desc}: the steps waited on the DataLoader for {share:.0%} of the run: decoding and rendering "
                f"views limit it; try more --workers ({os.cpu_count()} cores here){render}")


def fit(cfg: OptimConfig, modules: nn.Module, make_loader: Callable[..., Iterable],
        steps_per_epoch: int | Sequence[int] | None,
        loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]], out_dir: str | Path,
        accelerator=None, desc: str = "train", prepare_loader: bool = True,
        loader_skips: bool = False, render_flag: bool = False,
        on_step: Callable[[int, int, bool, dict], None] | None = None) -> FitResult:
    """Train `modules` to minimise `loss_fn`; resumable from `out_dir/state`.

    Args:
        modules: everything with trainable parameters (model plus any projection heads).
        make_loader: epoch -> iterable of batches (a DataLoader; it is passed through accelerate).
        steps_per_epoch: batches per epoch for this process (sets the schedule length): one number, one per
            epoch, or None to take the length of the accelerate-prepared loader (which splits the batches of
            a map-style loader across processes).
        loss_fn: (prepared modules, batch) -> (scalar loss, dict of float metrics).
        prepare_loader: pass each epoch's loader through accelerate (map-style data: accelerate shards
            the batches across processes). False for streams that already split shards per rank.
        loader_skips: `make_loader(epoch, skip)` starts the epoch at batch `skip` itself (a stream that can
            seek); otherwise accelerate skips the first batches by reading them.
        render_flag: the command has `--render cuda`, which a data-bound run's closing line then suggests.
        on_step: called after every optimizer step with (global step, epoch, whether it ended the epoch, the mean
            of the metrics of the step's batches), on every process (a run's learning record, `kt.student.learning`).

    `make_loader` may return the same loader object for every epoch (persistent workers): it is prepared once
    and told the epoch by its `set_epoch`, which must make its batches those of that epoch.

    Gradient accumulation windows are `grad_accum` batches counted from each epoch's start, the last one
    cut at the epoch end (its gradient rescaled to the mean over its batches, like every other window's),
    so every save falls between windows and resume is exact whatever the epoch length.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator is None:
        accelerator = create_accelerator(cfg, out_dir)
    set_seed(cfg.seed)

    params = [p for p in modules.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # norms and biases, as timm's param_groups_weight_decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    if steps_per_epoch is None:
        steps_per_epoch = len(accelerator.prepare_data_loader(make_loader(0)))
    per_epoch = [steps_per_epoch] * cfg.epochs if isinstance(steps_per_epoch, int) else list(steps_per_epoch)
    if cfg.epochs and min(per_epoch[: cfg.epochs]) <= 0:
        raise UserError(f"{desc}: an epoch holds no full batch per process ({accelerator.num_processes} processes); "
                        "lower --batch-size or use more data")
    updates = [math.ceil(n / cfg.grad_accum) for n in per_epoch[: cfg.epochs]]
    total = sum(updates)
    schedule = cosine_with_warmup(total, int(cfg.warmup_epochs * (updates[0] if updates else 0)), cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    set_channels_last(modules, cfg.channels_last)  # in place (same Parameters); Adam's state follows their layout
    modules, optimizer = accelerator.prepare(modules, optimizer)
    # the scheduler steps once per optimizer update on every process; registered so save_state keeps it
    accelerator.register_for_checkpointing(scheduler)

    if accelerator.is_main_process:
        _recover_state(out_dir)
    accelerator.wait_for_everyone()
    progress = _read_progress(out_dir)
    start_epoch, skip, global_step = 0, 0, 0
    if progress is not None:
        saved_world = progress.get("world_size", accelerator.num_processes)
        if progress["batches_in_epoch"] and saved_world != accelerator.num_processes:
            raise UserError(f"{out_dir} stopped mid-epoch with {saved_world} processes; resume it with "
                            f"{saved_world} (the batch order of an epoch depends on it), not "
                            f"{accelerator.num_processes}")
        accelerator.load_state(str(out_dir / STATE_DIR))
        start_epoch, skip, global_step = progress["epoch"], progress["batches_in_epoch"], progress["global_step"]
        accelerator.print(f"{desc}: resuming at epoch {start_epoch}, batch {skip}, step {global_step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("tensorboard")  # logs under OUT/tensorboard
    log_path = out_dir / "metrics.jsonl"
    bar = tqdm(total=total, initial=global_step, desc=desc, disable=not accelerator.is_main_process,
               dynamic_ncols=True, mininterval=1.0)
    last: dict = {}
    running: dict[str, float] = {}
    n_running = 0

    last_save = time.monotonic()

    def save(epoch: int, batches_in_epoch: int) -> None:
        nonlocal last_save
        _save_state(accelerator, out_dir, {"epoch": epoch, "batches_in_epoch": batches_in_epoch,
                                           "global_step": global_step, "world_size": accelerator.num_processes})
        last_save = time.monotonic()

    def save_due() -> bool:
        by_steps = cfg.save_every and global_step % cfg.save_every == 0
        if not cfg.save_minutes:
            return bool(by_steps)
        by_time = time.monotonic() - last_save >= 60 * cfg.save_minutes
        # every process must take the same decision (a save is collective); the main process's clock decides
        return _broadcast_flag(accelerator, bool(by_steps or by_time))

    raw_loader = prepared = None
    saved_at = (start_epoch, skip)
    clock = LoaderClock()
    for epoch in range(start_epoch, cfg.epochs):
        if loader_skips:
            batches = make_loader(epoch, skip)
        else:
            loader = make_loader(epoch)
            if loader is not raw_loader:  # a loader made for this epoch (or the first of a persistent one)
                raw_loader = loader
                prepared = accelerator.prepare_data_loader(loader) if prepare_loader else loader
            if hasattr(prepared, "set_epoch"):
                prepared.set_epoch(epoch)
            batches = accelerator.skip_first_batches(prepared, skip) if skip else prepared
        batch_index = skip  # saves happen between windows only, so `skip` starts a window
        skip = 0
        window = 0  # batches accumulated since the last optimizer step
        in_window: dict[str, float] = {}  # their metrics, summed
        modules.train()
        for batch, epoch_end in _with_last(clock.batches(batches)):
            window += 1
            batch_index += 1
            sync = epoch_end or window == cfg.grad_accum
            # DDP all-reduces on the window's last backward only
            with contextlib.nullcontext() if sync else accelerator.no_sync(modules):
                loss, metrics = loss_fn(modules, batch)
                accelerator.backward(loss / cfg.grad_accum)
            metrics = {"loss": float(loss.detach()), **metrics}
            for k, v in metrics.items():
                running[k] = running.get(k, 0.0) + v
                in_window[k] = in_window.get(k, 0.0) + v
            n_running += 1
            if not sync:
                continue
            if window < cfg.grad_accum:  # a short window at the epoch end: the mean over its own batches
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(cfg.grad_accum / window)
            window_batches, window = window, 0
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(modules.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            global_step += 1
            bar.update(1)
            if on_step is not None:
                on_step(global_step, epoch, epoch_end, {k: v / window_batches for k, v in in_window.items()})
            in_window = {}
            if global_step % cfg.log_every == 0 or epoch_end:
                last = {k: v / n_running for k, v in running.items()}
                last.update(lr=scheduler.get_last_lr()[0], epoch=epoch, step=global_step)
                running, n_running = {}, 0
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                accelerator.log({k: v for k, v in last.items() if k not in ("epoch", "step")}, step=global_step)
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
            stop = bool(cfg.stop_after_steps and global_step >= cfg.stop_after_steps)
            if stop or save_due():
                saved_at = (epoch + 1, 0) if epoch_end else (epoch, batch_index)
                save(*saved_at)
            if stop:
                bar.close()
                accelerator.end_training()
                return FitResult(False, global_step, epoch, last, accelerator.is_main_process)
    if saved_at != (cfg.epochs, 0):  # the end is always saved: a rerun of a finished run trains nothing
        save(cfg.epochs, 0)
    bar.close()
    hint = clock.hint(desc, render_flag)
    if hint and accelerator.is_local_main_process:
        print(hint, file=sys.stderr)
    accelerator.end_training()
    return FitResult(True, global_step, cfg.epochs, last, accelerator.is_main_process)


# --- run folders: what a run folder may hold, and how a run starts from another ---

# fields that may change between a run and its resumption without making it another run
RESUMABLE_CHANGES = {"workers", "out", "val_data", "log_every", "save_every", "save_minutes", "stop_after_steps"}


LOCK_FILE = ".kt-run.lock"
# run-folder lock fds this process holds: a forked child (a DataLoader worker) closes its copies at once, since an
# flock belongs to the open file, which a child's inherited fd keeps open (and locked) after its parent died
_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def run_folder_lock(out: Path):
    """Hold `out` for one run: a second kt process on the same folder (a job submitted twice, a demo started twice)
    is refused in one line instead of both resuming from, and saving over, the same state. An flock, not a pid
    file: the kernel drops it when its holder dies (kill -9 and OOM included), so a crashed run never leaves a
    stale lock behind; forked DataLoader workers do not hold it (`_drop_inherited_locks`), so it goes with the
    run's own process. Taken by rank 0 only: the ranks of one distributed run share their folder. A folder this
    made and the run left empty (a refused configuration) is removed again."""
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"output folder {out} is in use by another kt process (pid {holder}); wait for it to "
                            "end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # releases the lock
        if created and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)


def locks_run_folder(run: Callable) -> Callable:
    """`run(cfg, ...)` under `run_folder_lock(cfg.out)`."""
    import functools

    @functools.wraps(run)
    def locked(cfg, *args, **kwargs):
        with run_folder_lock(Path(cfg.out)) if cfg.out else contextlib.nullcontext():
            return run(cfg, *args, **kwargs)

    return locked


def check_out_dir(out: Path, cfg, resumable: set[str] = RESUMABLE_CHANGES) -> bool:
    """True when `out` holds this same run (resume); raises `UserError` when it holds anything else."""
    if not out.exists() or not any(p.name != LOCK_FILE for p in out.iterdir()):
        return False
    saved = out / "config.yaml"
    if not saved.exists():
        raise UserError(f"output folder {out} is not empty and holds no kt run; choose another --out")
    before = yaml.safe_load(saved.read_text()) or {}
    now = config_dict(cfg)
    # a field kt gained after the run started ran at its default there: resuming at the default is the same run
    defaults = config_dict(type(cfg)())
    before = {**{k: defaults[k] for k in now.keys() - before.keys() if k in defaults}, **before}
    diff = [k for k in sorted(set(before) | set(now)) if k not in resumable and before.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"output folder {out} holds another run ({k}: {before.get(k)!r} there, {now.get(k)!r} now); "
                        f"choose another --out")
    return True


INIT_HEADS = ("auto", "keep", "new")


def init_from_run(run: str, num_classes: int, image_size: int, head: str = "new",
                  classes: list[str] | None = None, task: str = "classification"):
    """The distilled student of a `kt-student train` run (or any run, checkpoint folder or model name), and
    whether its task head was kept.

    `head`: "keep" keeps the checkpoint's task head (after task-oriented transfer it has learned the task);
    "new" replaces it with a fresh one; "auto" keeps it when the run was distilled with the `task` objective
    (read from the config stored in the checkpoint's card) and the head fits, and starts a new one otherwise.
    A head fits when it has `num_classes` outputs and, where both sides name their classes, the same classes
    in the same order (the same count in another order would silently mislabel every prediction).
    `task`: the task being finetuned; a run or checkpoint of the other task is refused (a model name is built
    for `task`). A segmentation run keeps its restrided backbone and, where it fits, its DeepLabV3 head.
    """
    if head not in INIT_HEADS:
        raise UserError(f"unknown --init-head {head!r}; choose from {', '.join(INIT_HEADS)}")
    model = load_model(run, num_classes=None if Path(run).expanduser().exists() else num_classes,
                       image_size=image_size, task=task, what="--init")
    if model.task != task:
        raise UserError(f"--init {run} is a {model.task} model; a {task} finetune needs a {task} run or checkpoint")
    objective = ((model.card.get("extra") or {}).get("run") or {}).get("objective")
    misfit = None
    if model.num_classes != num_classes:
        misfit = f"its head has {model.num_classes} outputs, the labeled set {num_classes} classes"
    elif model.classes and classes and list(model.classes) != list(classes):
        misfit = "its head's classes differ from the labeled set's (names or order)"
    if head == "keep" and misfit:
        raise UserError(f"--init-head keep: cannot keep the task head of {run}: {misfit}; use --init-head new")
    keep = head == "keep" or (head == "auto" and objective == "task" and misfit is None)
    if not keep:
        model.reset_head(num_classes)
    return model.train(), keep
