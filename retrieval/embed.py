"""Embedding stores from images, from files computed elsewhere, and from class-name prompts.

    kt-retrieve embed --encoder open_clip:ViT-L-14@openai --pretrained hub --data 'shards/{0..99}.tar' --out g.emb
    accelerate launch --multi_gpu --num_processes 8 -m kt.retrieval.cli embed ...   # ranks take disjoint shards
    kt-retrieve import --embeddings img_emb_0.npy --keys keys.txt --encoder open_clip:ViT-L-14@openai --out g.emb
    kt-retrieve embed-text --encoder open_clip:ViT-L-14@openai --classes classes.json --out q.emb

Image embeddings are the model's global feature of the deterministic `eval` view, L2-normalised by
default (the usual space for CLIP retrieval). `embed` commits shard by shard, so `--resume` continues a
killed run at the first unfinished shard.

Several processes: each rank embeds its own input shards (`kt.shards.split_urls`, rank and world size
from `accelerate.PartialState`), holds one shard's rows in memory and writes them as one part; the main
process appends parts to the store in input-shard order as they arrive, and after all ranks finish
(`wait_for_everyone`) the store holds every shard, exactly as a single process writes it (see
`kt.retrieval.embeddings` for why readers never see half a shard). The store is the only coordination. On a
host without GPUs, `accelerate launch --cpu --num_processes N` starts one process unless accelerate is
given an MPI hostfile; `accelerate launch --multi_gpu --num_processes N` (torchrun underneath) starts N
CPU processes that talk over gloo. Text queries average the normalised embeddings of every
template's prompt per class and normalise the mean (CLIP's zero-shot classifier recipe).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kt.config import field
from kt.errors import UserError, one_line
from kt.retrieval.embeddings import (
    StoreWriter,
    check_writable,
    from_arrays,
    is_normalized,
    l2_normalize,
    load_shards_done,
    parts_written,
    write_part,
    write_store,
)

DEFAULT_ENCODER = "open_clip:ViT-L-14@openai"  # the paper's retrieval encoder
RANDOM_INIT_SEED = 0  # random-init encoders (tests, smoke runs) are reproducible across runs


@dataclass
class EmbedConfig:
    """`kt-retrieve embed`."""

    encoder: str = field(DEFAULT_ENCODER, "a kt model name (timm or open_clip:ARCH@TAG)")
    pretrained: str = field("auto", "auto (hub for a model name; a run or checkpoint folder has its own weights) | "
                                    "none | package | hub | PATH (see kt.models)")
    data: str = field("", "shard spec: files, {a..b} braces, a directory, '::'-joined", required=True)
    out: str = field("", "embedding store to write", required=True)
    image_size: int = field(224, "encoder input size", min=8)
    batch_size: int = field(64, "images per forward pass", min=1)
    normalize: bool = field(True, "L2-normalise rows (--no-normalize keeps raw feature norms)")
    resume: bool = field(False, "continue a store at its first unfinished shard")
    device: str = field("auto", "auto (accelerate's device for this process) | cpu | cuda")
    precision: str = field("bf16", "encoder forward on CUDA: bf16 autocast (the encoder is the cost) | fp32; "
                                   "on CPU always fp32")


@dataclass
class ImportConfig:
    """`kt-retrieve import`: embeddings computed elsewhere."""

    embeddings: str = field("", "(N, D) .npy file", required=True)
    keys: str = field("", "text file, one key per line in row order", required=True)
    encoder: str = field("", "the encoder that made them (checked against the queries)", required=True)
    pretrained: str = field("auto", "its weights source, as for embed")
    normalize: bool = field(False, "L2-normalise the rows on import")
    out: str = field("", "embedding store to write", required=True)


@dataclass
class EmbedTextConfig:
    """`kt-retrieve embed-text`: per-class text queries."""

    encoder: str = field(DEFAULT_ENCODER, "open_clip:ARCH@TAG")
    pretrained: str = field("hub", "none | hub | PATH of an open_clip checkpoint")
    classes: str = field("", "JSON: list of names, {'classes': [...]} or {index: name}", required=True)
    templates: str = field("imagenet", "imagenet | simple | a file with one '{}' template per line")
    out: str = field("", "embedding store to write", required=True)
    device: str = field("cpu", "cpu | cuda")


def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def resolve_pretrained(encoder: str, pretrained: str) -> str:
    """`auto`: "none" when `encoder` is a run or checkpoint folder (no weights beyond its own, the tag such stores
    have always recorded, so they stay comparable; the fingerprint's weights hash tells folders apart), else
    "hub" (a name's published weights)."""
    if pretrained != "auto":
        return pretrained
    return "none" if Path(encoder).expanduser().exists() else "hub"


def encoder_fingerprint(name: str, pretrained: str, modality: str, model_fp: dict | None) -> dict:
    return {"name": name, "pretrained": pretrained, "modality": modality, "model": model_fp}


def embed_images(encoder: str, data: str, out: str, *, pretrained: str = "auto", image_size: int = 224,
                 batch_size: int = 64, normalize: bool = True, resume: bool = False, device: str = "auto",
                 precision: str = "bf16") -> dict:
    """Embed every sample of the shards `data` into the store `out`: this process's share of the shards.

    `device` "auto" is accelerate's device for this process (its own GPU under `accelerate launch`).
    `precision` is the encoder's on CUDA: bf16 autocast or fp32 (`kt.device`; CPU always runs fp32).
    Returns this process's summary; every process returns once the whole store is committed.
    """
    # the call as a config, before `device` and `pretrained` are resolved: the store records what was asked
    config = EmbedConfig(encoder=encoder, pretrained=pretrained, data=data, out=out, image_size=image_size,
                         batch_size=batch_size, normalize=normalize, resume=resume, device=device,
                         precision=precision)
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from kt.checkpoints import load_model, model_fingerprint
    from kt.device import placement
    from kt.shards import BadSamples, expand_shards, is_url, iter_samples, split_urls
    from kt.views import VIEW_PRESETS, render, sample_params, to_tensor

    # cpu=True lets torchrun-started ranks without GPUs form a gloo group instead of running alone
    state = PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    device = state.device if device == "auto" else torch.device(device)
    place = placement(device, precision)
    urls = [u if is_url(u) else os.path.abspath(u) for u in expand_shards(data)]
    pretrained = resolve_pretrained(encoder, pretrained)
    if pretrained == "none":
        torch.manual_seed(RANDOM_INIT_SEED)  # every rank draws the same random weights
    model = load_model(encoder, num_classes=0, pretrained=pretrained, image_size=image_size,
                       what="encoder").eval().to(device)
    fp = encoder_fingerprint(encoder, pretrained, "image", model_fingerprint(model))
    source = {"kind": "shards", "shards": urls}
    check_input_size(model, encoder)  # before the store exists, so a corrected rerun needs no --resume
    # every rank refuses, before any writes
    check_writable(out, model.embedding_dim, fp, resume, source, normalized=normalize)
    state.wait_for_everyone()
    writer = None
    if state.is_main_process:
        writer = StoreWriter(out, model.embedding_dim, fp, normalize, source, resume=resume, config=config)
        writer.consolidate(urls)  # parts a killed run left behind
    state.wait_for_everyone()

    # parts before commits: the main process commits a part before deleting it, so no shard slips between
    parts = parts_written(out)
    done = set(load_shards_done(out))
    # (index, url) pairs: shards are split by position, and the index orders the store's rows
    share = split_urls(list(enumerate(urls)), state.process_index, state.num_processes)
    mine = [(i, u) for i, u in share if u not in done and i not in parts]
    summary = {"out": out, "rank": state.process_index, "processes": state.num_processes,
               "shards_total": len(urls), "shards_skipped": len(share) - len(mine), "shards_embedded": 0,
               "samples": 0, "device": str(device)}
    spec = VIEW_PRESETS["eval"]
    bad = BadSamples()
    rank = f" (rank {state.process_index})" if state.num_processes > 1 else ""
    bar = tqdm(desc=f"embed{rank}", unit="img", total=None, mininterval=2.0, disable=None,
               position=state.process_index)
    for shard_idx, url in mine:
        vectors, keys, labels = [], [], []
        for batch in _batches(iter_samples([url], bad=bad), batch_size):
            x = torch.stack([to_tensor(render(s.image, sample_params(spec, 0, s.key, 0), model.image_size),
                                       model.mean, model.std) for s in batch])
            with torch.inference_mode(), place.teacher_autocast():
                emb = model.forward_features(place.to(x))["embedding"]
            emb = emb.float().cpu().numpy()
            vectors.append(l2_normalize(emb) if normalize else emb)
            keys += [s.key for s in batch]
            labels += [s.label for s in batch]
            bar.update(len(batch))
        rows = np.concatenate(vectors) if vectors else np.zeros((0, model.embedding_dim), np.float32)
        write_part(out, shard_idx, url, rows, keys, labels)  # the shard is done, all at once
        summary["shards_embedded"] += 1
        summary["samples"] += len(keys)
        if writer is not None:
            writer.consolidate(urls)  # this and other ranks' finished shards that continue the store
    bar.close()
    state.wait_for_everyone()
    if writer is not None:
        writer.consolidate(urls, require_all=True)
    state.wait_for_everyone()  # every rank returns with the store complete
    bad.check()
    return {**summary, "bad": len(bad.bad)}


def check_input_size(model, encoder: str) -> None:
    """One forward of a blank image at the encoder's input size: a size the encoder cannot take (a ViT's
    patch size must divide it) fails here in one line, not at the first batch, after `--out` was created."""
    import torch

    x = torch.zeros(1, 3, model.image_size, model.image_size, device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            model.forward_features(x)
    except torch.OutOfMemoryError:
        raise  # not the size's fault
    except (AssertionError, RuntimeError, ValueError) as e:  # timm asserts on sizes; torch raises on shapes
        raise UserError(f"{encoder} cannot embed {model.image_size} px images ({one_line(e)}); choose another "
                        "--image-size") from e


def check_finite(arr, keys: list[str], name: str, block_size: int = 65536) -> None:
    """Refuse NaN or infinite values (naming the first row and its key): faiss would rank them arbitrarily
    and the curated set would silently depend on garbage."""
    for start in range(0, arr.shape[0], block_size):
        block = np.asarray(arr[start:start + block_size], dtype=np.float32)
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if len(rows):
            total = sum(int((~np.isfinite(np.asarray(arr[s:s + block_size], dtype=np.float32)).all(axis=1)).sum())
                        for s in range(start, arr.shape[0], block_size))
            row = start + int(rows[0])
            raise UserError(f"{name}: {total} rows hold NaN or infinite values, e.g. row {row} (key {keys[row]!r}); "
                            "fix or drop them before importing")


def import_embeddings(embeddings: str, keys: str, encoder: str, out: str, *, pretrained: str = "auto",
                      normalize: bool = False, block_size: int = 65536) -> str:
    """A store from an (N, D) .npy (memmapped, copied in blocks) and a keys file, one key per line."""
    if not Path(embeddings).is_file():
        raise UserError(f"embeddings file not found: {embeddings}")
    if not Path(keys).is_file():
        raise UserError(f"keys file not found: {keys}")
    try:
        arr = np.load(embeddings, mmap_mode="r")
    except (ValueError, EOFError, OSError) as e:  # EOFError: an empty file; OSError: a damaged header
        raise UserError(f"cannot read {embeddings} as a .npy array: {one_line(e)}") from e
    if not isinstance(arr, np.ndarray):  # np.load opens a .npz as an archive of named arrays
        arr.close()
        raise UserError(f"{embeddings} is a .npz archive ({', '.join(arr.files[:3])}); save the (rows, dim) "
                        "array alone with numpy.save as a .npy")
    if arr.dtype.kind not in "iuf":
        raise UserError(f"{embeddings} holds {arr.dtype} values, not numbers")
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise UserError(f"{embeddings} must hold a non-empty (rows, dim) array, got shape {arr.shape}")
    key_list = Path(keys).read_text().splitlines()
    if len(key_list) != arr.shape[0]:
        raise UserError(f"{keys} has {len(key_list)} keys for {arr.shape[0]} embeddings; need one per row")
    check_finite(arr, key_list, embeddings, block_size)  # before the store exists: nothing half-written
    sample = np.asarray(arr[: min(len(arr), 10000)], dtype=np.float32)
    fp = encoder_fingerprint(encoder, resolve_pretrained(encoder, pretrained), "image", None)
    config = ImportConfig(embeddings=embeddings, keys=keys, encoder=encoder, pretrained=pretrained,
                          normalize=normalize, out=out)
    writer = StoreWriter(out, arr.shape[1], fp, normalize or is_normalized(sample),
                         {"kind": "import", "embeddings": os.path.abspath(embeddings), "keys": os.path.abspath(keys)},
                         config=config)
    all_normalized = True
    for start in range(0, arr.shape[0], block_size):
        block = np.asarray(arr[start:start + block_size], dtype=np.float32)
        if normalize:
            block = l2_normalize(block)
        all_normalized &= is_normalized(block)
        writer.append(block, key_list[start:start + block_size])
    writer.commit(normalized=all_normalized)
    return out


def load_class_names(path: str) -> list[str]:
    """Class names from JSON: a list, {"classes": [...]}, or {"0": name, "1": name, ...}."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"classes file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, dict):
        try:
            idx = {int(k): v for k, v in data.items()}
        except ValueError:
            raise UserError(f"{path}: class indices must be integers, got {sorted(data)[:3]}") from None
        missing = [i for i in range(max(idx, default=-1) + 1) if i not in idx]
        if missing:
            raise UserError(f"{path}: no class name for index {missing[0]} ({len(missing)} missing)")
        data = [idx[i] for i in range(len(idx))]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} must hold a non-empty list of class names")
    for i, name in enumerate(data):
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{path}: class {i} has no name ({name!r})")
    return data


TEMPLATE_SETS = ("imagenet", "simple")  # CLIP's 80-prompt ImageNet ensemble and its 7-prompt selection


def load_templates(arg: str) -> list[str]:
    """A named template list (imagenet, simple: open_clip's own, as its zero-shot evaluation uses them) or a
    text file with one `{}` template per line."""
    if arg in TEMPLATE_SETS:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        chosen = {"imagenet": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}[arg]
        return [template("{}") for template in chosen]  # open_clip keeps them as functions of the class name
    if not Path(arg).is_file():
        raise UserError(f"unknown templates {arg!r}: use {', '.join(TEMPLATE_SETS)} or a file with one template "
                        "per line")
    templates = [t for t in Path(arg).read_text().splitlines() if t.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UserError(f"{arg}: every template needs a '{{}}' for the class name" if bad else f"{arg} is empty")
    return templates


def create_text_encoder(encoder: str, pretrained: str):
    """The full open_clip model (text tower used) and its tokenizer, for `open_clip:ARCH[@TAG]`."""
    import open_clip
    import torch

    if not encoder.startswith("open_clip:"):
        raise UserError(f"embed-text needs an open_clip encoder (open_clip:ARCH@TAG), got {encoder}")
    arch, _, tag = encoder[len("open_clip:"):].partition("@")
    if arch not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {arch}")
    if pretrained == "hub":
        if not tag:
            raise UserError(f"--pretrained hub needs the weights named: open_clip:{arch}@TAG")
        weights = tag
    elif pretrained == "none":
        weights = None
        torch.manual_seed(RANDOM_INIT_SEED)
    else:
        if not Path(pretrained).is_file():
            raise UserError(f"weights file not found: {pretrained}")
        weights = pretrained
    try:
        model = open_clip.create_model(arch, pretrained=weights)
    except Exception as e:  # hub or file errors
        raise UserError(f"cannot create {encoder} ({pretrained}): {str(e).splitlines()[0]}") from e
    return model.eval(), open_clip.get_tokenizer(arch)


def embed_text(encoder: str, classes: str, out: str, *, templates: str = "imagenet", pretrained: str = "hub",
               device: str = "cpu") -> str:
    """One L2-normalised query per class: the mean of its prompts' normalised text embeddings."""
    import hashlib

    import torch

    names = load_class_names(classes)
    prompts = load_templates(templates)
    model, tokenizer = create_text_encoder(encoder, pretrained)
    model = model.to(device)
    rows = []
    with torch.inference_mode():
        for name in names:
            tokens = tokenizer([t.format(name) for t in prompts]).to(device)
            e = model.encode_text(tokens).float()
            e = e / e.norm(dim=-1, keepdim=True)
            rows.append(e.mean(0).cpu().numpy())
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not k.startswith("visual."):
            digest.update(k.encode())
            digest.update(v.detach().cpu().numpy().tobytes())
    fp = encoder_fingerprint(encoder, pretrained, "text", {"text_weights_sha256": digest.hexdigest()})
    emb = from_arrays(l2_normalize(np.stack(rows)), names, fp, labels=np.arange(len(names)), normalized=True)
    config = EmbedTextConfig(encoder=encoder, pretrained=pretrained, classes=classes, templates=templates,
                             out=out, device=device)
    write_store(out, emb, {"kind": "text", "classes": os.path.abspath(classes), "templates": templates,
                           "prompts": len(prompts)}, config=config)
    return out
