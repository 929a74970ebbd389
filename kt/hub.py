"""Foundation-model weights from the Hugging Face Hub (`--pretrained hub`): where timm and open_clip look for
them, and the one line a user gets when they are not there.

Both libraries fetch hub weights through huggingface_hub, which answers from its local cache first:
`HF_HUB_CACHE` (default `$HF_HOME/hub`, `~/.cache/huggingface/hub`), one folder per repo,
`models--ORG--NAME/{refs/main, snapshots/REVISION/FILE, blobs/}`. A cluster without network gets the weights by
copying a cache filled elsewhere (`hf download REPO --cache-dir DIR`) and setting `HF_HUB_OFFLINE=1`, under
which nothing is downloaded (docs/weights.md). What kt adds is the message: the repo id, the files and the cache
folder that were searched, instead of a library's "check your connection".
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from kt.errors import UserError, one_line

# The weight files each library asks a repo for when its config names none, in the order it asks (timm
# `load_state_dict_from_hf`, open_clip `download_pretrained_from_hf`): the safetensors file first.
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class HubSource:
    """Where a library fetches a model's weights: a Hugging Face repo and the files it asks for, or a URL."""

    repo: str = ""
    files: tuple[str, ...] = ()
    url: str = ""

    def describe(self) -> str:
        if self.repo:
            return f"{' or '.join(self.files)} of {self.repo}"
        return self.url or "an unknown location"


def _with_safe_alternative(filename: str) -> tuple[str, ...]:
    """A named pickle and the safetensors file both libraries try before it."""
    if not filename.endswith(".bin"):
        return (filename,)
    safe = {"pytorch_model.bin": "model.safetensors",
            "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(filename, filename[:-4] + ".safetensors")
    return safe, filename


def timm_source(name: str) -> HubSource:
    """Where `timm.create_model(name, pretrained=True)` gets its weights (the name may carry a `.tag`)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return HubSource()
    if cfg.hf_hub_id:
        files = _with_safe_alternative(cfg.hf_hub_filename) if cfg.hf_hub_filename else TIMM_FILES
        return HubSource(repo=cfg.hf_hub_id, files=files)
    return HubSource(url=cfg.url or cfg.file or "")


def open_clip_source(arch: str, tag: str) -> HubSource:
    """Where `open_clip.create_model(arch, pretrained=tag)` gets its weights."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" or "org/name/file"
        return HubSource(repo=repo, files=_with_safe_alternative(filename) if filename else OPEN_CLIP_FILES)
    return HubSource(url=cfg.get("url") or cfg.get("file") or "")


def hub_error(name: str, source: HubSource, error: BaseException) -> UserError:
    """The one line for hub weights of `name` that did not load: offline, what was missing where."""
    from huggingface_hub import constants, try_to_load_from_cache

    cache = constants.HF_HUB_CACHE
    if not source.repo:
        return UserError(f"cannot get hub weights for {name} from {source.describe()}: {one_line(error)}")
    if constants.HF_HUB_OFFLINE and not any(isinstance(try_to_load_from_cache(source.repo, f, cache_dir=cache), str)
                                            for f in source.files):
        return UserError(f"cannot get hub weights for {name}: HF_HUB_OFFLINE is set and the Hugging Face cache "
                         f"{cache} holds no {source.describe()}; stage the repo there (docs/weights.md) or pass "
                         "--pretrained PATH")
    return UserError(f"cannot get hub weights for {name} from {source.repo} (Hugging Face cache {cache}): "
                     f"{one_line(error)}")


@contextlib.contextmanager
def library_errors_quiet():
    """Silence what a library logs at ERROR while it fails (open_clip logs its download error, then raises it):
    the raised error becomes the one line a user sees."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)
