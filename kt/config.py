"""Dataclass configs: defaults with reasons, one YAML file, command-line overrides, run records.

Each component owns a dataclass whose fields carry their default and, in `metadata["help"]`, the reason
for it (shown by `--help`). `add_config_args` turns the fields into `--field-name` flags whose default
is "not given", so the precedence is: dataclass default < `--config FILE.yaml` < explicit flag
(timm's `train.py` reads the YAML into parser defaults the same way). `write_run_record` puts the
resolved config, the git revision and the package versions beside every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from kt.errors import UserError

T = TypeVar("T")
_UNSET = object()
_BOOL_FLAGS: set[str] = set()  # every boolean flag `add_config_args` declared (`explicit_bools`)
_BOOL_WORDS = {"1", "true", "yes", "on", "0", "false", "no", "off", "none", "null"}

PACKAGES = ("kt", "torch", "torchvision", "timm", "open_clip_torch", "webdataset", "zarr", "numcodecs",
            "accelerate", "safetensors", "faiss-cpu", "numpy", "pillow")


def field(default: Any, help: str, *, positional: bool = False, required: bool = False,  # noqa: A002
          min: float | None = None, max: float | None = None, gt: float | None = None,  # noqa: A002
          choices: Sequence[Any] | None = None, **kw) -> Any:
    """A dataclass field with its reason and its valid values; mutable defaults are copied per instance.

    `positional`: the command line takes it as a bare argument (`kt-cache info STORE`) instead of a flag.
    `required`: the resolved value (after YAML and flags) must not be empty. Checked in `build_config`, not by
    argparse, so a YAML file may supply it.
    `min`/`max` bound a number inclusively, `gt` exclusively, `choices` lists the valid values; `build_config`
    checks them for every command the same way (`check_config`), so a bad value is one line, not a traceback
    deep in a library or a run that "completes" doing nothing.
    """
    meta: dict[str, Any] = {"help": help, "positional": positional, "required": required}
    for name, value in (("min", min), ("max", max), ("gt", gt)):
        if value is not None:
            meta[name] = value
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def valid_range(f: dataclasses.Field) -> str:
    """The valid values of a field in words ('' when it declares none)."""
    m = f.metadata
    if "choices" in m:
        return "one of " + ", ".join(map(str, m["choices"]))
    parts = []
    if "gt" in m:
        parts.append(f"> {m['gt']}")
    if "min" in m:
        parts.append(f">= {m['min']}")
    if "max" in m:
        parts.append(f"<= {m['max']}")
    return " and ".join(parts)


def check_config(cfg: Any, name: Callable[[str], str] | None = None) -> None:
    """Raise `UserError` naming the first field whose value is outside its declared range or choices.

    The field is named by its flag (`--epochs`), or by `name(field)` when given (a recipe names its own fields)."""
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if dataclasses.is_dataclass(value):  # a nested config (curate's IVF-PQ knobs) has its own ranges
            check_config(value, None if name is None else lambda n, outer=f.name: name(f"{outer}.{n}"))
        if value is None or not ({"min", "max", "gt", "choices"} & set(m)):
            continue
        items = value if isinstance(value, list) else [value]  # a list's bounds are each item's
        if "choices" in m:
            bad = any(v not in m["choices"] for v in items)
        else:
            bad = any(isinstance(v, bool) or not isinstance(v, (int, float)) or v != v
                      or ("min" in m and v < m["min"]) or ("max" in m and v > m["max"]) or ("gt" in m and v <= m["gt"])
                      for v in items)
        if bad:
            where = name(f.name) if name is not None else f.name.upper() if m.get("positional") \
                else _flag(f.name)
            raise UserError(f"{where} {value!r}: must be {valid_range(f)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `list[str]` -> list; plain types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def yaml_value(tp: Any, value: Any, where: str) -> Any:
    """A YAML value as the field's type, as its flag would give it: a string goes through the flag's parser
    (PyYAML reads `1e-3` as a string), an integral float is an int; a value of another type is refused in one
    line (a `batch_size: 32.5` ran one 400-item batch as an "epoch", a float epoch count crashed mid-run). A
    mapping for a text field is passed as its JSON text (`view_spec: {scale: [0.2, 1]}`, as `--view-spec`
    takes it); a nested config (a dataclass field) takes its mapping as it is."""
    base = _base_type(tp)
    if value is None or dataclasses.is_dataclass(base) or base in (dict, Any):
        return value
    try:
        if isinstance(value, str):
            if base is str:
                return value
            return _parse_value(tp, value)
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and float(value).is_integer():
            return int(value)
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, (dict, list)):
            return json.dumps(value)
        if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if base is list and isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    except (ValueError, argparse.ArgumentTypeError):
        pass
    raise UserError(f"{where}: expected {_type_words(tp)}, got {value!r}")


def _type_words(tp: Any) -> str:
    base = _base_type(tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", list: "a list"}.get(
        base, getattr(base, "__name__", str(base)))


def _parse_value(tp: Any, text: str) -> Any:
    base = _base_type(tp)
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    if base is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
    if base is list:
        return [s for s in text.split(",") if s]
    return base(text)


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add `--field-name` flags for every field of `cls` (plus `--config`).

    A boolean field takes `--name`, `--name false` and `--no-name`; a positional field is a bare argument.
    """
    hints = typing.get_type_hints(cls)
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", type=Path, default=None, help="YAML file setting any of these fields")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = "required" if f.metadata.get("required") else f"default: {default}"
        valid = valid_range(f)
        helptext = f"{f.metadata.get('help', '')} ({kind}{'; ' + valid if valid else ''})"
        helptext = helptext.replace("%", "%%")  # argparse formats help with %: "40% fewer" broke --help
        parse = lambda s, tp=tp: _parse_value(tp, s)  # noqa: E731
        metavar = _base_type(tp).__name__.upper()
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=_UNSET, type=parse, metavar=f.name.upper(), help=helptext)
        elif _base_type(tp) is list:  # `--runs a b c` and `--runs a,b,c` alike
            parser.add_argument(_flag(f.name), dest=f.name, default=_UNSET, nargs="+", type=parse, metavar=metavar,
                                help=helptext)
        elif _base_type(tp) is bool:
            _BOOL_FLAGS.add(_flag(f.name))
            parser.add_argument(_flag(f.name), dest=f.name, default=_UNSET, nargs="?", const=True, type=parse,
                                metavar=metavar, help=helptext)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                                default=_UNSET, help=argparse.SUPPRESS)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=_UNSET, type=parse, metavar=metavar,
                                help=helptext)


