"""kt.models: the factory, uniform features, offline ImageNet weights, checkpoints, user errors."""

from __future__ import annotations

import json

import pytest
import torch

from kt.errors import UserError
from kt.models import (create_model, load_checkpoint, model_fingerprint, save_checkpoint,
                       weights_sha256)

torch.set_num_threads(2)


def _check_features(model, size, batch=2, num_classes=0):
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        out = model.forward_features(x)
        direct = model(x)
    h, w = model.grid_size(size)
    assert out["embedding"].shape == (batch, model.embedding_dim)
    assert out["grid"].shape == (batch, model.grid_dim, h, w)
    if num_classes:
        assert out["logits"].shape == (batch, num_classes)
        torch.testing.assert_close(direct, out["logits"])
    else:
        assert "logits" not in out
        torch.testing.assert_close(direct, out["embedding"])
    return out


@pytest.mark.parametrize("name, size, dims", [
    ("fastvit_s12", 64, (1024, 1024)),
    ("mobilevitv2_100", 64, (512, 512)),
    ("mobilevitv2_050", 64, (256, 256)),
    ("tf_efficientnet_lite2", 64, (1280, 1280)),
    ("vit_small_patch14_dinov2", 56, (384, 384)),
])
def test_small_architectures(name, size, dims):
    model = create_model(name, num_classes=3, image_size=size).eval()
    assert (model.embedding_dim, model.grid_dim) == dims
    assert model.head is not None and model.head.out_features == 3
    _check_features(model, size, num_classes=3)


@pytest.mark.parametrize("name, sizes", [
    ("fastvit_s12", [65, 97]),
    ("mobilevitv2_050", [65, 70, 96]),
    ("tf_efficientnet_lite0", [65, 70, 97]),
])
def test_cnn_grid_size_matches_forward(name, sizes):
    model = create_model(name).eval()
    for size in sizes:
        _check_features(model, size, batch=1)


def test_vit_grid_and_cls():
    model = create_model("vit_small_patch14_dinov2", image_size=70).eval()
    assert model.grid_size(70) == (5, 5)
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        out = model.forward_features(x)
        tokens = model.backbone.forward_features(x)
    # The grid is the patch tokens in row-major order; the embedding the CLS token.
    torch.testing.assert_close(out["grid"][0, :, 1, 2], tokens[0, 1 + 1 * 5 + 2])
    torch.testing.assert_close(out["embedding"][0], tokens[0, 0])


@pytest.mark.slow
def test_dinov2_large():
    model = create_model("vit_large_patch14_dinov2", num_classes=5, image_size=56).eval()
    assert (model.embedding_dim, model.grid_dim) == (1024, 1024)
    assert model.grid_size(56) == (4, 4)
    _check_features(model, 56, num_classes=5)


@pytest.mark.slow
def test_open_clip_vit_large():
    model = create_model("open_clip:ViT-L-14@openai", num_classes=4, image_size=56).eval()
    assert (model.embedding_dim, model.grid_dim) == (768, 1024)
    assert model.grid_size(56) == (4, 4)
    assert model.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    _check_features(model, 56, num_classes=4)


def test_open_clip_small_tower():
    model = create_model("open_clip:ViT-B-32", image_size=64).eval()
    assert (model.embedding_dim, model.grid_dim) == (512, 768)
    assert model.grid_size(64) == (2, 2)
    _check_features(model, 64)


def test_package_weights_classify_real_photos():
    timm_data = pytest.importorskip("timm.data")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = create_model("tf_efficientnet_lite0", num_classes=1000, pretrained="package").eval()
    config = timm_data.resolve_data_config({}, model=model.backbone)
    assert config["input_size"] == (3, 224, 224)
    transform = timm_data.create_transform(**{**config, "mean": model.mean, "std": model.std})
    x = torch.stack([transform(Image.fromarray(skimage_data.coffee())),
                     transform(Image.fromarray(skimage_data.chelsea()))])
    with torch.no_grad():
        top = model(x).argmax(-1).tolist()
    assert top[0] in (967, 968)  # espresso, cup
    assert 281 <= top[1] <= 285  # a domestic cat


