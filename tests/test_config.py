import argparse
import json
from dataclasses import dataclass

import pytest
import yaml

from kt.config import add_config_args, build_config, field, write_run_record
from kt.errors import UserError


@dataclass
class Cfg:
    lr: float = field(0.1, "reason")
    epochs: int = field(3, "reason")
    name: str = field("a", "reason")
    n: int | None = field(None, "reason")
    tags: list = field([], "reason")


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, Cfg)
    return p.parse_args(argv)


def test_precedence_default_yaml_flag(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"lr": 0.5, "epochs": 7}))
    assert build_config(Cfg, parse([])) == Cfg()
    assert build_config(Cfg, parse(["--config", str(y)])) == Cfg(lr=0.5, epochs=7)
    cfg = build_config(Cfg, parse(["--config", str(y), "--lr", "0.01", "--n", "4", "--tags", "x,y"]))
    assert (cfg.lr, cfg.epochs, cfg.n, cfg.tags) == (0.01, 7, 4, ["x", "y"])
    assert build_config(Cfg, parse(["--n", "none"])).n is None
    assert build_config(Cfg, parse(["--tags", "x", "y,z"])).tags == ["x", "y", "z"]


def test_unknown_yaml_field_and_missing_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lrr: 1\n")
    with pytest.raises(UserError, match="unknown field"):
        build_config(Cfg, parse(["--config", str(y)]))
    with pytest.raises(UserError, match="not found"):
        build_config(Cfg, parse(["--config", str(tmp_path / "nope.yaml")]))


def test_run_record_written(tmp_path):
    write_run_record(tmp_path, Cfg(lr=0.2))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == 0.2
    record = json.loads((tmp_path / "run.json").read_text())
    assert {"git_revision", "versions", "config", "created"} <= set(record)
    assert "torch" in record["versions"] and "timm" in record["versions"]


@dataclass
class Cmd:
    store: str = field("", "where", positional=True, required=True)
    data: str = field("", "shards", required=True)
    resume: bool = field(False, "continue")
    normalize: bool = field(True, "unit rows")


def parse_cmd(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, Cmd)
    return p.parse_args(argv)


def test_positional_required_and_boolean_flags(tmp_path):
    cfg = build_config(Cmd, parse_cmd(["s.zarr", "--data", "d", "--resume", "--no-normalize"]))
    assert (cfg.store, cfg.data, cfg.resume, cfg.normalize) == ("s.zarr", "d", True, False)
    assert build_config(Cmd, parse_cmd(["s", "--data", "d", "--resume", "false"])).resume is False
    with pytest.raises(UserError, match="--data is required"):
        build_config(Cmd, parse_cmd(["s"]))
    with pytest.raises(UserError, match="STORE is required"):
        build_config(Cmd, parse_cmd(["--data", "d"]))
    y = tmp_path / "c.yaml"  # a YAML file may supply required fields
    y.write_text(yaml.safe_dump({"store": "from-yaml", "data": "d"}))
    assert build_config(Cmd, parse_cmd(["--config", str(y)])).store == "from-yaml"


@pytest.mark.parametrize("cli", ["kt.student.cli", "kt.teacher_cache.cli", "kt.retrieval.cli"])
def test_every_subcommand_is_a_config(cli):
    """Each subcommand is declared through kt.config: it takes --config and every flag has a reason."""
    import importlib

    parser = importlib.import_module(cli).build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert subparsers.choices
    for name, sub in subparsers.choices.items():
        dests = {a.dest for a in sub._actions}
        assert "config" in dests, f"{cli} {name} takes no --config"
        for action in sub._actions:
            if action.dest not in ("help", "config", "codec_flags") and action.help != argparse.SUPPRESS:
                assert action.help and not action.help.startswith(" ("), f"{cli} {name} {action.dest}: no reason"
        text = sub.format_help()  # what --help prints: a "%" in a reason broke `kt-student train --help`
        assert "usage:" in text and "--config" in text, f"{cli} {name}"


def test_yaml_values_are_typed_as_their_flags(tmp_path):
    """A YAML value goes through its flag's parser: `1e-3` (a string to PyYAML) is a number, `'7'` an integer,
    an integral float an integer; a value the flag would refuse is refused in one line naming file and field
    (a float batch size ran one giant batch as an epoch; a float epoch count crashed mid-run)."""
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-3\nepochs: '7'\nn: 4.0\nname: 12\ntags: a,b\n")
    assert build_config(Cfg, parse(["--config", str(y)])) == Cfg(lr=0.001, epochs=7, name="12", n=4, tags=["a", "b"])
    for text, needle in (("epochs: 1.5", "epochs: expected an integer, got 1.5"),
                         ("epochs: true", "epochs: expected an integer, got True"),
                         ("lr: fast", "lr: expected a number, got 'fast'"),
                         ("n: [1]", "n: expected an integer, got [1]")):
        y.write_text(text)
        with pytest.raises(UserError, match=f"c.yaml: {needle}".replace("[", r"\[").replace("]", r"\]")):
            build_config(Cfg, parse(["--config", str(y)]))
    y.write_text("name: {scale: [0.2, 1]}")  # a mapping for a text field: its JSON text, as the flag takes it
    assert json.loads(build_config(Cfg, parse(["--config", str(y)])).name) == {"scale": [0.2, 1]}
