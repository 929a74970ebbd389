"""Foundation-model weights as users stage them for a cluster without network (docs/weights.md).

`--pretrained hub` reads the Hugging Face cache the way timm and open_clip ask huggingface_hub for it; the tests
write random weights into a cache laid out as `hf download` leaves it (blobs by sha256, a snapshot of links,
refs/main), set HF_HUB_OFFLINE, refuse every socket, and check that the model holds exactly the tensors written.
Plain files go through `--pretrained PATH`. A repo that is not in the cache is one line naming it and the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kt.checkpoints import load_checkpoint, load_model
from kt.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DINOV2 = "vit_small_patch14_dinov2"
DINOV2_REPO = "timm/vit_small_patch14_dinov2.lvd142m"  # timm's default tag for the name
REVISION = "5f8a3c1e2b7d4a6c9e0f1a2b3c4d5e6f7a8b9c0d"  # a commit hash, as refs/main holds one


def write_weights(state: dict, path: Path) -> None:
    """A state dict as its suffix says: safetensors, or a torch pickle (.bin, .pt)."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def stage(cache: Path, repo: str, filename: str, state: dict) -> None:
    """`state` as `filename` of `repo` in a Hugging Face cache, laid out as `hf download` leaves it."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = folder / "blobs" / ("incoming" + Path(filename).suffix)
    write_weights(state, tmp)
    blob = folder / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(blob)
    link = folder / "snapshots" / REVISION / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, HF_HUB_OFFLINE on, and every socket connection refused and
    recorded (the test asserts none was tried)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import from the environment
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tried = []

    def refuse(self, address, *a, **kw):
        tried.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield cache
    assert not tried, f"network touched: {tried}"


def assert_same(got: dict, written: dict, skip: tuple[str, ...] = ()) -> None:
    assert sorted(got) == sorted(written)
    for key, value in written.items():
        if key not in skip:
            assert torch.equal(got[key], value.float()), key


def random_dinov2(**kwargs) -> dict:
    import timm

    return timm.create_model(DINOV2, pretrained=False, **kwargs).state_dict()


def test_dinov2_from_a_staged_hugging_face_cache(offline_hub):
    """The upstream layout (timm's state dict of the 518 px model): exactly those tensors at 518 px, and at a
    small size all but the position embeddings, which timm resamples to the new grid."""
    torch.manual_seed(1)
    written = random_dinov2()
    stage(offline_hub, DINOV2_REPO, "model.safetensors", written)
    assert_same(load_model(DINOV2, pretrained="hub", image_size=518).backbone.state_dict(), written)
    small = load_model(DINOV2, pretrained="hub", image_size=56)
    assert small.backbone.pos_embed.shape[1] == 4 * 4 + 1  # the 56 px grid (+ CLS)
    assert_same(small.backbone.state_dict(), written, skip=("pos_embed",))


def test_missing_hub_weights_offline_name_the_repo_and_the_cache(offline_hub, fmnist, capsys):
    """Also where the cache holds other repos; open_clip's own error log does not make it a second line."""
    from kt.student.cli import main

    stage(offline_hub, "timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(UserError) as e:
        load_model(DINOV2, pretrained="hub", image_size=56)
    assert f"no model.safetensors or pytorch_model.bin of {DINOV2_REPO}" in str(e.value)
    assert str(offline_hub) in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    capsys.readouterr()
    assert main(["finetune", "--model", "open_clip:ViT-B-32@openai", "--pretrained", "hub",
                 "--data", str(fmnist["root"] / "train"), "--labels-per-class", "1",
                 "--out", str(offline_hub.parent / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "of timm/vit_base_patch32_clip_224.openai" in err[0] and str(offline_hub) in err[0], err


def test_dinov2_from_plain_weights_files(tmp_path):
    """The same tensors written as .safetensors, .bin and .pt load exactly through --pretrained PATH."""
    torch.manual_seed(2)
    written = random_dinov2(img_size=56)
    for suffix in (".safetensors", ".bin", ".pt"):
        path = tmp_path / f"dinov2{suffix}"
        write_weights(written, path)
        model = load_model(DINOV2, pretrained=str(path), image_size=56)
        assert_same(model.backbone.state_dict(), written)
        assert model.pretrained == str(path)


def test_open_clip_tower_from_a_full_clip_file(tmp_path):
    """open_clip's own files hold the whole CLIP (`open_clip_pytorch_model.bin`): the visual tower is taken."""
    import open_clip

    torch.manual_seed(3)
    written = open_clip.create_model("ViT-S-32").state_dict()
    path = tmp_path / "open_clip_pytorch_model.bin"
    write_weights(written, path)
    model = load_model("open_clip:ViT-S-32", pretrained=str(path), image_size=224)
    tower = {k[len("visual."):]: v for k, v in written.items() if k.startswith("visual.")}
    assert_same(model.backbone.state_dict(), tower)


@pytest.mark.slow
def test_open_clip_tower_from_a_staged_hugging_face_cache(offline_hub):
    """`open_clip:ViT-B-32@openai` as open_clip resolves it: timm/vit_base_patch32_clip_224.openai, the whole CLIP
    as open_clip_model.safetensors (written in fp16 to halve the file); the tower holds exactly its tensors."""
    import open_clip

    torch.manual_seed(4)
    written = {k: v.half() for k, v in open_clip.create_model("ViT-B-32", force_quick_gelu=True).state_dict().items()}
    stage(offline_hub, "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors", written)
    model = load_model("open_clip:ViT-B-32@openai", pretrained="hub", image_size=224)
    tower = {k[len("visual."):]: v for k, v in written.items() if k.startswith("visual.")}
    assert_same(model.backbone.state_dict(), tower)


@pytest.mark.slow
def test_finetune_pretrained_hub_offline_as_a_user_runs_it(fmnist, tmp_path):
    """`kt-student finetune --pretrained hub` in a fresh process with the environment a user sets (HF_HOME,
    HF_HUB_OFFLINE=1; proxies that lead nowhere, so a download could not succeed), lr 0: the checkpoint's backbone
    is the staged DINOv2 but for the position embeddings resampled to 28 px. Without the repo: one line, exit 2."""
    torch.manual_seed(5)
    written = random_dinov2()
    stage(tmp_path / "hf" / "hub", DINOV2_REPO, "model.safetensors", written)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    env.pop("HF_HUB_CACHE", None)
    args = [sys.executable, "-m", "kt.student.cli", "finetune", "--model", DINOV2, "--pretrained", "hub",
            "--data", str(fmnist["root"] / "train"), "--labels-per-class", "1", "--epochs", "1", "--lr", "0",
            "--image-size", "28", "--batch-size", "10", "--workers", "0"]
    done = subprocess.run(args + ["--out", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["out"]
    model = load_checkpoint(tmp_path / "run")
    assert_same(model.backbone.state_dict(), written, skip=("pos_embed",))
    env["HF_HOME"] = str(tmp_path / "empty")
    done = subprocess.run(args + ["--out", str(tmp_path / "run2")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert DINOV2_REPO in done.stderr and str(tmp_path / "empty" / "hub") in done.stderr
