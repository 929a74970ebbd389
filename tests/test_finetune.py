"""kt-student finetune / eval: exact resume, the run folder contract, CLI refusals (in-process)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kt.student.cli import main

TINY = ["--model", "test_efficientnet", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--labels-per-class", "3", "--epochs", "2", "--lr", "0.01", "--log-every", "1"]


def finetune(fmnist, out, *extra):
    return main(["finetune", "--data", str(fmnist["root"] / "train"), *TINY, "--out", str(out), *extra])


def weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_resume_mid_epoch_equals_uninterrupted(fmnist, tmp_path, capsys):
    assert finetune(fmnist, tmp_path / "a") == 0
    # killed after 4 of 6 optimizer steps (mid second epoch), then the same command again
    assert finetune(fmnist, tmp_path / "b", "--stop-after-steps", "4") == 0
    assert not (tmp_path / "b" / "checkpoint").exists()
    progress = json.loads((tmp_path / "b" / "state" / "progress.json").read_text())
    assert progress == {"epoch": 1, "batches_in_epoch": 1, "global_step": 4, "world_size": 1}
    assert finetune(fmnist, tmp_path / "b") == 0
    assert "resuming at epoch 1, batch 1, step 4" in capsys.readouterr().out
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]



class Killed(BaseException):
    """A SIGKILL stand-in: nothing in kt catches it."""


@pytest.mark.parametrize("rename", [1, 2], ids=["before-first-rename", "between-renames"])
def test_resume_after_a_kill_inside_the_state_swap(fmnist, tmp_path, capsys, monkeypatch, rename):
    """A save swaps state.tmp in by two renames (state -> state.old, state.tmp -> state); a kill before either
    keeps a whole newer save in state.tmp, which the rerun resumes from (between the renames no `state` is left,
    and the rerun started from step 0)."""
    import os

    import kt.student.loop as loop

    assert finetune(fmnist, tmp_path / "a") == 0
    replace, renames = os.replace, []

    def killed_at_the_swap(src, dst):
        if os.path.basename(os.fspath(dst)) in ("state", "state.old"):
            renames.append(dst)
            # the second save (step 4): its `rename`-th rename is never made
            if len(renames) == 1 + rename:
                raise Killed
        return replace(src, dst)

    monkeypatch.setattr(loop.os, "replace", killed_at_the_swap)
    with pytest.raises(Killed):
        finetune(fmnist, tmp_path / "b", "--save-every", "2", "--stop-after-steps", "4")
    monkeypatch.undo()
    assert (tmp_path / "b" / "state.tmp").exists() and (tmp_path / "b" / "state").exists() == (rename == 1)
    capsys.readouterr()
    assert finetune(fmnist, tmp_path / "b", "--save-every", "2") == 0
    assert "resuming at epoch 1, batch 1, step 4" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").glob("state*")) == ["state"]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

def test_finetune_eval_and_aggregate(fmnist, tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"s{seed}"
        assert finetune(fmnist, run, "--val-data", str(fmnist["root"] / "test"), "--seed", str(seed)) == 0
        runs.append(str(run))
    capsys.readouterr()
    card = json.loads((tmp_path / "s0" / "checkpoint" / "card.json").read_text())
    assert card["arch"] == "test_efficientnet" and card["classes"][0] == "T-shirt/top"
    written = tmp_path / "e" / "eval.json"  # --out: the printed metrics, also as a file (a recipe's eval stage)
    assert main(["eval", "--checkpoint", runs[0], "--data", str(fmnist["root"] / "test"), "--workers", "0",
                 "--out", str(written)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(written.read_text()) == result
    saved = json.loads((tmp_path / "s0" / "eval.json").read_text())
    assert result["top1"] == saved["top1"] and result["n"] == 100
    assert sum(map(sum, result["confusion_matrix"])) == 100
    assert main(["eval", "--runs", *runs]) == 0
    agg = json.loads(capsys.readouterr().out)
    assert agg["runs"] == 2 and len(agg["top1"]) == 2
    assert abs(agg["top1_mean"] - sum(agg["top1"]) / 2) < 1e-12


def record_inputs(monkeypatch, *modules):
    """The dtype of every batch of views that reaches `kt.render.model_input` in `modules`, in order."""
    seen = []
    for module in modules:
        real = module.model_input
        monkeypatch.setattr(module, "model_input", lambda x, mean, std, real=real: seen.append(x.dtype) or real(
            x, mean, std))
    return seen


def test_uint8_views_finetune_and_evaluate_the_same(fmnist, tmp_path, monkeypatch, capsys):
    """Workers may send uint8 views, normalised where the model runs (the default toward a GPU): finetuning and
    its evaluation are the same bit for bit as with float views made in the workers."""
    import kt.render
    from kt.student import evaluate, finetune as ft

    seen = record_inputs(monkeypatch, ft, evaluate)
    for mode in ("never", "always"):
        monkeypatch.setattr(kt.render, "UINT8_VIEWS", mode)
        seen.clear()
        assert finetune(fmnist, tmp_path / mode, "--val-data", str(fmnist["root"] / "test")) == 0
        want = torch.uint8 if mode == "always" else torch.float32
        assert len(seen) == 6 + 1 and set(seen) == {want}  # 6 training steps, one eval batch
    a, b = weights(tmp_path / "never"), weights(tmp_path / "always")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [[json.loads(x)["loss"] for x in (tmp_path / m / "metrics.jsonl").read_text().splitlines()]
               for m in ("never", "always")]
    assert metrics[0] == metrics[1]
    evals = [json.loads((tmp_path / m / "eval.json").read_text()) for m in ("never", "always")]
    assert evals[0]["confusion_matrix"] == evals[1]["confusion_matrix"] and evals[0]["n"] == 100


def test_corrupt_images_are_skipped(corrupt_shard, tmp_path, capsys):
    code = main(["finetune", "--data", corrupt_shard[0], "--model", "test_efficientnet", "--image-size", "32",
                 "--labels-per-class", "2", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--max-bad-fraction", "0.5", "--out", str(tmp_path / "r")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["labeled_images"] == 4 and summary["completed"]


def assert_user_error(capsys, argv, pattern):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert pattern in err, err


def test_cli_refusals(fmnist, tmp_path, capsys):
    data = str(fmnist["root"] / "train")
    assert_user_error(capsys, ["finetune", "--data", "/nonexistent/{0..3}.tar", *TINY, "--out", str(tmp_path / "x")],
                      "shard not found")
    assert_user_error(capsys, ["finetune", "--data", data, *TINY, "--model", "fastvit_s1200", "--out",
                               str(tmp_path / "x")], "fastvit_s1200")
    assert_user_error(capsys, ["finetune", "--data", data, *TINY, "--labels-per-class", "500", "--out",
                               str(tmp_path / "x")], "--labels-per-class 500")
    # an output folder holding another run is refused and left as it was
    assert finetune(fmnist, tmp_path / "run") == 0
    before = (tmp_path / "run" / "config.yaml").read_text()
    assert_user_error(capsys, ["finetune", "--data", data, *TINY, "--lr", "0.5", "--out", str(tmp_path / "run")],
                      "holds another run (lr: 0.01 there, 0.5 now)")
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert_user_error(capsys, ["finetune", "--data", data, *TINY, "--out", str(tmp_path / "other")], "holds no kt run")
    bad_ckpt = tmp_path / "ckpt"
    bad_ckpt.mkdir()
    (bad_ckpt / "card.json").write_text("{not json")
    assert_user_error(capsys, ["eval", "--checkpoint", str(bad_ckpt), "--data", data], "")
    assert_user_error(capsys, ["eval", "--checkpoint", str(tmp_path / "missing"), "--data", data], "")
    assert_user_error(capsys, ["eval", "--runs", str(tmp_path / "other")], "eval.json")


def test_grad_accumulation_and_mixed_precision(fmnist, tmp_path, capsys):
    base = ["finetune", "--data", str(fmnist["root"] / "train"), "--model", "test_efficientnet", "--image-size", "32",
            "--labels-per-class", "4", "--epochs", "1", "--workers", "0"]
    # 40 images in batches of 4 -> 10 batches -> 5 optimizer steps with accumulation 2
    assert main(base + ["--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "ga")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 5
    assert main(base + ["--batch-size", "8", "--mixed-precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completed"]


def test_grad_accum_windows_end_at_epoch_ends_and_resume_exactly(fmnist, tmp_path, monkeypatch, capsys):
    """40 images in batches of 4 -> 10 batches per epoch, windows of 3 -> 3, 3, 3, 1: killed right after the
    first epoch-end save and resumed == uninterrupted."""
    from tests import kill_after_epoch

    args = ("--labels-per-class", "4", "--batch-size", "4", "--grad-accum", "3", "--save-every", "4")
    assert finetune(fmnist, tmp_path / "a", *args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2 * 4
    with monkeypatch.context() as m:
        kill_after_epoch.install(m)
        with pytest.raises(kill_after_epoch.Killed):
            finetune(fmnist, tmp_path / "b", *args)
    assert finetune(fmnist, tmp_path / "b", *args) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_saves_every_n_steps_not_every_epoch_and_a_kill_between_saves_resumes_exactly(fmnist, tmp_path,
                                                                                      monkeypatch, capsys):
    """30 images in batches of 8 -> 3 steps an epoch, 4 epochs, `--save-every 5`: the state is saved at steps 5
    and 10 and at the end, not at every epoch end; a run killed at step 8 (no save there) resumes from step 5
    and ends equal to an uninterrupted one."""
    from kt.student import finetune as finetune_module
    from kt.student import loop

    args = ("--epochs", "4", "--save-every", "5")
    saves = []
    real_save = loop._save_state

    def recording_save(accelerator, out_dir, progress):
        saves.append(dict(progress))
        real_save(accelerator, out_dir, progress)

    with monkeypatch.context() as m:
        m.setattr(loop, "_save_state", recording_save)
        assert finetune(fmnist, tmp_path / "a", *args) == 0
    assert [(p["epoch"], p["batches_in_epoch"], p["global_step"]) for p in saves] == [(1, 2, 5), (3, 1, 10), (4, 0, 12)]

    class Killed(SystemExit):
        pass

    real_loss = finetune_module.classification_loss

    def killing_loss(label_smoothing):
        inner, calls = real_loss(label_smoothing), []

        def loss_fn(model, batch):
            calls.append(1)
            if len(calls) == 8:  # the 8th step's batch: steps 6 and 7 were taken and never saved
                raise Killed(3)
            return inner(model, batch)

        return loss_fn

    with monkeypatch.context() as m:
        m.setattr(finetune_module, "classification_loss", killing_loss)
        with pytest.raises(Killed):
            finetune(fmnist, tmp_path / "b", *args)
    assert json.loads((tmp_path / "b" / "state" / "progress.json").read_text())["global_step"] == 5
    capsys.readouterr()
    assert finetune(fmnist, tmp_path / "b", *args) == 0
    assert "resuming at epoch 1, batch 2, step 5" in capsys.readouterr().out
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the killed run logged steps 6 and 7 once before the kill and again after the resume: the same losses
    la = {x["step"]: x["loss"] for x in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())}
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(lb) == 12 + 2 and all(la[x["step"]] == x["loss"] for x in lb)


def test_one_persistent_loader_gives_each_epochs_batches(fmnist):
    """The loader `finetune` keeps for the whole run (persistent workers, `set_epoch`) yields, epoch by epoch,
    the batches of a loader made for that epoch alone (the former per-epoch loader, the reference)."""
    from kt.shards import expand_shards, labeled_subset
    from kt.student.data import LabeledViews, labeled_loader
    from kt.views import VIEW_PRESETS

    samples = labeled_subset(expand_shards(str(fmnist["root"] / "train")), 2, 0)
    dataset = LabeledViews(samples, VIEW_PRESETS["light"], 7, 16, (0.5,) * 3, (0.5,) * 3)
    persistent = labeled_loader(dataset, 0, 4, workers=1)
    for epoch in (0, 1, 2, 1):
        persistent.sampler.set_epoch(epoch)
        got = list(persistent)
        want = list(labeled_loader(dataset, epoch, 4, workers=0))
        assert len(got) == len(want) == 5
        for (xa, ya), (xb, yb) in zip(got, want):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(got[0][0], list(labeled_loader(dataset, 0, 4, workers=0))[0][0])  # epochs differ


@pytest.mark.slow
def test_two_process_schedule_is_per_process(fmnist, tmp_path):
    """Two processes share the 10 batches of an epoch (5 each): the cosine ends at its minimum after
    2 x 5 optimizer steps, and warm-up lasts one epoch of them."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "-m", "kt.student.cli", "finetune", "--data", str(fmnist["root"] / "train"), *TINY,
           "--labels-per-class", "4", "--batch-size", "4", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True)
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert summaries and all(s["steps"] == 2 * 5 for s in summaries)
    log = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in log]
    assert lrs[4] == pytest.approx(0.01)  # warm-up: one epoch = 5 steps per process
    assert lrs[-1] == pytest.approx(0.01 * 0.01)  # the cosine ends at its minimum


def test_train_head_only_leaves_everything_else_as_loaded(fmnist, tmp_path, capsys):
    """`--train head` from a finetuned checkpoint: every backbone weight and BatchNorm statistic as loaded,
    the (new) head trained; the recipe's default is plain cross-entropy."""
    assert finetune(fmnist, tmp_path / "a") == 0
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["label_smoothing"] == 0
    assert finetune(fmnist, tmp_path / "b", "--init", str(tmp_path / "a"), "--init-head", "new",
                    "--train", "head") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train"] == "head" and summary["init_head"] == "new"
    from kt.checkpoints import load_checkpoint

    a = load_checkpoint(tmp_path / "a" / "checkpoint").state_dict()
    b = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    for k in a:
        if k.startswith("head."):
            assert not torch.equal(a[k], b[k]), k
        else:
            assert torch.equal(a[k], b[k]), k
