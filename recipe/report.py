"""The report of a recipe, from whatever has finished: `results.json`, `report.md`, `report.png` in its out.

A row's value is the mean ± sample std of its runs' `eval.json` (top-1 for classification, mIoU for
segmentation; `kt.student.evaluate.aggregate`, as `kt-student eval --runs` prints it); a row with unfinished runs
shows the runs it has and is listed under "Not finished". Tables: one per student (its rows, and the teacher
and IM-Pretrain rows as references), the teacher's variants, and the transfer-growth curve, whose points are
placed by the samples the student saw (transfer images x cached views x epochs).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from kt.recipe.plan import Plan
from kt.recipe.runner import Records

GROUP_COLORS = {"labels": "tab:gray", "im-pretrain": "tab:blue", "task-agnostic": "tab:orange",
                "task-oriented": "tab:green", "teacher": "black"}


def results(plan: Plan) -> dict:
    from kt.student.evaluate import aggregate

    recipe = plan.recipe
    metric = "miou" if recipe.task == "segmentation" else "top1"
    rows, missing = [], []
    images: dict[str, int] = {}
    for row in plan.rows:
        done = [n for n in row.runs if plan.stages[n].metrics.exists()]
        if len(done) < len(row.runs):
            missing.append({"table": row.table, "row": row.label, "budget": row.budget,
                            "runs": [n for n in row.runs if n not in done]})
        if not done:
            continue
        agg = aggregate([json.loads(plan.stages[n].metrics.read_text()) for n in done])
        entry = {"table": row.table, "row": row.label, "group": row.group, "budget": row.budget,
                 "mean": agg[f"{metric}_mean"], "std": agg[f"{metric}_std"], **agg, "run_dirs": done}
        if row.curve:
            spec = row.curve["transfer"]
            images[spec] = images.get(spec) or count_images(spec)
            seen = images[spec] * row.curve["views"] * row.curve["epochs"]
            entry.update(row=f"{images[spec]:,} images x {row.curve['views']} views x {row.curve['epochs']} epochs",
                         transfer=row.label, samples_seen=seen)
        rows.append(entry)
    records = Records(plan.out).data
    stages = [{"stage": n, "kind": s.kind, "seconds": (records.get(n) or {}).get("seconds")}
              for n, s in plan.stages.items()]
    return {"recipe": str(plan.path), "title": title(plan), "task": recipe.task, "metric": metric,
            "budget_unit": budget_unit(plan), "seeds": recipe.seeds, "rows": rows, "missing": missing,
            "stages": stages, "compute_s": round(sum(s["seconds"] or 0 for s in stages), 1)}


def count_images(spec: str) -> int:
    """Samples in a shard spec (keys only, nothing decoded)."""
    from kt.shards import BadSamples, expand_shards, iter_samples

    return sum(1 for _ in iter_samples(expand_shards(spec), decode=False, bad=BadSamples(1.0)))


def title(plan: Plan) -> str:
    return plan.recipe.report.title or f"kt recipe {plan.path.stem}"


def budget_unit(plan: Plan) -> str:
    return "labeled images" if plan.recipe.task == "segmentation" else "labels/class"


def write_report(plan: Plan, res: dict) -> None:
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "report.md").write_text(markdown(plan, res))
    figure(plan, res, out / "report.png")


def _cell(r: dict) -> str:
    return f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} ({r['runs']})"


def markdown(plan: Plan, res: dict) -> str:
    metric = "mIoU (%)" if res["metric"] == "miou" else "top-1 (%)"
    budgets, unit, rows = plan.recipe.budgets, res["budget_unit"], res["rows"]
    lines = [f"# {res['title']}", "",
             f"Test {metric}, mean ± std over finetune seeds {res['seeds']} (each seed its own labeled subset), the "
             f"runs in parentheses. Recipe `{res['recipe']}`; stage time {res['compute_s'] / 60:.1f} min.", ""]
    for table in dict.fromkeys(r["table"] for r in rows if r["table"] not in ("teacher variants", "curve")):
        lines += [f"## {table}", "", "| row | " + " | ".join(f"{b} {unit}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for label in dict.fromkeys(r["row"] for r in rows if r["table"] == table):
            hits = {r["budget"]: r for r in rows if r["table"] == table and r["row"] == label}
            lines.append(f"| {label} | " + " | ".join(_cell(hits[b]) if b in hits else "-" for b in budgets) + " |")
        lines.append("")
    variants = [r for r in rows if r["table"] == "teacher variants"]
    if variants:
        lines += [f"## Teacher variants ({variants[0]['budget']} {unit})", "", f"| recipe | {metric} |", "|---|---|"]
        lines += [f"| {r['row']} | {100 * r['mean']:.2f} |" for r in variants] + [""]
    curve = [r for r in rows if r["table"] == "curve"]
    if curve:
        lines += [f"## Transfer-growth curve: the task-oriented student as distilled ({curve[0]['budget']} {unit} "
                  "teacher)", "", f"| transfer | {metric} |", "|---|---|"]
        lines += [f"| {r['row']} | {100 * r['mean']:.2f} |" for r in curve] + [""]
    if res["missing"]:
        lines += ["## Not finished", ""] + [f"- {m['table']} | {m['row']} @ {m['budget']} {unit}: {len(m['runs'])} "
                                            "run(s)" for m in res["missing"]] + [""]
    if plan.recipe.report.note:
        lines += [plan.recipe.report.note.strip(), ""]
    return "\n".join(lines)


def figure(plan: Plan, res: dict, path: Path) -> None:
    """One bar chart per budget (every table's rows, references once), and the curve when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, budgets = res["rows"], plan.recipe.budgets
    metric = "mIoU (%)" if res["metric"] == "miou" else "top-1 (%)"
    tables = [t for t in dict.fromkeys(r["table"] for r in rows) if t not in ("teacher variants", "curve")]
    curve = [r for r in rows if r["table"] == "curve"]
    per_budget = []
    for b in budgets:
        seen, bars = set(), []
        for r in rows:
            key = tuple(r["run_dirs"])
            if r["budget"] == b and r["table"] in tables and key not in seen:
                seen.add(key)
                bars.append(r)
        per_budget.append(bars)
    panels = len(budgets) + bool(curve)
    height = 0.5 * max([len(b) for b in per_budget] + [4]) + 1.8
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, height), squeeze=False)
    for ax, b, bars in zip(axes[0], budgets, per_budget):
        if not bars:
            ax.axis("off")
            continue
        prefix = len(tables) > 1
        labels = [textwrap.fill((r["table"].replace("student ", "") + ": " if prefix and r["group"] not in ("teacher",)
                                 else "") + r["row"], 44) for r in bars]  # long rows wrap, never run off the edge
        ax.barh(labels, [100 * r["mean"] for r in bars], xerr=[100 * r["std"] for r in bars],
                color=[GROUP_COLORS[r["group"]] for r in bars], capsize=3)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel(f"test {metric}")
        ax.set_title(f"{b} {res['budget_unit']}")
        lo, hi = min(100 * r["mean"] for r in bars), max(100 * r["mean"] for r in bars)
        ax.set_xlim(max(0, lo - 10), min(100, hi + 5))
        ax.grid(axis="x", alpha=0.3)
    if curve:
        ax = axes[0][-1]
        curve = sorted(curve, key=lambda r: r["samples_seen"])
        ax.plot([r["samples_seen"] for r in curve], [100 * r["mean"] for r in curve], "o-", color="tab:green")
        for r in curve:
            ax.annotate(r["row"].replace(" views", "v").replace(" epochs", "ep"), (r["samples_seen"], 100 * r["mean"]),
                        fontsize=7, textcoords="offset points", xytext=(4, -10))
        drawn = set()
        for r in rows:  # what the curve would have to reach: the teacher it distills, ImageNet pretraining
            if r["budget"] == curve[0]["budget"] and r["group"] in ("teacher", "im-pretrain") and r["table"] in tables \
                    and r["row"] not in drawn:
                drawn.add(r["row"])
                ax.axhline(100 * r["mean"], color=GROUP_COLORS[r["group"]], ls="--", lw=1, label=r["row"])
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel("transfer: images x views x epochs (student samples seen)")
        ax.set_ylabel(f"distilled student {metric}, before finetuning")
        ax.set_title("transfer-growth curve")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the canvas grows to hold every label (docs/paper.png cut them)
    plt.close(fig)
