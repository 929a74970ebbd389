"""Checkpoint folders, naming a model, and the fingerprint that ties a cache to its teacher.

A checkpoint folder (format 2) is a model folder its own library loads, plus kt's card:

- timm models: `config.json` (timm's hub config: architecture, num_classes, label_names, model_args,
  pretrained_cfg with mean/std/input_size/crop) + `model.safetensors`, the timm model's own state dict
  with the task head as timm's classifier. `timm.create_model("local-dir:DIR", pretrained=True)`
  rebuilds the model with its head, class names (`pretrained_cfg["label_names"]`) and preprocessing,
  and gives kt's logits.
- open_clip visual towers (`open_clip:ARCH`): `open_clip_config.json` (open_clip's hub schema:
  model_cfg + preprocess_cfg) + `model.safetensors`, the tower's own state dict with kt's head as
  `head.*`. open_clip has no loader for a tower alone: its `local-dir:` loads a whole CLIP strictly,
  text tower included, which kt never trains. What works is `open_clip.create_model("local-dir:DIR",
  load_weights=False, pretrained_image_path="DIR/model.safetensors")`: the config builds the model, the
  tower's weights load into `model.visual` (the `head.*` keys are reported unexpected and left out; the
  logits are `F.linear(model.visual(x), head.weight, head.bias)`).
- `card.json`: kt's own fields (arch as kt names it, task, classes, input size, normalisation, feature
  sizes, weight source, sha256 of model.safetensors, layout, run record). The card is written last: a
  folder with a card is complete.

Format 1 (before checkpoints became library folders) is card.json + model.safetensors in kt's layout
(`backbone.*`, `head.*`); it still loads, with the same outputs and the same fingerprint.

Naming a model: `load_model(spec)` takes a run folder (holding `checkpoint/`), a checkpoint folder (or a
file in it), or a model name with `pretrained` none | package | hub | PATH -- the one resolver behind
`kt-cache build --teacher`, `kt-student eval --checkpoint`, `finetune --init` / `--model` / `--pretrained`.

Fingerprints: a cache records its teacher's `model_fingerprint`, whose `weights_sha256` is the sha256 of
the checkpoint file the weights came from (of the bytes `save_checkpoint` would write, for weights not
loaded from a file). A format-1 checkpoint keeps its file and so its sha256: a cache built from it reads
against that checkpoint as before. Saving the same weights again writes format 2, other bytes, another
sha256: such a copy is, to a cache, another teacher.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from kt.config import utc_now
from kt.errors import UserError
from kt.models import WEIGHT_SOURCES, TaskModel, create_model, open_clip_model_cfg
from kt.segmentation import aspp_rates
from kt.weights import (LAYOUTS, file_sha256, load_exact, load_state, native_state, read_safetensors,
                        read_state_dict, safetensors_sha256, write_safetensors)

FORMAT_VERSION = 2
CHECKPOINT_DIR = "checkpoint"  # a run folder's checkpoint
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
TIMM_CONFIG_FILE = "config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
LIBRARY_CONFIG = {"timm": TIMM_CONFIG_FILE, "open_clip": OPEN_CLIP_CONFIG_FILE}
CHECKPOINT_FILES = (CARD_FILE, WEIGHTS_FILE, TIMM_CONFIG_FILE, OPEN_CLIP_CONFIG_FILE)


# ---------------------------------------------------------------------------------------- writing
def save_checkpoint(model: TaskModel, out_dir, classes: list[str] | None = None,
                    extra: dict | None = None) -> Path:
    """Write the checkpoint folder `out_dir` (weights, library config, card last); returns `out_dir`."""
    classes = list(classes) if classes is not None else model.classes
    if classes is not None and model.num_classes and len(classes) != model.num_classes:
        raise UserError(f"{len(classes)} class names for a head with {model.num_classes} outputs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout, state, config = _saved_form(model, classes)
    weights = out / WEIGHTS_FILE
    write_safetensors(state, weights)
    for name in LIBRARY_CONFIG.values():  # a folder re-used for another layout keeps no stale config
        if name != LIBRARY_CONFIG.get(layout):
            (out / name).unlink(missing_ok=True)
    if config is not None:
        _write_json(out / LIBRARY_CONFIG[layout], config)
    card = {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "arch": model.arch,
        "task": model.task,
        "num_classes": model.num_classes,
        "classes": classes,
        "image_size": model.image_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "embedding_dim": model.embedding_dim,
        "grid_dim": model.grid_dim,
        "pretrained": model.pretrained,
        "weights_sha256": file_sha256(weights),
        "kt_version": _kt_version(),
        "created": utc_now(),
        "extra": extra or {},
        **_segmentation_fields(model),
    }
    _write_json(out / CARD_FILE, card)
    model.card, model.classes = card, classes
    _remember_weights_file(model, weights)
    return out


def _segmentation_fields(model) -> dict:
    """What rebuilds a segmentation model beyond the classification card (absent for classification, so
    classification cards and fingerprints stay as they were)."""
    if model.task != "segmentation":
        return {}
    return {"output_stride": int(model.output_stride), "head_width": int(model.head_width),
            "aspp_rates": [int(r) for r in model.aspp_rates]}


def _saved_form(model: TaskModel, classes) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """(layout, state dict, library config) that `save_checkpoint` writes."""
    if model.task == "segmentation":
        # a restrided backbone with a DeepLabV3 head is no model timm or open_clip can rebuild from a config
        return native_state(model, kt_layout=True)[:2] + (None,)
    layout, state, reference = native_state(model)
    if layout == "timm":
        try:
            return layout, state, _timm_config(model, reference, classes)
        except Exception:  # timm cannot describe this model (e.g. an argument it cannot serialise): kt's layout
            return native_state(model, kt_layout=True)[:2] + (None,)
    return layout, state, _open_clip_config(model) if layout == "open_clip" else None


def _timm_config(model: TaskModel, reference: nn.Module, classes) -> dict:
    """config.json by timm's own writer, run on the meta-device reference (it has the head's num_classes)."""
    import tempfile

    from timm.models._hub import save_config_for_hf

    from kt.views import VIEW_PRESETS

    # preprocessing as kt evaluates: bicubic resize of the centre crop (timm's transform: resize to
    # size / crop_pct, then centre crop)
    data_config = {"input_size": (3, model.image_size, model.image_size), "mean": tuple(model.mean),
                   "std": tuple(model.std), "interpolation": "bicubic",
                   "crop_pct": VIEW_PRESETS["eval"].crop_pct, "crop_mode": "center"}
    model_config = {"label_names": list(classes)} if classes and model.num_classes else {}
    with tempfile.TemporaryDirectory() as tmp:  # timm's writer writes a file
        path = Path(tmp) / TIMM_CONFIG_FILE
        save_config_for_hf(reference, path, model_config=model_config, data_config=data_config)
        config = json.loads(path.read_text())
    # the upstream weights' tag (e.g. "lvd142m") does not describe kt-trained weights
    config.get("pretrained_cfg", {}).pop("tag", None)
    return config


def _open_clip_config(model: TaskModel) -> dict:
    """open_clip's hub folder schema; written here because open_clip's own writer
    (`open_clip.push_to_hf_hub.save_config_for_hf`) wants the whole CLIP model, which kt never builds."""
    size = getattr(model.backbone, "image_size", model.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {"model_cfg": open_clip_model_cfg(model.arch, int(size)),
            "preprocess_cfg": {"mean": list(model.mean), "std": list(model.std), "size": int(size),
                               "interpolation": "bicubic"}}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


# ---------------------------------------------------------------------------------------- reading
def checkpoint_folder(path) -> Path | None:
    """The checkpoint folder `path` names: a run folder (its `checkpoint/`), a checkpoint folder, or a file
    in one; None when it names none of these."""
    path = Path(path).expanduser()
    if path.is_file() and path.name in CHECKPOINT_FILES:
        path = path.parent
    if path.is_dir():
        for folder in (path, path / CHECKPOINT_DIR):
            if (folder / CARD_FILE).is_file():
                return folder
    return None


def load_checkpoint(path, image_size: int = 0) -> TaskModel:
    """Rebuild a model from a run folder, a checkpoint folder, or a file in one, for `image_size` px (0: the
    card's).

    At another size a ViT's position embeddings are resampled as for `--pretrained PATH`, so that a model
    trained at that size is the one its checkpoint rebuilds; what a model does not build from its input size
    stays as saved: a DeepLabV3 head keeps its own atrous rates (the card's `aspp_rates`; before they were
    recorded, those of the card's size), whatever the new grid. The weights' fingerprint is the file's
    either way: with the input size beside it in `model_fingerprint`, it names the outputs.
    """
    weights, card = _checkpoint_files(path)
    saved = int(card["image_size"])
    size = image_size or saved
    task = card.get("task", "classification")
    model = create_model(card["arch"], int(card["num_classes"]), "none", size, task,
                         output_stride=card.get("output_stride"), head_width=int(card.get("head_width", 256)))
    if task == "segmentation":
        rates = tuple(card.get("aspp_rates") or aspp_rates(saved // int(card["output_stride"])))
        if rates != model.aspp_rates:
            with torch.random.fork_rng(devices=[]):  # its init is overwritten: leave the caller's RNG alone
                model.reset_head(int(card["num_classes"]), aspp_rates=rates)
    state, layout = read_safetensors(weights), _layout(card, weights)
    try:
        load_exact(model, state, what=str(weights), layout=layout)
    except UserError as e:
        if size == saved:
            raise
        try:
            head_loaded = load_state(model, state, what=str(weights), layout=layout)
        except UserError as e2:
            raise UserError(f"checkpoint {weights.parent} was built for {saved} px and cannot be rebuilt for "
                            f"{size} px: {e2}") from e
        if model.head is not None and not head_loaded:
            raise UserError(f"checkpoint {weights.parent} was built for {saved} px: its head does not fit the "
                            f"model rebuilt for {size} px") from e
    model.pretrained = card.get("pretrained", "none")
    model.card = card
    model.classes = card.get("classes")
    _remember_weights_file(model, weights)
    return model.eval()


def load_model(spec: str, num_classes: int | None = None, pretrained: str = "none", image_size: int = 0,
               task: str = "classification", seed: int | None = None, what: str = "model",
               output_stride: int | None = None, head_width: int = 256) -> TaskModel:
    """The model `spec` names: a run folder, a checkpoint folder (or a file in it), or a model name.

    A checkpoint comes back as saved (head, classes, weights); an `image_size` other than its own rebuilds it
    for that size (`load_checkpoint`) and a `num_classes` other than its head's gives it a new head. A name is
    built by `kt.models.create_model` with `num_classes` outputs (default 0), at `image_size` (default 224), with
    weights from `pretrained`: none | package | hub | PATH (a run folder, checkpoint folder or state dict
    file; the head is kept where its shape fits). `seed` draws a random init from its own generator,
    leaving the global RNG alone (a teacher must be the same on every rank and rerun). `what` names the
    model in messages ("teacher", "--init"). `output_stride` and `head_width` are create_model's, for a
    segmentation model built by name.
    """
    spec, pretrained = str(spec), str(pretrained or "none")
    if not spec:
        raise UserError(f"no {what} given")
    if Path(spec).expanduser().exists():
        if pretrained != "none":
            raise UserError(f"--pretrained {pretrained} is for a model name; {spec} is a checkpoint and has its weights")
        model = load_checkpoint(spec, image_size)
        if num_classes is not None and num_classes != model.num_classes:
            model.reset_head(num_classes)
        return model
    if "/" in spec or spec.endswith((".safetensors", ".json", ".pt", ".pth")):  # meant as a path
        raise UserError(f"{what} not found: {spec} (give a run folder, a checkpoint folder or a model name)")
    source = pretrained if pretrained in WEIGHT_SOURCES else "none"
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = create_model(spec, num_classes or 0, source, image_size or 224, task,
                             output_stride=output_stride, head_width=head_width)
    if source != pretrained:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: TaskModel, path) -> None:
    """Weights into a model built by name from a run folder, checkpoint folder or state dict file."""
    given = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"pretrained weights not found: {given} "
                        f"(expected one of {', '.join(WEIGHT_SOURCES)} or a path)")
    if checkpoint_folder(path) is not None:
        weights, card = _checkpoint_files(path)
        if _base_arch(card.get("arch", "")) != _base_arch(model.arch):
            raise UserError(f"checkpoint {given} holds {card.get('arch')!r}, not {model.arch!r}")
        load_state(model, read_safetensors(weights), what=given, layout=_layout(card, weights))
    elif path.is_dir():
        raise UserError(f"{given} is a folder without {CARD_FILE}; give a run folder, a kt checkpoint "
                        "or a weights file")
    else:
        load_state(model, read_state_dict(path), what=given)
    model.pretrained = given


def _checkpoint_files(path) -> tuple[Path, dict]:
    """(weights file, card) of the checkpoint `path` names, checked; a UserError says what is wrong."""
    given = Path(path).expanduser()
    folder = checkpoint_folder(given)
    if folder is None:
        if given.is_dir():
            raise UserError(f"not a kt checkpoint: {given / CARD_FILE} is missing (nor is there a "
                            f"{CHECKPOINT_DIR}/{CARD_FILE})")
        raise UserError(f"not a kt checkpoint: {given} (give a run folder or the folder holding "
                        f"{CARD_FILE} and {WEIGHTS_FILE})")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    return weights, _read_card(folder / CARD_FILE)


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read checkpoint card {path}: {str(e)[:200]}") from e
    if not isinstance(card, dict):
        raise UserError(f"checkpoint card {path} is not a JSON object")
    missing = [k for k in ("arch", "num_classes", "image_size") if k not in card]
    if missing:
        raise UserError(f"checkpoint card {path} lacks {', '.join(missing)}")
    if card.get("format_version", 1) > FORMAT_VERSION:
        raise UserError(f"checkpoint card {path} has format {card['format_version']}; "
                        f"this kt reads up to {FORMAT_VERSION}")
    return card


def _layout(card: dict, weights: Path) -> str:
    layout = card.get("layout", "kt") if card.get("format_version", 1) >= 2 else "kt"
    if layout not in LAYOUTS:
        raise UserError(f"checkpoint {weights.parent} has an unknown layout {layout!r}; "
                        f"known: {', '.join(LAYOUTS)}")
    return layout


def _base_arch(name: str) -> str:
    return name.partition("@")[0]


# ---------------------------------------------------------------------------------------- fingerprints
def checkpoint_fingerprint(path) -> dict:
    """`model_fingerprint` of a checkpoint from its card and file alone, without building the model."""
    weights, card = _checkpoint_files(path)
    return {
        "arch": card["arch"],
        "task": card.get("task", "classification"),
        "num_classes": int(card["num_classes"]),
        "classes": card.get("classes"),
        "image_size": int(card["image_size"]),
        "mean": list(card["mean"]),
        "std": list(card["std"]),
        "weights_sha256": file_sha256(weights),
        **{k: card[k] for k in ("output_stride",) if k in card},
    }


def weights_sha256(path) -> str:
    """sha256 of a checkpoint's weights file (the checkpoint given as a folder or a file in it)."""
    path = Path(path)
    folder = checkpoint_folder(path)
    return file_sha256(folder / WEIGHTS_FILE if folder is not None and path.name != WEIGHTS_FILE else path)


def model_fingerprint(model: TaskModel) -> dict:
    """What identifies a model's outputs: architecture, task, classes, input, normalisation, weights, and
    for segmentation the output stride (the head width is in the weights).

    `weights_sha256` is the sha256 of the checkpoint file the weights came from while they are
    unchanged, otherwise of the bytes `save_checkpoint` would write (the same value for the same
    weights, so a saved-then-loaded model keeps its fingerprint).
    """
    return {
        "arch": model.arch,
        "task": model.task,
        "num_classes": model.num_classes,
        "classes": list(model.classes) if model.classes is not None else None,
        "image_size": model.image_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "weights_sha256": _model_weights_sha256(model),
        **{k: v for k, v in _segmentation_fields(model).items() if k == "output_stride"},
    }


def _model_weights_sha256(model: TaskModel) -> str:
    if model._weights_file is not None and model._weights_versions == _tensor_versions(model):
        if "_weights_sha256" not in model.__dict__:
            model._weights_sha256 = file_sha256(model._weights_file)
        return model._weights_sha256
    return safetensors_sha256(_saved_form(model, model.classes)[1])


def _remember_weights_file(model: TaskModel, weights: Path) -> None:
    model._weights_file = weights
    model.__dict__.pop("_weights_sha256", None)
    model._weights_versions = _tensor_versions(model)


def _tensor_versions(model: nn.Module) -> tuple:
    # Every in-place change (optimizer step, BN running stats, load_state_dict) bumps a version.
    return tuple(t._version for t in itertools.chain(model.parameters(), model.buffers()))


def _kt_version() -> str:
    try:
        from importlib.metadata import version

        return version("kt")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"