def test_package_weights_other_head_sizes(tmp_path):
    fresh = create_model("tf_efficientnet_lite0", num_classes=7, pretrained="package")
    assert fresh.head.out_features == 7
    reference = create_model("tf_efficientnet_lite0", num_classes=0, pretrained="package")
    torch.testing.assert_close(fresh.backbone.conv_stem.weight, reference.backbone.conv_stem.weight)
    # A model built from package weights saves and reloads like any other.
    loaded = load_checkpoint(save_checkpoint(fresh, tmp_path / "lite0"))
    assert loaded.pretrained == "package"
    torch.testing.assert_close(loaded.state_dict(), fresh.state_dict())


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
    same_head = create_model("mobilevitv2_050", num_classes=3, pretrained=str(tmp_path / "ckpt"))
    torch.testing.assert_close(same_head.state_dict(), source.state_dict())
    other_head = create_model("mobilevitv2_050", num_classes=5, pretrained=str(tmp_path / "ckpt"))
    torch.testing.assert_close(other_head.backbone.state_dict(), source.backbone.state_dict())
    assert other_head.pretrained == str(tmp_path / "ckpt")

    # A plain timm state dict, classifier included: backbone loads, classifier becomes the head.
    import timm

    reference = timm.create_model("mobilevitv2_050", num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    from_file = create_model("mobilevitv2_050", num_classes=3, pretrained=str(tmp_path / "timm.pth"))
    torch.testing.assert_close(from_file.head.weight, reference.get_classifier().weight)
    torch.testing.assert_close(from_file.backbone.stem.conv.weight, reference.stem.conv.weight)

    with pytest.raises(UserError, match="do not fit"):
        create_model("fastvit_s12", pretrained=str(tmp_path / "timm.pth"))
    with pytest.raises(UserError, match="holds 'mobilevitv2_050'"):
        create_model("fastvit_s12", pretrained=str(tmp_path / "ckpt"))


def test_pretrained_checkpoint_at_another_size(tmp_path):
    # Position embeddings are resized the way timm / open_clip do for their own weights.
    vit = create_model("vit_small_patch14_dinov2", num_classes=2, image_size=56)
    save_checkpoint(vit, tmp_path / "vit")
    bigger = create_model("vit_small_patch14_dinov2", num_classes=2, pretrained=str(tmp_path / "vit"),
                          image_size=70).eval()
    torch.testing.assert_close(bigger.backbone.blocks[0].attn.qkv.weight,
                               vit.backbone.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(bigger.head.weight, vit.head.weight)
    _check_features(bigger, 70, num_classes=2)

    clip = create_model("open_clip:ViT-S-32", image_size=64)
    save_checkpoint(clip, tmp_path / "clip")
    bigger = create_model("open_clip:ViT-S-32", pretrained=str(tmp_path / "clip"), image_size=96).eval()
    torch.testing.assert_close(bigger.backbone.proj, clip.backbone.proj)
    _check_features(bigger, 96)


def test_hub_offline_is_a_user_error(monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot get hub weights"):
        create_model("mobilevitv2_050", pretrained="hub")
    with pytest.raises(UserError, match="cannot get hub weights"):
        create_model("open_clip:ViT-B-32@openai", pretrained="hub")


def test_no_head_and_reset_head():
    model = create_model("mobilevitv2_050", image_size=64).eval()
    assert model.head is None and model.num_classes == 0
    model.reset_head(4)
    assert model.head.out_features == 4 and model.num_classes == 4
    _check_features(model, 64, num_classes=4)


def test_unknown_names():
    with pytest.raises(UserError, match="fastvit_s12"):
        create_model("fastvit_s13")
    with pytest.raises(UserError, match="ViT-L-14"):
        create_model("open_clip:ViT-L-15")
    with pytest.raises(UserError, match="known"):
        create_model("open_clip:ViT-B-32@no_such_tag")
    with pytest.raises(UserError, match="task"):
        create_model("fastvit_s12", task="detection")


def test_weight_source_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        create_model("fastvit_s12", pretrained=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="package"):
        create_model("fastvit_s12", pretrained="package")
    with pytest.raises(UserError, match="@TAG"):
        create_model("open_clip:ViT-B-32", pretrained="hub")


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
