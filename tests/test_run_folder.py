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
