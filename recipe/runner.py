"""Running a plan: every stage through its own command, in dependency order, each once.

A stage runs in this process through its command's `main(argv)` (the argv `kt-recipe plan` prints), or, under
the recipe's launcher (`accelerate launch ...`) or beside other stages (`jobs` > 1), as `LAUNCHER -m MODULE
argv` in a subprocess. Its output goes to `OUT/logs/`; the console gets one line per stage.

`OUT/stages.json` records each stage's identity (its resolved config without the fields a resumed run may
change, `kt.recipe.plan`) when it starts, and its time when it finishes. Before anything runs, every recorded
stage is compared with the plan: a stage that ran with another value (a recipe field changed, or a command's
default) refuses the whole run with one line naming the field, so no report mixes runs of two recipes. A
stage recorded as finished whose output exists is skipped; any other reruns its command, which resumes where it
stopped (run folders, caches and embedding stores all resume), so a killed recipe, rerun, continues.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from kt.config import config_dict, utc_now
from kt.errors import UserError
from kt.recipe.plan import Plan, Stage

RECORDS = "stages.json"
LOGS = "logs"


class StageFailed(Exception):
    """A stage's command exited non-zero: `code` 2 is bad input (its one line in the message), else a crash."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Records:
    """`OUT/stages.json`: per stage, the identity it ran with, when it started and finished, how long it took, and
    which run of each stage it read (their start times). Written whole (tmp + rename) after every change."""

    def __init__(self, out: Path):
        self.path = out / RECORDS
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.lock = threading.Lock()

    def get(self, name: str) -> dict | None:
        return self.data.get(name)

    def started(self, stage: Stage) -> None:
        with self.lock:
            self.data[stage.name] = {"kind": stage.kind, "command": stage.shell(), "identity": stage.identity,
                                     "needs": {n: (self.data.get(n) or {}).get("started") for n in stage.needs},
                                     "started": utc_now(), "finished": None, "seconds": None}
            self._save()

    def finished(self, stage: Stage, seconds: float) -> None:
        with self.lock:
            self.data[stage.name].update(finished=utc_now(), seconds=round(seconds, 1))
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def is_done(stage: Stage, records: Records) -> bool:
    if stage.kind == "prepare":
        return stage.out.exists()
    rec = records.get(stage.name)
    return bool(rec and rec["finished"]) and stage.marker.exists()


def status(stage: Stage, records: Records) -> str:
    if is_done(stage, records):
        return "done"
    return "started" if records.get(stage.name) else "to run"


def check_unchanged(plan: Plan, records: Records) -> None:
    """Refuse, before anything runs, a plan in which a stage whose output exists would run otherwise. A stage whose
    output was removed runs again as the recipe says (and the stages made from it are then refused, by name)."""
    for stage in plan.stages.values():
        rec = records.get(stage.name)
        if rec is None or not stage.out.exists():
            continue
        before, now = rec["identity"], stage.identity
        # a field the command gained since the stage ran ran at its default there (as a run folder's own check
        # has it); one it no longer has, or no longer counts, is no difference
        defaults = config_dict(stage.command.config_class()()) if stage.command else {}
        changed = [k for k in sorted(now) if before.get(k, defaults.get(k)) != now[k]]
        if changed:
            k = changed[0]
            where = stage.origin.get(k) or f"the default of {stage.command.script} {' '.join(stage.command.words)} " \
                                           f"--{k.replace('_', '-')}"
            raise UserError(f"{where} changed ({before.get(k, defaults.get(k))!r} when stage {stage.name} ran, "
                            f"{now[k]!r} now): "
                            f"its outputs and the stages made from them would mix two recipes; use another out, or "
                            f"remove {stage.out} and what was made from it")
        for need in stage.needs:  # made from another run of a stage it reads: one that ran again, or will
            again = not is_done(plan.stages[need], records) or \
                rec["needs"].get(need) != (records.get(need) or {}).get("started")
            if again:
                raise UserError(f"stage {stage.name} was made from an earlier run of {need}, which has run again since "
                                f"(or will: its output is gone); use another out, or remove {stage.out}")


def select(plan: Plan, only: list[str] | None) -> list[str]:
    """The stages to run: all, or those matching the `only` patterns and the stages they need."""
    if not only:
        return list(plan.stages)
    matched = [n for n in plan.stages if any(fnmatch.fnmatch(n, p) for p in only)]
    if not matched:
        raise UserError(f"--only {' '.join(only)} matches no stage (kt-recipe plan lists them)")
    return plan.needed(matched)


