"""kt.checkpoints / kt.weights: checkpoint folders that timm and open_clip load as they are, format-1
checkpoints, weights from paths, one way to name a model (run folder, checkpoint folder, model name)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kt.checkpoints import (checkpoint_fingerprint, load_checkpoint, load_model, model_fingerprint,
                            save_checkpoint, weights_sha256)
from kt.errors import UserError
from kt.models import create_model
from tests.test_models import _check_features

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"
CLASSES = ["cat", "dog", "bird"]


def _same_outputs(a, b, size, atol=0.0):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fa, fb = a.eval().forward_features(x), b.eval().forward_features(x)
    assert fa.keys() == fb.keys()
    for key in fa:
        torch.testing.assert_close(fa[key], fb[key], rtol=0, atol=atol)


def test_checkpoint_round_trip(tmp_path):
    model = create_model("fastvit_s12", num_classes=3, image_size=64).eval()
    before = model_fingerprint(model)
    out_dir = save_checkpoint(model, tmp_path / "ckpt", classes=["a", "b", "c"], extra={"epochs": 1})
    card = json.loads((out_dir / "card.json").read_text())
    assert card["arch"] == "fastvit_s12" and card["num_classes"] == 3 and card["image_size"] == 64
    assert card["classes"] == ["a", "b", "c"] and card["extra"] == {"epochs": 1}
    assert (card["embedding_dim"], card["grid_dim"]) == (1024, 1024)
    assert card["mean"] == list(model.mean) and card["weights_sha256"] == weights_sha256(out_dir)
    # The fingerprint of unsaved weights equals the sha256 of the file they save to.
    assert before["weights_sha256"] == weights_sha256(out_dir / "model.safetensors")

    for path in (out_dir, out_dir / "card.json", out_dir / "model.safetensors"):
        loaded = load_checkpoint(path)
        assert loaded.classes == ["a", "b", "c"] and loaded.card["arch"] == "fastvit_s12"
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            a, b = model.forward_features(x), loaded.forward_features(x)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    after = model_fingerprint(loaded)
    assert after == {**before, "classes": ["a", "b", "c"]}

    with torch.no_grad():
        loaded.head.bias.add_(1.0)  # changed weights must change the fingerprint
    assert model_fingerprint(loaded)["weights_sha256"] != before["weights_sha256"]


def test_pretrained_from_checkpoint_and_state_dict(tmp_path):
    source = create_model("mobilevitv2_050", num_classes=3, image_size=64)
    save_checkpoint(source, tmp_path / "ckpt")
    same_head = load_model("mobilevitv2_050", num_classes=3, pretrained=str(tmp_path / "ckpt"))
    torch.testing.assert_close(same_head.state_dict(), source.state_dict())
    other_head = load_model("mobilevitv2_050", num_classes=5, pretrained=str(tmp_path / "ckpt"))
    torch.testing.assert_close(other_head.backbone.state_dict(), source.backbone.state_dict())
    assert other_head.pretrained == str(tmp_path / "ckpt")

    # A plain timm state dict, classifier included: backbone loads, classifier becomes the head.
    import timm

    reference = timm.create_model("mobilevitv2_050", num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    from_file = load_model("mobilevitv2_050", num_classes=3, pretrained=str(tmp_path / "timm.pth"))
    torch.testing.assert_close(from_file.head.weight, reference.get_classifier().weight)
    torch.testing.assert_close(from_file.backbone.stem.conv.weight, reference.stem.conv.weight)

    with pytest.raises(UserError, match="do not fit"):
        load_model("fastvit_s12", pretrained=str(tmp_path / "timm.pth"))
    with pytest.raises(UserError, match="holds 'mobilevitv2_050'"):
        load_model("fastvit_s12", pretrained=str(tmp_path / "ckpt"))


def test_pretrained_checkpoint_at_another_size(tmp_path):
    # Position embeddings are resized the way timm / open_clip do for their own weights.
    vit = create_model("vit_small_patch14_dinov2", num_classes=2, image_size=56)
    save_checkpoint(vit, tmp_path / "vit")
    bigger = load_model("vit_small_patch14_dinov2", num_classes=2, pretrained=str(tmp_path / "vit"),
                          image_size=70).eval()
    torch.testing.assert_close(bigger.backbone.blocks[0].attn.qkv.weight,
                               vit.backbone.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(bigger.head.weight, vit.head.weight)
    _check_features(bigger, 70, num_classes=2)

    clip = create_model("open_clip:ViT-S-32", image_size=64)
    save_checkpoint(clip, tmp_path / "clip")
    bigger = load_model("open_clip:ViT-S-32", pretrained=str(tmp_path / "clip"), image_size=96).eval()
    torch.testing.assert_close(bigger.backbone.proj, clip.backbone.proj)
    _check_features(bigger, 96)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not a kt checkpoint"):
        load_checkpoint(tmp_path / "nothing_here")
    with pytest.raises(UserError, match="missing"):
        load_checkpoint(tmp_path)

    model = create_model("mobilevitv2_050", num_classes=2, image_size=64)
    good = save_checkpoint(model, tmp_path / "good")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "card.json").write_text((good / "card.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="cannot read weights"):
        load_checkpoint(corrupt)

    bad_card = tmp_path / "bad_card"
    bad_card.mkdir()
    (bad_card / "card.json").write_text("{not json")
    (bad_card / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="cannot read checkpoint card"):
        load_checkpoint(bad_card)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "card.json").write_text((good / "card.json").read_text())
    with pytest.raises(UserError, match="no model.safetensors"):
        load_checkpoint(no_weights)

    other = tmp_path / "other_arch"
    other.mkdir()
    card = json.loads((good / "card.json").read_text())
    (other / "card.json").write_text(json.dumps({**card, "num_classes": 5}))
    (other / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="wrong shape"):
        load_checkpoint(other)

    with pytest.raises(UserError) as info:
        load_checkpoint(corrupt)
    assert "\n" not in str(info.value)



# ------------------------------------------------------------------------------ library-native folders
@pytest.mark.parametrize("name, size", [
    ("test_efficientnet", 32),
    ("resnet10t", 32),
    ("test_vit", 32),
    ("mobilevitv2_050", 64),
    ("tf_efficientnet_lite0", 32),
])
def test_timm_loads_a_checkpoint_as_it_is(name, size, tmp_path):
    import timm
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, image_size=size).eval()
    ckpt = save_checkpoint(model, tmp_path / "run" / "checkpoint", classes=CLASSES)
    assert {p.name for p in ckpt.iterdir()} == {"card.json", "config.json", "model.safetensors"}
    reference = load_model(str(tmp_path / "run"))  # what kt-student eval --checkpoint RUN evaluates

    native = timm.create_model(f"local-dir:{ckpt}", pretrained=True).eval()
    assert native.pretrained_cfg["label_names"] == CLASSES and native.num_classes == 3
    config = resolve_data_config({}, model=native)
    assert config["input_size"] == (3, size, size)
    assert tuple(config["mean"]) == model.mean and tuple(config["std"]) == model.std
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        diff = (native(x) - reference(x)).abs().max().item()
    assert diff < 1e-5
    # the file holds the timm model's own state dict: no kt prefixes, the head as timm's classifier
    from safetensors.torch import load_file

    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert keys == set(native.state_dict())


def test_timm_checkpoint_of_a_vit_records_its_input_size(tmp_path):
    import timm

    vit = create_model("vit_small_patch14_dinov2", num_classes=2, image_size=56).eval()
    ckpt = save_checkpoint(vit, tmp_path / "vit")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2" and config["num_classes"] == 2
    assert "tag" not in config["pretrained_cfg"]  # the upstream weights' tag does not describe these
    native = timm.create_model(f"local-dir:{ckpt}", pretrained=True).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert (native(x) - vit(x)).abs().max().item() < 1e-5


def test_open_clip_loads_the_tower(tmp_path):
    import open_clip

    tower = create_model("open_clip:ViT-S-32", num_classes=3, image_size=64).eval()
    ckpt = save_checkpoint(tower, tmp_path / "clip", classes=CLASSES)
    assert {p.name for p in ckpt.iterdir()} == {"card.json", "open_clip_config.json", "model.safetensors"}
    clip = open_clip.create_model(f"local-dir:{ckpt}", load_weights=False,
                                  pretrained_image_path=str(ckpt / "model.safetensors")).eval()
    from safetensors.torch import load_file

    head = load_file(str(ckpt / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedding = clip.visual(x)
        out = tower.forward_features(x)
        logits = F.linear(embedding, head["head.weight"], head["head.bias"])
    torch.testing.assert_close(embedding, out["embedding"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, out["logits"], rtol=0, atol=1e-5)
    _same_outputs(tower, load_checkpoint(ckpt), 64)


def test_a_head_timm_cannot_hold_keeps_kt_layout(tmp_path):
    # distilled DeiT averages two heads; kt's single head has no timm slot: kt's own layout, still loads
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=3, image_size=32).eval()
    ckpt = save_checkpoint(model, tmp_path / "deit")
    card = json.loads((ckpt / "card.json").read_text())
    assert card["layout"] == "kt" and not (ckpt / "config.json").exists()
    _same_outputs(model, load_checkpoint(ckpt), 32)
    assert model_fingerprint(model)["weights_sha256"] == card["weights_sha256"]


def test_a_model_timm_cannot_describe_keeps_kt_layout(tmp_path, monkeypatch):
    import kt.checkpoints

    folder = save_checkpoint(create_model("test_efficientnet", num_classes=3, image_size=32), tmp_path / "c")
    assert (folder / "config.json").exists()

    def refuse(*args):
        raise ValueError("Model argument 'act_layer' is not serializable")

    monkeypatch.setattr(kt.checkpoints, "_timm_config", refuse)
    model = create_model("test_efficientnet", num_classes=3, image_size=32).eval()
    before = model_fingerprint(model)  # unsaved weights: the sha256 of what save_checkpoint will write
    ckpt = save_checkpoint(model, folder)  # the same folder: the old timm config must not stay behind
    card = json.loads((ckpt / "card.json").read_text())
    assert card["layout"] == "kt" and not (ckpt / "config.json").exists()
    assert before["weights_sha256"] == card["weights_sha256"]
    _same_outputs(model, load_checkpoint(ckpt), 32)


# ------------------------------------------------------------------------------ format 1 (before)
def test_format1_checkpoint_loads_with_identical_outputs_and_fingerprint():
    from safetensors.torch import load_file

    model = load_checkpoint(FIXTURE / "checkpoint")
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    with torch.no_grad():
        out = model.forward_features(expected["input"])
    for key in ("logits", "embedding", "grid"):
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=1e-6)
    assert model.classes == CLASSES
    recorded = json.loads((FIXTURE / "fingerprint.json").read_text())
    assert model_fingerprint(model) == recorded["model_fingerprint"]
    assert checkpoint_fingerprint(FIXTURE / "checkpoint") == recorded["checkpoint_fingerprint"]
    # as --pretrained weights for a model built by name
    named = load_model("test_efficientnet", num_classes=3, image_size=32, pretrained=str(FIXTURE))
    _same_outputs(model, named, 32)


def test_cache_built_before_reads_against_its_format1_teacher(tmp_path, capsys):
    from kt.teacher_cache.cli import main as cache_main
    from kt.teacher_cache.reader import CacheReader

    cache = tmp_path / "cache.zarr"
    shutil.copytree(FIXTURE / "cache.zarr", cache)  # never write into the fixture
    teacher = FIXTURE / "checkpoint"
    reader = CacheReader(str(cache), expect={"teacher": checkpoint_fingerprint(teacher), "classes": CLASSES})
    assert reader.teacher["weights_sha256"] == json.loads((teacher / "card.json").read_text())["weights_sha256"]
    CacheReader(str(cache), expect={"teacher": model_fingerprint(load_checkpoint(teacher))})
    # cached targets == the teacher loaded by today's code on the replayed views
    assert cache_main(["verify", str(cache), "--teacher", str(teacher), "--data", str(FIXTURE / "shards"),
                       "--samples", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"], report["problems"]

    # the same weights saved again are format 2: other bytes, so to the cache another teacher
    resaved = save_checkpoint(load_checkpoint(teacher), tmp_path / "resaved")
    with pytest.raises(UserError, match="weights_sha256"):
        CacheReader(str(cache), expect={"teacher": checkpoint_fingerprint(resaved)})


# ------------------------------------------------------------------------------ one way to name a model
@pytest.fixture
def run_folder(tmp_path):
    """A run folder as finetune leaves it: RUN/checkpoint/ (+ other files)."""
    torch.manual_seed(0)
    model = create_model("test_efficientnet", num_classes=3, image_size=32).eval()
    with torch.no_grad():  # not the seeded init a command would build by name: a path it ignored would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run = tmp_path / "run"
    save_checkpoint(model, run / "checkpoint", classes=CLASSES)
    (run / "config.yaml").write_text("model: test_efficientnet\n")
    return run


def test_load_model_names_a_model_three_ways(run_folder):
    by_run = load_model(str(run_folder))
    for spec in (run_folder / "checkpoint", run_folder / "checkpoint" / "config.json"):
        _same_outputs(by_run, load_model(str(spec)), 32)
    named = load_model("test_efficientnet", num_classes=3, image_size=32, pretrained=str(run_folder))
    _same_outputs(by_run, named, 32)
    assert load_model("test_efficientnet", image_size=32).head is None
    with pytest.raises(UserError, match="teacher not found"):
        load_model(str(run_folder / "nothing"), what="teacher")
    with pytest.raises(UserError, match="is a checkpoint"):
        load_model(str(run_folder), pretrained="hub")


def test_cache_build_takes_a_run_folder(run_folder, tmp_path, capsys):
    from kt.teacher_cache.cli import main as cache_main
    from kt.teacher_cache.reader import CacheReader

    out = tmp_path / "c.zarr"
    assert cache_main(["build", "--teacher", str(run_folder), "--data", str(FIXTURE / "shards"), "--out", str(out),
                       "--views", "1", "--targets", "logits", "--codec", "logits=fp16", "--workers", "0"]) == 0
    CacheReader(str(out), expect={"teacher": checkpoint_fingerprint(run_folder / "checkpoint")})


def test_eval_takes_a_run_folder_or_a_name(run_folder, capsys):
    from kt.student.cli import main

    results = []
    for spec in (run_folder, run_folder / "checkpoint"):
        assert main(["eval", "--checkpoint", str(spec), "--data", str(FIXTURE / "shards"), "--workers", "0"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["n"] == 6 and results[0]["classes"] == CLASSES
    assert main(["eval", "--checkpoint", "test_efficientnet", "--data", str(FIXTURE / "shards")]) == 2
    assert "no task head" in capsys.readouterr().err


def test_eval_refuses_data_of_other_classes(run_folder, tmp_path, capsys):
    """A label indexes its data's classes.json: data naming other classes than the checkpoint's (another count,
    or the same count under other names) is refused by eval and by finetune --val-data, not scored."""
    from kt.student.cli import main

    for name, classes, pattern in (("four", CLASSES + ["cow"], "has 4 classes in its classes.json"),
                                   ("renamed", ["cat", "dog", "cow"], "at index 2: 'cow' there, 'bird'")):
        other = tmp_path / name
        shutil.copytree(FIXTURE / "shards", other)  # the same images and labels
        (other / "classes.json").write_text(json.dumps(classes))
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(run_folder), "--data", str(other), "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pattern in err, err
        out = tmp_path / f"ft-{name}"
        assert main(["finetune", "--model", "test_efficientnet", "--data", str(FIXTURE / "shards"), "--val-data",
                     str(other), "--image-size", "32", "--workers", "0", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pattern in err, err
        assert not out.exists()
    # a model trained on data without classes.json knows its classes by index only: named data of as many
    # classes is its data, of another count is not
    from kt.shards import expand_shards
    from kt.student.evaluate import check_data_classes

    urls = expand_shards(str(FIXTURE / "shards"))
    check_data_classes(["0", "1", "2"], urls, "m", "d")
    with pytest.raises(UserError, match="has 3 classes in its classes.json, m 4"):
        check_data_classes(["0", "1", "2", "3"], urls, "m", "d")


@pytest.mark.parametrize("flag", ["--init", "--pretrained"])
def test_finetune_starts_from_a_run_folder(flag, run_folder, tmp_path, capsys):
    from kt.student.cli import main

    args = ["finetune", "--data", str(FIXTURE / "shards"), "--image-size", "32", "--batch-size", "3",
            "--workers", "0", "--labels-per-class", "1", "--epochs", "1", "--lr", "0", "--out", str(tmp_path / "ft")]
    source = load_model(str(run_folder))
    assert main(args + [flag, str(run_folder)] + (["--model", "test_efficientnet"] if flag == "--pretrained"
                                                    else [])) == 0
    tuned = load_model(str(tmp_path / "ft"))
    # lr 0: the backbone is the run's (BatchNorm statistics move in train mode, so compare weights only)
    for (k, a), b in zip(source.backbone.named_parameters(), tuned.backbone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------ training at another input size
def _saved_models(monkeypatch) -> list:
    """The models finetune saves, as trained (the objects, before any reload)."""
    import kt.student.finetune as finetune

    saved, save = [], finetune.save_checkpoint
    monkeypatch.setattr(finetune, "save_checkpoint", lambda model, *a, **k: (saved.append(model), save(model, *a, **k))[1])
    return saved


@pytest.mark.parametrize("arch, flag", [("test_vit", "--model"), ("test_vit", "--init"),
                                        ("test_efficientnet", "--model")])
def test_a_run_at_another_size_saves_the_model_it_trained(arch, flag, tmp_path, monkeypatch, capsys):
    """A ViT's position embeddings follow its input size: a checkpoint finetuned at another size is rebuilt for
    it (position embeddings resampled), and its checkpoint rebuilds the model trained, in kt, timm and eval."""
    import timm

    from kt.student.cli import main

    args = ["finetune", "--data", str(FIXTURE / "shards"), "--batch-size", "3", "--workers", "0",
            "--labels-per-class", "1", "--epochs", "1"]
    assert main(args + ["--model", arch, "--image-size", "32", "--out", str(tmp_path / "a")]) == 0
    trained = _saved_models(monkeypatch)
    assert main(args + [flag, str(tmp_path / "a"), "--image-size", "48", "--out", str(tmp_path / "b")]) == 0
    loaded = load_checkpoint(tmp_path / "b")
    assert loaded.image_size == 48 and trained[0].image_size == 48
    _same_outputs(trained[0], loaded, 48)
    library = timm.create_model(f"local-dir:{tmp_path / 'b' / 'checkpoint'}", pretrained=True).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(library(x), loaded(x), rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "b"), "--data", str(FIXTURE / "shards"), "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    # used at another size, a checkpoint's weights are still named by its file (the size stands beside them in
    # the fingerprint): a cache built with it as teacher at that size stays resumable across kt versions
    from kt.checkpoints import model_fingerprint, weights_sha256

    at48 = model_fingerprint(load_model(str(tmp_path / "a"), image_size=48))
    assert at48["weights_sha256"] == weights_sha256(tmp_path / "a") and at48["image_size"] == 48