def explicit_bools(argv: Sequence[str] | None) -> list[str]:
    """The command line with `true` after a boolean flag whose next word is not a boolean: argparse's optional
    value takes the next word whatever it is (`kt-cache info --json STORE` took STORE for --json's value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    for i, word in enumerate(argv):
        out.append(word)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if word in _BOOL_FLAGS and following is not None and not following.startswith("-") \
                and following.lower() not in _BOOL_WORDS:
            out.append("true")
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of field: value")
    return data


def build_config(cls: type[T], args: argparse.Namespace | None = None, **overrides: Any) -> T:
    """Resolve `cls` from its defaults, `args.config` (YAML), explicit flags in `args`, then `overrides`."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) if args is not None else None
    if config_path is not None:
        data = load_yaml(config_path)
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown field(s) in {config_path}: {', '.join(unknown)} "
                            f"(valid: {', '.join(sorted(names))})")
        # a config whose file layout differs from its flags (a nested mapping whose knobs are also flat
        # flags) rewrites the file's values here, before the flags, so the flags still override them
        if hasattr(cls, "values_from_yaml"):
            data = cls.values_from_yaml(data, config_path)
        hints = typing.get_type_hints(cls)
        values.update({k: yaml_value(hints[k], v, f"{config_path}: {k}") for k, v in data.items()})
    if args is not None:
        given = {k: v for k, v in vars(args).items() if k in names and v is not _UNSET}
        for k, v in given.items():  # list flags arrive as one parsed list per word: flatten
            if isinstance(v, list) and all(isinstance(x, list) for x in v):
                given[k] = [item for part in v for item in part]
        values.update(given)
    values.update(overrides)
    cfg = cls(**values)
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and getattr(cfg, f.name) in (None, "", [], {}):
            where = f.name.upper() if f.metadata.get("positional") else _flag(f.name)
            raise UserError(f"{where} is required")
    check_config(cfg)
    return cfg


def config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def accelerate_cpu() -> bool:
    """Whether accelerate should run on CPU processes: asked for (ACCELERATE_USE_CPU), or no CUDA. Without
    `cpu=True` on a CUDA-less machine, accelerate ignores torchrun's ranks and every process thinks it
    is alone."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


# ------------------------------------------------------------------------------------- run records
def git_revision(path: str | Path | None = None) -> str | None:
    """The git revision of the kt source tree (with `-dirty` when it has uncommitted changes)."""
    root = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_record(cfg: Any = None) -> dict:
    """What was run, from which code, with which packages: stored beside every output."""
    record = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "git_revision": git_revision(),
        "versions": package_versions(),
        "created": utc_now(),
        "host": platform.node(),
        "pid": os.getpid(),
    }
    if cfg is not None:
        record["config"] = config_dict(cfg)
    return record


def write_run_record(out_dir: str | Path, cfg: Any) -> dict:
    """Write `config.yaml` (the resolved config, reusable with `--config`) and `run.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = run_record(cfg)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(record["config"], sort_keys=False))
    (out_dir / "run.json").write_text(json.dumps(record, indent=2))
    return record
