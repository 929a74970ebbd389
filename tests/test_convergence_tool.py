"""tools/convergence.py's tables and figures (docs/results.md, issue 22) read what `run` and `finetune` recorded:
the finetuned mean and std per distillation and recipe, the as-distilled and teacher figures of each run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools.convergence import main


def records(out):
    runs = [{"name": f"X{n}", "teacher": f"t{n}", "samples": 640, "train_agree_last": 0.5, "test_agree": 0.6,
             "test_top1": top1, "teacher_top1": teacher, "build_cpu_s": 1.0, "train_cpu_s": 2.0}
            for n, top1, teacher in ((10, 0.78, 0.75), (500, 0.86, 0.89))]
    fts = [{"name": f"X{n}/head/b10/s{s}", "init": f"runs/X{n}", "recipe": "head", "args": "", "budget": 10,
            "seed": s, "top1": top1, "as_distilled": None if n == 10 else 0.86, "cpu_s": 1.0}
           for n, tops in ((10, (0.70, 0.72, 0.74)), (500, (0.85, 0.87, 0.86))) for s, top1 in enumerate(tops)]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (out / "finetunes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fts))


def test_report_and_strength_read_the_records(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    records(tmp_path)
    main(["report", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "| X10 | - | head | 10 | 72.00 ± 2.00 | 3 |" in table  # a run without a recorded as-distilled figure
    assert "| X500 | 86.00 | head | 10 | 86.00 ± 1.00 | 3 |" in table
    assert (tmp_path / "convergence.png").stat().st_size > 0
    png = tmp_path / "strength.png"
    main(["strength", "--out", str(tmp_path), "--runs", "X500", "X10", "--recipe", "head",
          "--line", "IM-Pretrain=71.5", "--png", str(png)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["run"] for r in rows] == ["X500", "X10"]
    assert rows[1]["teacher"] == pytest.approx(75.0) and rows[1]["as_distilled"] == pytest.approx(78.0)
    assert rows[1]["finetuned"] == pytest.approx(72.0) and rows[1]["std"] == pytest.approx(np.std([70, 72, 74], ddof=1))
    assert png.stat().st_size > 0