def run_plan(plan: Plan, only: list[str] | None = None, verbose: bool = False) -> dict:
    """Run what has not finished; returns {stage: seconds} of the stages this call ran."""
    from kt.student.loop import run_folder_lock

    out = plan.out
    names = select(plan, only)
    with run_folder_lock(out):  # one recipe at a time in one out
        records = Records(out)
        check_unchanged(plan, records)
        shutil.copyfile(plan.path, out / "recipe.yaml")  # the recipe as last run, beside its outputs
        width = len(str(len(names)))
        ran: dict[str, float] = {}
        counter = iter(range(1, len(names) + 1))
        print_lock = threading.Lock()

        def progress(stage: Stage, text: str) -> None:
            with print_lock:
                print(f"[{next(counter):>{width}}/{len(names)}] {stage.kind:<8} {stage.name}  {text}", flush=True)

        def run_one(name: str) -> None:
            stage = plan.stages[name]
            records.started(stage)
            start = time.monotonic()
            execute(stage, plan, verbose)
            seconds = time.monotonic() - start
            records.finished(stage, seconds)
            ran[name] = seconds
            progress(stage, f"ran in {_duration(seconds)}{metric_text(stage)}")

        todo = []
        for name in names:
            stage = plan.stages[name]
            if is_done(stage, records):
                progress(stage, "done before" + metric_text(stage))
            else:
                todo.append(name)
        if plan.recipe.jobs == 1:
            for name in todo:
                run_one(name)
        else:
            _run_parallel(plan, todo, run_one)
    return ran


def _run_parallel(plan: Plan, todo: list[str], run_one) -> None:
    """Up to `jobs` stages at once (each a subprocess), each once every stage it needs has finished; the first
    failure stops new starts, and the running ones finish."""
    pending, running = list(todo), {}
    with ThreadPoolExecutor(plan.recipe.jobs) as pool:
        while pending or running:
            ready = [n for n in pending if not any(d in pending or d in running.values()
                                                    for d in plan.stages[n].needs)]
            for name in ready[:plan.recipe.jobs - len(running)]:
                pending.remove(name)
                running[pool.submit(run_one, name)] = name
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                running.pop(fut)
                fut.result()


def metric_text(stage: Stage) -> str:
    path = stage.metrics
    if path is None or not path.exists():
        return ""
    m = json.loads(path.read_text())
    return f"  top1 {100 * m['top1']:.2f}" if "top1" in m else f"  mIoU {100 * m['miou']:.2f}" if "miou" in m else ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def log_path(plan: Plan, stage: Stage) -> Path:
    return plan.out / LOGS / (stage.name.replace("/", "--") + ".log")


def execute(stage: Stage, plan: Plan, verbose: bool = False) -> None:
    """Run one stage: in this process, or as a subprocess (prepare steps, the launcher's kinds, jobs > 1)."""
    log = log_path(plan, stage)
    log.parent.mkdir(parents=True, exist_ok=True)
    recipe = plan.recipe
    if verbose:
        print("+ " + stage.shell(), flush=True)
    if stage.kind == "prepare":
        argv = stage.argv()
        argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
        code = _subprocess(argv, log, verbose, threads=None)
    elif recipe.launcher and stage.kind in recipe.launch:
        code = _subprocess([*launcher_words(recipe.launcher), "-m", stage.command.module, *stage.argv()], log, verbose,
                           threads="1" if recipe.jobs > 1 else None)
    elif recipe.jobs > 1:
        code = _subprocess([sys.executable, "-m", stage.command.module, *stage.argv()], log, verbose, threads="1")
    else:
        code = _in_process(stage, log, verbose)
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "(no output)"
        raise StageFailed(f"stage {stage.name} failed (exit {code}): {last} (log: {log})", code)


def launcher_words(launcher: str) -> list[str]:
    """The launcher's words; its program found beside this interpreter when it is not on PATH (a venv's
    `accelerate` run without activating the venv)."""
    words = shlex.split(launcher)
    if words and words[0] == "python":
        words[0] = sys.executable
    elif words and shutil.which(words[0]) is None:
        beside = Path(sys.executable).parent / words[0]
        if beside.exists():
            words[0] = str(beside)
    return words


def _subprocess(argv: list[str], log: Path, verbose: bool, threads: str | None) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:  # stages side by side: one torch thread each, unless the user set otherwise
        env.setdefault("OMP_NUM_THREADS", threads)
    with open(log, "a") as f:
        f.write(f"+ {shlex.join(argv)}\n")
        f.flush()
        try:
            return subprocess.run(argv, stdout=None if verbose else f, stderr=None if verbose else subprocess.STDOUT,
                                  env=env).returncode
        except FileNotFoundError:
            raise UserError(f"{argv[0]}: command not found") from None


def _in_process(stage: Stage, log: Path, verbose: bool) -> int:
    """`MODULE.main(argv)`: the command's own entry point, as `python -m MODULE argv` runs it."""
    main = importlib.import_module(stage.command.module).main
    with open(log, "a") as f:
        f.write(f"+ {stage.shell()}\n")
        f.flush()
        quiet = contextlib.ExitStack()
        if not verbose:
            quiet.enter_context(contextlib.redirect_stdout(f))
            quiet.enter_context(contextlib.redirect_stderr(f))
        with quiet:
            code = main(stage.argv())
    gc.collect()  # a stage's models and loaders go before the next stage's
    return code
