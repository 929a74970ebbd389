"""The embedded demo and experiment grids, on Fashion-MNIST, through the real `kt-*` commands.

    make demo                                   # = python -m tools.demo (preset "demo")
    python -m tools.demo --preset finetune      # issue-2 grid: Lite2 pretrained vs scratch vs mobilevitv2_050
    python -m tools.demo --preset full          # the whole grid (both budgets, both transfer sets)

Every row is a list of runs of the real CLIs in subprocesses (what a user would type); each finetune is
repeated over seeds and aggregated as mean ± std by `student.evaluate.aggregate`. A rerun skips runs whose
`eval.json` exists, so an interrupted grid resumes. Outputs: `OUT/results.json`, `OUT/report.md`,
`OUT/report.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kt.errors import cli_entry

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "fashion-mnist"


@dataclass
class Row:
    name: str  # label in the report
    model: str
    pretrained: str = "none"
    group: str = "supervised"


@dataclass
class Preset:
    """A grid: rows x labeled budgets x seeds, with the finetune settings shared by every run."""

    rows: list[Row]
    budgets: list[int] = field(default_factory=lambda: [50])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 20
    image_size: int = 64
    batch_size: int = 64
    lr: float = 2e-3


PRESETS: dict[str, Preset] = {
    # Issue 2: proof that the pretrained weights load and train (a >> b), plus a small student from scratch.
    # Expected: Lite2 pretrained clearly above Lite2 from scratch; see docs/results.md for the numbers.
    "finetune": Preset(rows=[
        Row("EfficientNet-Lite2, ImageNet-pretrained", "tf_efficientnet_lite2", "package", "teacher"),
        Row("EfficientNet-Lite2, from scratch", "tf_efficientnet_lite2", "none"),
        Row("MobileViT-V2-0.5, from scratch", "mobilevitv2_050", "none"),
    ]),
    # A minute-scale check that the whole path runs (CI-sized; numbers are meaningless).
    "smoke": Preset(rows=[Row("test_efficientnet, from scratch", "test_efficientnet")], budgets=[5], seeds=[0],
                    epochs=1, image_size=32, batch_size=16),
}
PRESETS["demo"] = PRESETS["finetune"]


def ensure_data() -> None:
    if not (DATA / "train").exists() or not (DATA / "test").exists():
        run([sys.executable, "-m", "tools.make_shards", "fashion-mnist", "--out", str(DATA)])


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finetune_run(row: Row, budget: int, seed: int, preset: Preset, out: Path) -> Path:
    run_dir = out / "runs" / f"{row.model}-{row.pretrained}-n{budget}-s{seed}"
    if (run_dir / "eval.json").exists():
        return run_dir
    run([sys.executable, "-m", "student.cli", "finetune", "--model", row.model, "--pretrained", row.pretrained,
         "--data", str(DATA / "train"), "--val-data", str(DATA / "test"), "--labels-per-class", str(budget),
         "--subset-seed", str(seed), "--seed", str(seed), "--epochs", str(preset.epochs),
         "--image-size", str(preset.image_size), "--batch-size", str(preset.batch_size), "--lr", str(preset.lr),
         "--out", str(run_dir)])
    return run_dir


def run_grid(preset: Preset, out: Path) -> dict:
    from student.evaluate import aggregate, format_mean_std, load_run_metrics

    results = {"rows": []}
    for budget in preset.budgets:
        for row in preset.rows:
            start = time.time()
            dirs = [finetune_run(row, budget, s, preset, out) for s in preset.seeds]
            agg = aggregate([load_run_metrics(d) for d in dirs])
            entry = {"row": row.name, "group": row.group, "model": row.model, "pretrained": row.pretrained,
                     "labels_per_class": budget, **agg, "runs_dirs": [str(d) for d in dirs],
                     "wall_s": round(time.time() - start, 1)}
            results["rows"].append(entry)
            print(f"{row.name} @ {budget}/class: {format_mean_std(agg)}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def write_report(results: dict, preset_name: str, preset: Preset, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# kt demo: preset `{preset_name}`", "",
             f"Fashion-MNIST test top-1 (%), mean ± std over seeds {preset.seeds}; {preset.epochs} epochs, "
             f"{preset.image_size} px.", "", "| row | labels/class | top-1 (%) | runs |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['row']} | {r['labels_per_class']} | {100 * r['top1_mean']:.2f} ± "
                     f"{100 * r['top1_std']:.2f} | {r['runs']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    budgets = sorted({r["labels_per_class"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 0.6 * len(results["rows"]) + 2),
                             squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        rows = [r for r in results["rows"] if r["labels_per_class"] == budget]
        ax.barh([r["row"] for r in rows], [100 * r["top1_mean"] for r in rows],
                xerr=[100 * r["top1_std"] for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("test top-1 (%)")
        ax.set_title(f"{budget} labels per class")
        lo = min(100 * r["top1_mean"] for r in rows)
        ax.set_xlim(max(0, lo - 10), 100)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)


@cli_entry("demo")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--full", action="store_const", const="full", dest="preset", help="the whole grid")
    p.add_argument("--out", type=Path, default=None, help="default: runs/<preset>")
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        p.error(f"preset {args.preset!r} is not defined yet; choose from {', '.join(sorted(PRESETS))}")
    preset = PRESETS[args.preset]
    out = args.out or ROOT / "runs" / args.preset
    out.mkdir(parents=True, exist_ok=True)
    ensure_data()
    results = run_grid(preset, out)
    write_report(results, args.preset, preset, out)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
