"""Simulate a kill right after the first epoch-end save, before the next optimizer step.

In-process tests call `install(monkeypatch)`; multi-process tests launch this file as the script
(`accelerate launch ... tests/kill_after_epoch.py train ...`), which runs `kt-student` with the kill installed
on every rank. A resumed run must then equal an uninterrupted one: nothing may be pending at a save.
"""

from __future__ import annotations

import sys

from kt.student import loop


class Killed(SystemExit):
    def __init__(self):
        super().__init__(3)


def killing_save(save):
    def wrapped(accelerator, out_dir, progress):
        save(accelerator, out_dir, progress)
        if progress["epoch"] == 1 and progress["batches_in_epoch"] == 0:
            raise Killed()

    return wrapped


def install(monkeypatch) -> None:
    monkeypatch.setattr(loop, "_save_state", killing_save(loop._save_state))


if __name__ == "__main__":
    from kt.student.cli import main

    loop._save_state = killing_save(loop._save_state)
    sys.exit(main())
