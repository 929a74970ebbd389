"""What `kt-cache plan | info | verify` compute: predicted sizes, a cache's summary, and its verification.

`plan` predicts bytes per sample before a build from the codecs' layouts alone (PCA's size does not depend on
its fit). `info` summarises a store: teacher, views, targets and their codecs, completeness, bad samples, and
stored against predicted bytes. `verify` checks completeness and checksums, decodes every array, and re-runs
a sample of (key, view) pairs through the teacher on the replayed views: fidelity is the codec's loss against
the raw output, consistency is the cached value against the raw output encoded again (a cache that disagrees
with its own teacher by more than numerics between batch layouts is damaged). `teacher_cache/cli.py` turns
these results into text; the logic lives here so that tests and tools call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kt.config import check_config, field
from kt.errors import UserError

SHOW = 5  # bad samples / shard ids shown before "and N more"
_KEY_BYTES = 16  # assumed UTF-8 bytes per sample key when plan has no data to measure
_VLEN_OVERHEAD = 4  # Zarr's vlen-utf8 stores a 4-byte length before each key
# verify: a cached view "differs" from re-encoding a fresh teacher output when they disagree by more than
# what numerics between batch layouts explain (1e-6 level), which can move one int8 step at most
_CONSISTENT_KL = 1e-2  # nats, logits: KL(fresh re-encoded || cached)
_CONSISTENT_COS = 0.99  # features: min cosine(fresh re-encoded, cached) over vectors


@dataclass
class PlanConfig:
    teacher: str = field("", "teacher checkpoint, run folder or model name", required=True)
    pretrained: str = field("none", "weights when --teacher is a model name")
    image_size: int = field(0, "teacher input size (0: the checkpoint's)", min=0)
    targets: str = field("logits", "comma-separated: logits,embedding,patches or seg_logits,patches")
    views: int = field(4, "views per image", min=1)
    codec: list = field([], "TARGET=SPEC per target (see build)")
    num_samples: int | None = field(None, "transfer-set size (or give --data)", min=0)
    data: str = field("", "transfer-set shards, counted and their keys measured (or give --num-samples)")
    key_bytes: int = field(_KEY_BYTES, "bytes per key without --data", min=0)
    view_spec: str = field("train", "view preset name, JSON or file (for --measure)")
    measure: int = field(0, "views of --data's first images decoded and rendered as a build's DataLoader workers "
                            "do, to measure their CPU cost per view on these images (0: none)", min=0)
    labeled: str = field("", "labeled shards: report the teacher's top-1, agreement with its eval-view prediction "
                             "and confidence on views of their first --labeled-images images, for --view-spec and "
                             "the train and light presets (how to choose a view spec: docs/results.md)")
    labeled_images: int = field(300, "images of --labeled to render views of", min=1)
    json: bool = field(False, "print JSON instead of a table")


@dataclass
class InfoConfig:
    store: str = field("", "cache path or URL", positional=True, required=True)
    json: bool = field(False, "print JSON instead of text")


@dataclass
class VerifyConfig:
    store: str = field("", "cache path or URL", positional=True, required=True)
    teacher: str = field("", "teacher checkpoint (default: the one the cache was built with)")
    data: str = field("", "transfer-set shards (default: the input shards the cache records)")
    samples: int = field(64, "(key, view) pairs re-run through the teacher; 0 skips the fidelity check",
                         min=0)
    seed: int = field(0, "which pairs are sampled", min=0)
    batch_size: int = field(64, "teacher batch size for the re-run", min=1)
    json: bool = field(False, "print JSON instead of text")


# -------------------------------------------------------------------------------------------- plan
def predict_size(targets: dict[str, tuple[str, Sequence[int]]], views: int, num_samples: int,
                 key_bytes: float, param_dim: int | None = None) -> dict:
    """Bytes per sample and in total for `targets` {name: (codec spec, item shape)}, before lossless
    compression (zstd takes off more; Zarr metadata adds a few KiB). PCA's size does not depend on its fit;
    `auto` chooses at build time, so before it the prediction is its `int8` fallback, an upper bound
    (`at_most` is set), and after it (`kt-cache info`) the chosen codec's size. `param_dim`: floats a view's
    parameters take (`kt.views.view_dim`; a spec that mixes stores more)."""
    from kt.views import PARAM_DIM
    from kt.teacher_cache.codecs import AutoCodec, PcaCodec, parse_codec

    out: dict = {"views_per_image": views, "num_samples": num_samples, "targets": {}}
    per_sample = 0.0
    state = 0
    for name, (spec, item_shape) in targets.items():
        codec = parse_codec(spec, name)
        per_view = codec.bytes_per_item(tuple(item_shape))
        out["targets"][name] = {"codec": codec.spec, "item_shape": list(item_shape),
                                "bytes_per_view": per_view, "bytes_per_sample": per_view * views}
        per_sample += per_view * views
        if isinstance(codec, AutoCodec):
            out["targets"][name]["at_most"] = True
            out["at_most"] = True
        if isinstance(codec, PcaCodec):
            state += int(item_shape[-1]) * (codec.d + 1) * 4  # float32 basis and mean
    out["params_bytes_per_sample"] = views * (param_dim or PARAM_DIM) * 4
    out["key_bytes_per_sample"] = round(float(key_bytes) + _VLEN_OVERHEAD, 2)
    out["digest_bytes_per_sample"] = 8  # uint64 content digest
    per_sample += out["params_bytes_per_sample"] + out["key_bytes_per_sample"] + out["digest_bytes_per_sample"]
    out["bytes_per_sample"] = round(per_sample, 2)
    out["codec_state_bytes"] = state
    out["total_bytes"] = round(per_sample * num_samples) + state
    return out


def plan_cache(cfg: PlanConfig) -> dict:
    """Predicted sizes for building a cache of `cfg.teacher` over a transfer set (see `predict_size`)."""
    from kt.checkpoints import load_model
    from kt.teacher_cache.build import (check_teacher_targets, fit_default_codecs, item_shapes, parse_codecs,
                                        parse_targets)

    check_config(cfg)  # also when called as a library, not through build_config
    if (cfg.num_samples is None) == (not cfg.data):
        raise UserError("plan needs exactly one of --num-samples and --data")
    names = parse_targets(cfg.targets)
    codecs = parse_codecs(cfg.codec, names)
    key_bytes, num_samples = float(cfg.key_bytes), cfg.num_samples
    if cfg.data:
        num_samples, key_bytes = _count_samples(cfg.data)
    if num_samples < 0:
        raise UserError("--num-samples must be >= 0")
    model = load_model(cfg.teacher, pretrained=cfg.pretrained, image_size=cfg.image_size, seed=0,
                       what="teacher").eval()
    check_teacher_targets(names, model)
    image_size = cfg.image_size or model.image_size
    shapes = item_shapes(model, names, image_size)
    codecs = fit_default_codecs(codecs, shapes, cfg.codec)
    from kt.views import load_view_spec, view_dim

    spec = load_view_spec(cfg.view_spec)
    plan = predict_size({t: (codecs[t].spec, shapes[t]) for t in names}, cfg.views, num_samples, key_bytes,
                        view_dim(spec))
    out = {"teacher": model.arch, "image_size": image_size, **plan}
    if cfg.labeled:
        from kt.teacher_cache.view_quality import CANDIDATES, labeled_images, teacher_on_views
        from kt.views import VIEW_PRESETS

        specs = {cfg.view_spec: spec, **{c: VIEW_PRESETS[c] for c in CANDIDATES if VIEW_PRESETS[c] != spec}}
        out["teacher_on_views"] = teacher_on_views(model, labeled_images(cfg.labeled, cfg.labeled_images), specs,
                                                   min(cfg.views, 2), image_size)
    if cfg.measure:
        if not cfg.data:
            raise UserError("--measure needs --data: it renders views of the transfer set's own images")
        out["data_path"] = {"view_spec": cfg.view_spec,
                            **measure_data_path(cfg.data, spec, cfg.views, image_size,
                                                cfg.measure, model.mean, model.std)}
    return out


def measure_data_path(data: str, spec, views: int, image_size: int, n_views: int, mean, std) -> dict:
    """The CPU cost per view of a build's data path on these images: `ShardViewBatches` itself (what each
    DataLoader worker runs: read, digest, decode once per image at the scale its views allow, render every
    view, uint8 tensors for a GPU teacher) over the first `n_views` views of the data, on one thread. From
    it, the worker cores a build needs per 1,000 views/s of teacher (a ViT-L/14 in bf16 forwards ~2,000 a
    second on an H100/H200, docs/capacity.md). Images unlike the 500x375 photos the benchmarks use (a
    factory camera's 5 MP frames, 28 px scans) change this by 10x either way; hence measured, not quoted."""
    import io
    import time

    import torch
    from PIL import Image

    from kt.shards import BadSamples, expand_shards, image_ext, iter_samples
    from kt.teacher_cache.build import ShardViewBatches, ViewBatch
    from kt.views import ViewSet

    urls = expand_shards(data)
    sizes = []  # the first images' pixel sizes, from their headers
    for sample in iter_samples(urls, bad=BadSamples(max_fraction=1.0), decode=False, keep_raw=True):
        ext = image_ext(sample.raw)
        if ext is not None:
            try:
                sizes.append(Image.open(io.BytesIO(sample.raw[ext])).size)
            except Exception:  # noqa: BLE001 -- a corrupt image is skipped by the build too
                pass
        if len(sizes) * views >= n_views:
            break
    warm = 8  # views rendered before the clock starts: first calls and lazy imports (OpenCV: 0.1 s)
    dataset = ShardViewBatches(urls, ViewSet(spec, 0, views), image_size, mean, std, batch_size=warm, uint8=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core, as each DataLoader worker runs
    spent: list[tuple[int, float]] = []  # (views, CPU seconds) of each batch, the warm-up batch first
    try:
        for url in urls:
            batches = dataset.shard_batches(url)
            while sum(n for n, _ in spent[1:]) < n_views:
                start = time.process_time()
                item = next(batches, None)
                if item is None:
                    break
                if isinstance(item, ViewBatch):
                    spent.append((len(item.rows), time.process_time() - start))
    finally:
        torch.set_num_threads(threads)
    if not spent:
        raise UserError(f"--measure: no view could be rendered from {data}")
    # a tiny transfer set: its first views, start-up included, are all there is to time
    timed = spent[1:] or spent
    done, cpu = sum(n for n, _ in timed), sum(t for _, t in timed)
    ms = 1e3 * cpu / done
    w, h = (np.median([s[i] for s in sizes]) if sizes else 0 for i in (0, 1))
    return {"views": done, "views_per_image": views, "image_size": image_size,
            "median_source": f"{int(w)}x{int(h)}", "cpu_ms_per_view": round(ms, 3),
            "views_per_s_per_core": round(1e3 / ms), "cores_per_1000_views_per_s": round(ms, 2)}


def _count_samples(data: str) -> tuple[int, float]:
    """(samples, mean UTF-8 bytes per key) of a shard spec, reading members without decoding images."""
    from kt.shards import BadSamples, expand_shards, iter_samples

    n, key_total = 0, 0
    for sample in iter_samples(expand_shards(data), bad=BadSamples(max_fraction=1.0), decode=False):
        n += 1
        key_total += len(sample.key.encode())
    return n, key_total / max(n, 1)



# -------------------------------------------------------------------------------------------- info
def cache_info(url: str) -> dict:
    """Everything `kt-cache info` shows, as JSON-ready data."""
    from kt.teacher_cache.store import CacheStore

    store = CacheStore.open(url)
    attrs = store.attrs
    done = store.completed()
    expected = attrs.get("input_shards") or {}
    incomplete = sorted(set(expected) - set(done))
    partial = sorted(set(store.shards_present()) - set(done))
    samples = sum(m["n_samples"] for m in done.values())
    bad = [{"shard": sid, **b} for sid, m in sorted(done.items()) for b in m["bad"]]
    targets = {}
    for name, entry in attrs["targets"].items():
        targets[name] = {"codec": entry["codec"], "item_shape": entry.get("item_shape")}
        state = store.read_codec_state(name)
        if state is not None and state[0].get("explained_variance") is not None:
            targets[name]["explained_variance"] = state[0]["explained_variance"]
        if state is not None and state[0].get("selection") is not None:  # `auto`: what it chose, how faithful
            targets[name].update(chosen=state[0]["spec"], selection=state[0]["selection"])
    key_bytes = _mean_key_bytes(store, done)
    views = int(attrs["view"]["views_per_image"])
    from kt.views import ViewSpec, view_dim

    predicted = predict_size({t: (e.get("chosen", e["codec"]), e["item_shape"]) for t, e in targets.items()},
                             views, samples, key_bytes, view_dim(ViewSpec.from_dict(attrs["view"]["spec"])))
    stored = store.nbytes_stored()
    return {
        "url": url,
        "format": attrs.get("kt_cache_format"),
        "teacher": attrs["teacher"],
        "view": attrs["view"],
        "targets": targets,
        "shards": {"complete": len(done), "expected": len(expected) if expected else None,
                   "incomplete": incomplete, "written_without_marker": partial},
        "samples": samples,
        "bad": {"count": sum(m["n_bad"] for m in done.values()), "first": bad[:SHOW]},
        "bytes": {"stored": stored, "predicted": predicted["total_bytes"],
                  "stored_over_predicted": round(stored / predicted["total_bytes"], 3) if predicted["total_bytes"]
                  else None, "predicted_per_sample": predicted["bytes_per_sample"],
                  "stored_per_sample": round(stored / samples, 1) if samples else None},
        "created": attrs.get("created"),
        "git_revision": attrs.get("git_revision"),
        "versions": attrs.get("versions"),
    }


def _mean_key_bytes(store, done: dict) -> float:
    if not done:
        return _KEY_BYTES
    try:
        keys = store.array(next(iter(done)), "keys")[...]
    except Exception:  # noqa: BLE001 -- a damaged shard: `info` still reports, `verify` names the damage
        return _KEY_BYTES
    return float(np.mean([len(str(k).encode()) for k in keys])) if len(keys) else _KEY_BYTES


# ------------------------------------------------------------------------------------------ verify
def verify_cache(url: str, teacher: str | None = None, data: str | None = None, samples: int = 64,
                 seed: int = 0, batch_size: int = 64) -> dict:
    """Completeness, checksums, decode of every array and fidelity on `samples` replayed views.

    Returns {"ok", "problems": [...], "shards": {...}, "fidelity": {target: ...}, "consistency": {...}}.
    Damage goes into "problems"; bad input (a teacher of another fingerprint, missing data) raises UserError.
    """
    from kt.teacher_cache.reader import CacheReader

    reader = CacheReader(url)
    store, attrs = reader.store, reader.attrs
    problems: list[str] = []
    done = store.completed()
    expected = attrs.get("input_shards") or {}
    incomplete = sorted(set(expected) - set(done))
    if incomplete:
        problems.append(f"{len(incomplete)} of {len(expected)} input shards incomplete: {listing(incomplete)}")
    checked = 0
    for shard_id in sorted(done):
        found = store.verify_shard(shard_id)
        problems += found
        checked += 1
    codec_problems = store.verify_codec_states()
    problems += codec_problems
    # with a damaged codec state every row of its target decodes wrong: no decode or fidelity check past it
    decodable = {} if codec_problems else done

    # decode every array; keep the sampled rows for the fidelity check
    rng = np.random.default_rng(seed)
    total = sum(m["n_samples"] for m in decodable.values())
    picks = np.sort(rng.choice(total, size=min(samples, total), replace=False)) if samples > 0 and total else []
    picked: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    for shard_id in sorted(decodable):
        n = decodable[shard_id]["n_samples"]
        rows = [int(p - offset) for p in picks if offset <= p < offset + n]
        picked[shard_id] = [(r, int(rng.integers(reader.views_per_image))) for r in rows]
        offset += n
    cached: dict[str, list] = {}  # shard_id -> [(key, view, params, {target: decoded})]
    for shard_id in sorted(decodable):
        try:
            shard = reader.shard(shard_id, check_views=True)
            decoded = {}
            for name in reader.targets:
                for start in range(0, max(len(shard), 1), 512):
                    chunk = shard.get(name, slice(start, start + 512))
                    if not np.isfinite(chunk).all():
                        problems.append(f"{shard_id}: target {name} decodes to non-finite values")
                        break
                if picked[shard_id]:
                    decoded[name] = shard.get(name, np.array([r for r, _ in picked[shard_id]]))
            cached[shard_id] = [(shard.keys[r], v, shard.params[r, v], {t: decoded[t][i, v] for t in decoded},
                                 _partner(shard, r, v)) for i, (r, v) in enumerate(picked[shard_id])]
        except UserError as e:  # ViewReplayError, a missing array
            problems.append(f"{shard_id}: {e}")
        except Exception as e:  # noqa: BLE001 -- a corrupt chunk: report and go on
            problems.append(f"{shard_id}: cannot decode ({type(e).__name__}: {e})")

    report: dict = {"url": url, "shards": {"complete": len(done), "expected": len(expected) or None,
                                           "checked": checked}, "samples_checked": 0}
    if any(cached.values()):
        fid, cons, bad_pairs = _fidelity(reader, cached, teacher, data, batch_size)
        report.update(fidelity=fid, consistency=cons, samples_checked=sum(len(v) for v in cached.values()))
        if bad_pairs:
            first = bad_pairs[0]
            problems.append(f"{len(bad_pairs)} of {report['samples_checked']} sampled views differ from a fresh "
                            f"teacher forward on the replayed view (first: {first})")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _partner(shard, row: int, view: int) -> tuple[str, np.ndarray] | None:
    """A mixed view's partner in its shard: (key, its parameters for the same view index); None for other views."""
    from kt.views import partner_row

    partner = partner_row(shard.params[row, view], row, len(shard.keys))
    return None if partner is None else (shard.keys[partner], shard.params[partner, view])


def _fidelity(reader, cached: dict, teacher: str | None, data: str | None, batch_size: int):
    """Per target, codec fidelity (cached vs raw) and consistency (cached vs raw re-encoded) on replayed views."""
    import torch

    from kt.checkpoints import model_fingerprint
    from kt.shards import BadSamples, expand_shards, iter_samples
    from kt.render import render_view, to_tensor
    from kt.teacher_cache.build import load_teacher, teacher_outputs
    from kt.teacher_cache.codecs import fidelity
    from kt.teacher_cache.store import check_compatible, shard_id_for

    attrs = reader.attrs
    build_cfg = attrs.get("build_config") or {}
    path = teacher or build_cfg.get("teacher")
    if not path:
        raise UserError("the cache does not record its teacher; pass --teacher (or --samples 0)")
    if data:
        urls = {shard_id_for(u): u for u in expand_shards(data)}
    else:
        urls = dict(attrs.get("input_shards") or {})
    # as the build loaded it (a model name built at an output stride takes the transfer set's classes)
    model = load_teacher(path, build_cfg.get("pretrained", "none"), build_cfg.get("image_size", 0),
                         None if teacher else build_cfg.get("output_stride"), ["patches"], list(urls.values()))
    try:
        check_compatible(attrs, {"teacher": model_fingerprint(model)})
    except UserError as e:
        raise UserError(f"teacher {path} is not the cache's teacher: {e}") from None
    image_size = attrs["view"].get("image_size") or model.image_size

    pairs = []  # (key, view, params, cached targets, image)
    for shard_id, items in cached.items():
        if not items:
            continue
        if shard_id not in urls:
            raise UserError(f"no data shard for cache shard {shard_id}; pass --data with the transfer set")
        want = {key: i for i, (key, *_rest) in enumerate(items)}
        want.update({mate[0]: -1 for *_rest, mate in items if mate is not None and mate[0] not in want})
        images = {}
        # every sample read on the way is checked against its stored content digest (not only the wanted)
        content = reader.shard(shard_id, [], check_views=False)
        for sample in iter_samples([urls[shard_id]], bad=BadSamples(max_fraction=1.0), digest=True):
            if sample.key in content.rows:
                content.check_content(sample.key, sample.digest, urls[shard_id])
            if sample.key in want:
                images[sample.key] = sample.image
                if len(images) == len(want):
                    break
        missing = [k for k in want if k not in images]
        if missing:
            raise UserError(f"data shard {urls[shard_id]} lacks cached keys {listing(missing)}; "
                            "is --data the transfer set the cache was built from?")
        pairs += [(key, v, params, dec, images[key], None if mate is None else (images[mate[0]], mate[1]))
                  for key, v, params, dec, mate in items]

    raw_all: dict[str, list] = {t: [] for t in reader.targets}
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        x = torch.stack([to_tensor(render_view(img, params, image_size, *(mate or ())), model.mean, model.std)
                         for _, _, params, _, img, mate in batch])
        with torch.inference_mode():
            out = teacher_outputs(model, x, reader.targets)
        for t in reader.targets:
            raw_all[t].append(out[t])
    fid, cons, bad_pairs = {}, {}, []
    for t in reader.targets:
        raw = np.concatenate(raw_all[t])
        dec = np.stack([p[3][t] for p in pairs])
        codec = reader.codecs[t]
        again = codec.decode(codec.encode(raw))
        fid[t] = {"codec": codec.spec, **fidelity(t, raw, dec)}
        cons[t] = fidelity(t, again, dec)
        for i, (key, v, *_rest) in enumerate(pairs):
            f = fidelity(t, again[i:i + 1], dec[i:i + 1])
            if f.get("kl_max", 0.0) > _CONSISTENT_KL or f.get("top1_agreement", 1.0) < 1.0 \
                    or f.get("cosine_min", 1.0) < _CONSISTENT_COS:
                bad_pairs.append(f"{t} of {key} view {v}: {', '.join(f'{k} {x:.4g}' for k, x in f.items())}")
    return fid, cons, bad_pairs



def listing(items: Sequence[str]) -> str:
    return ", ".join(items[:SHOW]) + (f" and {len(items) - SHOW} more" if len(items) > SHOW else "")
