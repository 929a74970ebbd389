"""The run-folder policy (`kt.student.loop.check_out_dir`) across kt versions: a field added to a config after
a run started is not a difference while the run uses its default."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from kt.config import config_dict, field
from kt.errors import UserError
from kt.student.loop import check_out_dir


@dataclass
class Cfg:
    lr: float = field(0.1, "learning rate")
    task: str = field("classification", "a field a later kt added")
    out: str = field("", "run folder")


def write_saved(out, cfg, drop=()):
    out.mkdir()
    saved = {k: v for k, v in config_dict(cfg).items() if k not in drop}
    (out / "config.yaml").write_text(yaml.safe_dump(saved))


def test_field_added_since_the_run_started_resumes_at_its_default(tmp_path):
    write_saved(tmp_path / "run", Cfg(), drop=("task",))
    assert check_out_dir(tmp_path / "run", Cfg()) is True


def test_field_added_since_but_set_to_another_value_is_another_run(tmp_path):
    write_saved(tmp_path / "run", Cfg(), drop=("task",))
    with pytest.raises(UserError, match="task"):
        check_out_dir(tmp_path / "run", Cfg(task="segmentation"))


def test_changed_field_is_another_run(tmp_path):
    write_saved(tmp_path / "run", Cfg())
    with pytest.raises(UserError, match="lr: 0.1 there, 0.2 now"):
        check_out_dir(tmp_path / "run", Cfg(lr=0.2))


# --- one process per run folder -------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from kt.student.loop import run_folder_lock
with run_folder_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(out):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_on_a_live_run_folder_is_refused_in_one_line(fmnist, tmp_path, capsys):
    from tests.test_finetune import finetune

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        capsys.readouterr()
        assert finetune(fmnist, out) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"is in use by another kt process (pid {proc.pid})" in err[0], err
        assert not (out / "state").exists() and not (out / "config.yaml").exists()  # nothing written beside it
    finally:
        proc.kill()
        proc.wait()
    # the holder died without cleaning up (kill -9): the kernel dropped its lock, the folder is free
    assert finetune(fmnist, out) == 0
    assert (out / "checkpoint").exists()
    # a finished run's folder resumes (nothing to train) in the same process: the lock went with the first run
    assert finetune(fmnist, out) == 0


def test_a_refused_configuration_leaves_no_folder_behind(tmp_path):
    from kt.student.cli import main

    out = tmp_path / "never"
    assert main(["finetune", "--data", str(tmp_path / "missing"), "--model", "test_efficientnet",
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_a_folder_holding_only_a_lock_file_is_a_fresh_run_folder(tmp_path):
    from kt.student.loop import LOCK_FILE

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text("123")  # left by a run refused before it wrote anything
    assert check_out_dir(tmp_path / "run", Cfg()) is False
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no kt run"):
        check_out_dir(tmp_path / "run", Cfg())


@pytest.mark.parametrize("slow", ["loader", "step"])
def test_a_run_waiting_on_its_dataloader_says_so(tmp_path, monkeypatch, capsys, slow):
    """`fit` times how long its steps wait for batches (the first of each epoch left out): a data-bound run
    ends with one line naming the DataLoader and the knobs; a run bound by its steps says nothing."""
    import time

    import torch

    from kt.student.loop import LoaderClock, OptimConfig, fit

    monkeypatch.setattr(LoaderClock, "MIN_S", 0.0)
    model = torch.nn.Linear(4, 1)

    def loader(epoch):
        for i in range(6):
            if slow == "loader":
                time.sleep(0.05)
            yield torch.full((2, 4), float(i))

    def loss_fn(modules, batch):
        if slow == "step":
            time.sleep(0.05)
        return modules(batch).pow(2).mean(), {}

    fit(OptimConfig(epochs=2, lr=1e-3, save_minutes=0), model, loader, 6, loss_fn, tmp_path / "run",
        desc="kt-student train", prepare_loader=False)
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "waited on the DataLoader" in line]
    if slow == "loader":
        assert len(said) == 1 and said[0].startswith("kt-student train: ") and "--workers" in said[0], err
    else:
        assert not said, err


def test_the_data_bound_line_suggests_the_gpu_render_only_where_a_command_has_it(monkeypatch):
    import torch

    from kt.student.loop import LoaderClock

    clock = LoaderClock()
    clock.start -= 100.0  # a 100 s run ...
    clock.waited = 60.0  # ... that waited 60 s for batches
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "--render cuda" in clock.hint("distill", render_flag=True)
    assert "--render cuda" not in clock.hint("finetune", render_flag=False)
    assert "60%" in clock.hint("finetune")
    clock.waited = 10.0
    assert clock.hint("distill", render_flag=True) is None


def test_a_run_killed_with_its_dataloader_workers_alive_can_be_rerun_at_once(fmnist, tmp_path, capsys):
    """kill -9 of a run whose DataLoader workers are alive: the workers (forked; they outlive their parent for a
    few seconds) must not hold the run folder's lock, so the same command rerun at once resumes."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from kt.student.cli import main
    from tests.test_finetune import TINY

    out = tmp_path / "run"
    args = ["finetune", "--data", str(fmnist["root"] / "train"), *TINY, "--workers", "2", "--epochs", "1000",
            "--save-every", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "kt.student.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        progress = out / "state" / "progress.json"
        deadline = time.monotonic() + 120
        while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress.exists(), "the run saved nothing"
        workers = psutil.Process(proc.pid).children()
        proc.kill()
        proc.wait()
        assert len(workers) >= 2 and all(w.is_running() for w in workers)  # alive after their parent's death
        step = json.loads(progress.read_text())["global_step"]
        capsys.readouterr()
        assert main(args + ["--stop-after-steps", str(step + 1)]) == 0
        assert "resuming at epoch" in capsys.readouterr().out
        assert json.loads(progress.read_text())["global_step"] == step + 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the killed run's workers, if still there
