"""kt-student export: ONNX files that onnxruntime runs with torch's logits, the device students, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kt.checkpoints import load_model, save_checkpoint
from kt.errors import UserError
from kt.models import create_model
from kt.student.cli import main
from kt.student.export import check_parity

FIXTURE_SHARDS = Path(__file__).parent / "fixtures" / "checkpoint_v1" / "shards"


def _student(name, size, tmp_path, extra=None):
    """A checkpoint of `name` whose logits are not tiny (a random head of std 0.01 would hide any error)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=size).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return save_checkpoint(model, tmp_path / "run" / "checkpoint", classes=[f"c{i}" for i in range(10)],
                           extra=extra)


def _export(capsys, *args):
    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def _onnx_logits(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))])


def test_parity_check():
    a = np.array([[1.0, 2.0, 0.5], [3.0, -1.0, 0.0]], np.float32)
    result = check_parity(a, a + 1e-6, tolerance=1e-3)
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-5
    with pytest.raises(UserError, match="parity failed.*not written"):
        check_parity(a, a + np.array([[0, 0, 2.0], [0, 0, 0]], np.float32), tolerance=1e-3)
    with pytest.raises(UserError, match="parity failed"):
        check_parity(a, a * np.nan, tolerance=1e-3)


def test_refusals_before_any_export(tmp_path, capsys):
    ckpt = _student("test_efficientnet", 32, tmp_path)
    out = tmp_path / "m.onnx"
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(out), "--format", "tflite")
    assert code == 2 and "unknown --format 'tflite'" in err
    code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(out))  # no --data, none recorded
    assert code == 2 and "give --data" in err
    code, err = _export(capsys, "--checkpoint", str(tmp_path / "nope"), "--out", str(out))
    assert code == 2 and "--checkpoint not found" in err
    # an --out no file can be written to: refused before the export and its parity run
    for bad_out, pattern in ((tmp_path, "is a directory"), (ckpt / "card.json" / "m.onnx", "is a file")):
        code, err = _export(capsys, "--checkpoint", str(ckpt), "--out", str(bad_out), "--data", str(FIXTURE_SHARDS))
        assert code == 2 and pattern in err and len(err.strip().splitlines()) == 1, err
    vit = save_checkpoint(create_model("test_vit", num_classes=2, image_size=32), tmp_path / "vit")
    code, err = _export(capsys, "--checkpoint", str(vit), "--out", str(out), "--image-size", "64",
                        "--data", str(FIXTURE_SHARDS))
    assert code == 2 and "built for 32 px" in err
    assert not out.exists()


@pytest.mark.slow
def test_export_a_run_with_its_recorded_data(tmp_path, capsys):
    import onnx

    _student("test_efficientnet", 32, tmp_path, extra={"run": {"val_data": str(FIXTURE_SHARDS)}})
    out = tmp_path / "deploy" / "student.onnx"
    code, summary = _export(capsys, "--checkpoint", str(tmp_path / "run"), "--format", "onnx", "--out", str(out))
    assert code == 0
    assert summary["parity"]["data"] == str(FIXTURE_SHARDS) and summary["parity"]["samples"] == 6
    assert summary["parity"]["max_abs_logit_diff"] < 1e-4 and summary["parity"]["top1_agreement"] == 1.0
    assert summary["bytes"] == out.stat().st_size and not list(out.parent.glob("*.tmp"))
    assert [p.name for p in out.parent.iterdir()] == ["student.onnx"]  # weights inside the one file
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"])[0] == "c0" and props["image_size"] == "32"

    model = load_model(str(tmp_path / "run"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_onnx_logits(out, x.numpy()) - expected).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name, dynamic", [
    ("mobilevitv2_050", False),
    ("fastvit_s12", True),
    ("tf_efficientnet_lite0", False),
    ("resnet10t", True),
])
def test_device_students_export_with_parity(name, dynamic, fmnist, tmp_path, capsys):
    import onnx

    ckpt = _student(name, 64, tmp_path)
    out = tmp_path / f"{name}.onnx"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--data", str(fmnist["root"] / "test"),
            "--parity-samples", "8"] + (["--dynamic-batch"] if dynamic else [])
    code, summary = _export(capsys, *args)
    assert code == 0, summary
    parity = summary["parity"]
    assert parity["samples"] == 8 and parity["top1_agreement"] == 1.0
    assert parity["max_abs_logit"] > 0.1 and parity["max_abs_logit_diff"] < 1e-3
    graph = onnx.load(str(out)).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch.dim_param != "") == dynamic and (dynamic or batch.dim_value == 1)
    names = " ".join(i.name for i in graph.initializer)
    if name == "fastvit_s12":  # exported in its inference form: MobileOne branches folded into one conv
        assert summary["reparameterized"] and "reparam_conv" in names and "conv_kxk" not in names
