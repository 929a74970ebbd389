"""kt.models: the factory, uniform features, offline ImageNet weights, user errors."""

from __future__ import annotations

import pytest
import torch

from kt.errors import UserError
from kt.models import create_model

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


def test_package_weights_other_head_sizes():
    fresh = create_model("tf_efficientnet_lite0", num_classes=7, pretrained="package")
    assert fresh.head.out_features == 7
    reference = create_model("tf_efficientnet_lite0", num_classes=0, pretrained="package")
    torch.testing.assert_close(fresh.backbone.conv_stem.weight, reference.backbone.conv_stem.weight)


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


def test_weight_source_errors():
    with pytest.raises(UserError, match="package"):
        create_model("fastvit_s12", pretrained="package")
    with pytest.raises(UserError, match="@TAG"):
        create_model("open_clip:ViT-B-32", pretrained="hub")
