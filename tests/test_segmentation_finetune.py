"""kt-student finetune / eval --task segmentation through the CLI: training end to end, exact resume, eval.json,
and the refusals (one line, exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from kt.student.cli import main
from tests.test_segmentation_data import png, synthetic, write_seg_shards

SEG = ["--task", "segmentation", "--model", "mobilevitv2_050", "--output-stride", "8", "--head-width", "32",
       "--image-size", "32", "--batch-size", "4", "--workers", "0", "--labeled-images", "8", "--epochs", "2",
       "--lr", "0.003", "--warmup-epochs", "0", "--log-every", "1"]
# views without augmentation: the same batches every epoch, so the loss curve shows learning, not view noise
FIXED_VIEW = '{"scale": [1, 1], "hflip": 0, "color_jitter": 0, "randaug_ops": 0}'


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    write_seg_shards(root / "train", n=16, prefix="train")
    write_seg_shards(root / "test", n=6, prefix="test", maxcount=3)
    return root


def finetune(data, out, *extra):
    return main(["finetune", "--data", str(data / "train"), *SEG, "--out", str(out), *extra])


def assert_user_error(capsys, argv, pattern):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err


@pytest.mark.slow
def test_finetune_segmentation_loss_falls(seg_data, tmp_path):
    run = tmp_path / "run"
    assert finetune(seg_data, run, "--epochs", "10", "--batch-size", "8", "--labeled-images", "16",
                    "--view", FIXED_VIEW) == 0
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])  # measured: 0.96 -> 0.67


def test_finetune_segmentation_writes_checkpoint_and_eval(seg_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(seg_data, run, "--val-data", str(seg_data / "test")) == 0
    card = json.loads((run / "checkpoint" / "card.json").read_text())
    assert card["task"] == "segmentation" and card["output_stride"] == 8 and card["head_width"] == 32
    assert card["classes"] == ["background", "red", "green"]
    saved = json.loads((run / "eval.json").read_text())
    assert set(saved) >= {"miou", "pixel_accuracy", "per_class_iou", "n"} and saved["n"] == 6
    assert list(saved["per_class_iou"]) == card["classes"]
    # kt-student eval takes the task from the checkpoint and gives the same numbers
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(seg_data / "test"), "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["miou"] == pytest.approx(saved["miou"]) and result["per_class_iou"] == saved["per_class_iou"]
    assert main(["eval", "--runs", str(run), str(run)]) == 0
    agg = json.loads(capsys.readouterr().out)
    assert agg["miou_mean"] == pytest.approx(saved["miou"]) and agg["miou_std"] == 0


def test_segmentation_resume_equals_uninterrupted(seg_data, tmp_path, capsys):
    assert finetune(seg_data, tmp_path / "a") == 0
    assert finetune(seg_data, tmp_path / "b", "--stop-after-steps", "3") == 0
    assert finetune(seg_data, tmp_path / "b") == 0
    assert "resuming at epoch 1, batch 1, step 3" in capsys.readouterr().out
    a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_all_ignore_batch_gives_zero_loss_not_nan():
    import torch

    from kt.student.segmentation import segmentation_loss
    from kt.models import create_model

    model = create_model("mobilevitv2_050", num_classes=3, image_size=32, task="segmentation", output_stride=8,
                         head_width=16)
    loss, metrics = segmentation_loss(255)(model, (torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 255)))
    assert float(loss.detach()) == 0.0 and np.isfinite(metrics["pixel_acc"])
    loss.backward()  # a graph still, so the loop's backward works on such a batch


def test_segmentation_refusals(seg_data, tmp_path, capsys):
    data, out = str(seg_data / "train"), str(tmp_path / "x")
    base = ["finetune", "--data", data, *SEG, "--out", out]
    assert_user_error(capsys, [*base, "--output-stride", "12"], "--output-stride 12: must be one of 8, 16, 32")
    assert_user_error(capsys, [*base, "--model", "test_efficientnet"], "cannot make test_efficientnet output stride")
    assert_user_error(capsys, [*base, "--image-size", "36"], "image size 36 is not divisible by the output stride 8")
    assert_user_error(capsys, [*base, "--batch-size", "1"], "batch of 1")
    assert_user_error(capsys, [*base, "--labeled-images", "1"], "batch of 1")
    assert_user_error(capsys, ["finetune", "--data", data, "--model", "test_efficientnet", "--image-size", "32",
                               "--output-stride", "8", "--out", out], "--output-stride is for --task segmentation")

    # masks missing / of another size: bad samples, the run fails past --max-bad-fraction
    def no_mask(i, record):
        if i % 2:
            del record["mask.png"]
        elif i % 4 == 0:
            record["mask.png"] = png(np.zeros((5, 5), np.uint8))

    write_seg_shards(tmp_path / "spoilt", n=12, prefix="sp", edit=no_mask)
    assert_user_error(capsys, ["finetune", "--data", str(tmp_path / "spoilt"), *SEG, "--out", out],
                      "samples are bad")

    def label_7(i, record):
        if i == 2:
            mask = synthetic(record["__key__"])[1]
            mask[3, 3] = 7
            record["mask.png"] = png(mask)

    write_seg_shards(tmp_path / "label7", n=12, prefix="l7", edit=label_7)
    assert_user_error(capsys, ["finetune", "--data", str(tmp_path / "label7"), *SEG, "--labeled-images", "12",
                               "--out", out], "l7-0002: mask label 7")

    # a classification run given to a segmentation command, and the reverse
    cls_run, seg_run = tmp_path / "cls", tmp_path / "segrun"
    write_seg_shards(tmp_path / "cls-data", n=8, prefix="c")
    assert main(["finetune", "--data", data, *SEG, "--epochs", "1", "--out", str(seg_run)]) == 0
    assert main(["finetune", "--data", data, "--model", "mobilevitv2_050", "--image-size", "32", "--batch-size", "4",
                 "--workers", "0", "--labeled-images", "8", "--epochs", "1", "--out", str(cls_run)]) == 2
    capsys.readouterr()  # the synthetic shards carry no .cls: classification needs labels
    from kt.shards import write_shards

    write_shards([(f"c{i}", synthetic(f"c{i}")[0], i % 3) for i in range(8)], tmp_path / "cls-labels",
                 classes=["a", "b", "c"])
    cls_data = str(tmp_path / "cls-labels")
    assert main(["finetune", "--data", cls_data, "--model", "mobilevitv2_050", "--image-size", "32",
                 "--batch-size", "4", "--workers", "0", "--labeled-images", "8", "--epochs", "1",
                 "--out", str(cls_run)]) == 0
    assert_user_error(capsys, [*base, "--pretrained", str(cls_run)], "is a classification checkpoint")
    assert_user_error(capsys, [*base, "--init", str(cls_run)], "is a classification checkpoint")
    assert_user_error(capsys, ["finetune", "--data", cls_data, "--model", "mobilevitv2_050", "--image-size", "32",
                               "--workers", "0", "--pretrained", str(seg_run), "--out", out],
                      "is a segmentation checkpoint")
    assert_user_error(capsys, ["finetune", "--data", cls_data, "--init", str(seg_run), "--image-size", "32",
                               "--workers", "0", "--out", out], "is a segmentation checkpoint")
    # eval of a segmentation checkpoint on shards whose masks are missing fails past the bad fraction
    write_shards([(f"m{i}", synthetic(f"m{i}")[0], 0) for i in range(8)], tmp_path / "no-masks",
                 classes=["background", "red", "green"])
    assert_user_error(capsys, ["eval", "--checkpoint", str(seg_run), "--data", str(tmp_path / "no-masks"),
                               "--workers", "0"], "samples are bad")
    # ... and on shards of other classes (a, b, c) it is refused, not scored under the checkpoint's class names
    assert_user_error(capsys, ["eval", "--checkpoint", str(seg_run), "--data", cls_data, "--workers", "0"],
                      "differs from the checkpoint")


def test_uint8_views_finetune_and_evaluate_the_same(seg_data, tmp_path, monkeypatch):
    """uint8 views normalised where the model runs (the default toward a GPU) finetune and evaluate a
    segmentation model bit for bit as float views made in the workers do."""
    import torch

    import kt.render
    from kt.student import finetune as ft, segmentation
    from tests.test_finetune import record_inputs

    seen = record_inputs(monkeypatch, ft, segmentation)
    for mode in ("never", "always"):
        monkeypatch.setattr(kt.render, "UINT8_VIEWS", mode)
        seen.clear()
        assert finetune(seg_data, tmp_path / mode, "--val-data", str(seg_data / "test")) == 0
        want = torch.uint8 if mode == "always" else torch.float32
        assert len(seen) == 4 + 1 and set(seen) == {want}  # 4 training steps, one eval batch
    a, b = (load_file(str(tmp_path / m / "checkpoint" / "model.safetensors")) for m in ("never", "always"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    evals = [json.loads((tmp_path / m / "eval.json").read_text()) for m in ("never", "always")]
    assert evals[0]["miou"] == evals[1]["miou"] and evals[0]["per_class_iou"] == evals[1]["per_class_iou"]


def test_eval_data_of_other_classes_is_refused(seg_data, tmp_path, capsys):
    """The masks' labels index the data's classes.json: data naming other classes (another count, or the same
    count under other names) is refused by eval and by finetune --val-data, before anything runs."""
    import shutil

    run = tmp_path / "run"
    assert finetune(seg_data, run, "--epochs", "1") == 0
    for name, classes, pattern in (("five", ["background", "cat", "dog", "car", "tree"], "has 5 classes"),
                                   ("renamed", ["background", "red", "blue"], "at index 2: 'blue' there, 'green'")):
        other = tmp_path / name
        shutil.copytree(seg_data / "test", other)  # the same masks, labels 0..2
        (other / "classes.json").write_text(json.dumps(classes))
        assert_user_error(capsys, ["eval", "--checkpoint", str(run), "--data", str(other), "--workers", "0"],
                          pattern)
        out = tmp_path / f"ft-{name}"
        assert_user_error(capsys, ["finetune", "--data", str(seg_data / "train"), *SEG, "--val-data", str(other),
                                   "--out", str(out)], pattern)
        assert not out.exists()  # refused before the run started
    # the data's own classes: evaluated
    assert main(["eval", "--checkpoint", str(run), "--data", str(seg_data / "test"), "--workers", "0"]) == 0


def _saved_models(monkeypatch) -> list:
    """The models finetune saves, as trained (the objects, before any reload)."""
    import kt.student.finetune as ft

    saved, save = [], ft.save_checkpoint
    monkeypatch.setattr(ft, "save_checkpoint", lambda model, *a, **k: (saved.append(model), save(model, *a, **k))[1])
    return saved


def test_a_checkpoint_finetuned_at_another_size_keeps_its_head(seg_data, tmp_path, monkeypatch, capsys):
    """A DeepLabV3 head's atrous rates are built from the grid (`aspp_rates`), but a checkpoint keeps its own at
    any input size (its card records them): a checkpoint of 48 px (rates 1, 2, 3) finetuned at 64 px (whose grid
    would take 1, 3, 4) or at 32 px (two rates) keeps (1, 2, 3), so the model trained is the one its checkpoint
    rebuilds, and the teacher of a cache built before rates were recorded is the same model. A new head
    (`--init-head new`) takes the new grid's rates."""
    import torch

    from kt.checkpoints import load_checkpoint
    from kt.segmentation import aspp_rates

    def rates(model):
        return tuple(branch[0].dilation[0] for branch in list(model.head[0].convs)[1:-1])

    first = tmp_path / "48"
    assert finetune(seg_data, first, "--image-size", "48", "--epochs", "1") == 0
    assert rates(load_checkpoint(first)) == aspp_rates(6) == (1, 2, 3)
    assert json.loads((first / "checkpoint" / "card.json").read_text())["aspp_rates"] == [1, 2, 3]
    for size in (64, 32):
        second = tmp_path / str(size)
        trained = _saved_models(monkeypatch)
        assert finetune(seg_data, second, "--model", str(first), "--image-size", str(size), "--epochs", "1",
                        "--val-data", str(seg_data / "test")) == 0
        loaded = load_checkpoint(second)
        assert rates(trained[0]) == rates(loaded) == (1, 2, 3) and loaded.image_size == size
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), trained[0].eval()(x), rtol=0, atol=0)
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(second), "--data", str(seg_data / "test"), "--workers", "0"]) == 0
        assert json.loads(capsys.readouterr().out)["miou"] == json.loads((second / "eval.json").read_text())["miou"]
    fresh = tmp_path / "new-head"
    assert finetune(seg_data, fresh, "--init", str(first), "--init-head", "new", "--image-size", "32",
                    "--epochs", "1") == 0
    assert rates(load_checkpoint(fresh)) == aspp_rates(4) == (1, 2)
    # a checkpoint from before rates were recorded: its card's size gives them, at any size it is used at
    card = first / "checkpoint" / "card.json"
    card.write_text(json.dumps({k: v for k, v in json.loads(card.read_text()).items() if k != "aspp_rates"}))
    assert rates(load_checkpoint(first, image_size=64)) == (1, 2, 3)
