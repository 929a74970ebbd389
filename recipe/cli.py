"""kt-recipe: run | plan | report a recipe.

    kt-recipe plan recipes/demo.yaml      # the stages and the single command each amounts to; runs nothing
    kt-recipe run recipes/demo.yaml       # every stage not yet finished, then the report
    kt-recipe run recipes/demo.yaml --only 'teacher/*'     # those stages and what they need
    kt-recipe report recipes/demo.yaml    # report.md, report.png, results.json from whatever has finished

A rerun continues where a killed one stopped; a recipe changed over stages that have run is refused (one line
naming the field). Bad input (an unknown field, a missing file, inconsistent classes or sizes) is one line, exit 2;
a stage whose command fails stops the run with its one line (exit 2 for its bad input, 1 for a crash).
"""

from __future__ import annotations

import argparse
import sys

from kt.errors import cli_entry

PROG = "kt-recipe"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every stage not yet finished, then write the report")
    run.add_argument("recipe", help="the recipe YAML file")
    run.add_argument("--only", nargs="+", metavar="GLOB", default=None,
                     help="run the stages whose names match (and the stages they need); names as `plan` prints them")
    run.add_argument("--verbose", action="store_true", help="the commands' own output on the console, not only in "
                                                            "OUT/logs/")
    plan = sub.add_parser("plan", help="print the stages and the command each amounts to; run nothing")
    plan.add_argument("recipe")
    report = sub.add_parser("report", help="write the report from whatever has finished")
    report.add_argument("recipe")
    return parser


def run_command(args: argparse.Namespace) -> int:
    from kt.recipe.plan import load_plan
    from kt.recipe.report import results, write_report
    from kt.recipe.runner import StageFailed, run_plan

    plan = load_plan(args.recipe)
    try:
        run_plan(plan, args.only, args.verbose)
    except StageFailed as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if e.code == 2 else 1
    write_report(plan, results(plan))
    print(f"report: {plan.out / 'report.md'}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from kt.recipe.plan import load_plan
    from kt.recipe.runner import Records, status

    plan = load_plan(args.recipe)
    records = Records(plan.out)
    recipe = plan.recipe
    for i, stage in enumerate(plan.stages.values(), 1):
        under = recipe.launcher and stage.kind in recipe.launch
        command = f"{recipe.launcher} -m {stage.command.module} " + stage.shell().split(" ", 1)[1] if under \
            else stage.shell()
        print(f"{i:>3}. {stage.name}  [{stage.kind}, {status(stage, records)}]"
              + (f"  after {', '.join(stage.needs)}" if stage.needs else ""))
        print(f"     {command}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from kt.recipe.plan import load_plan
    from kt.recipe.report import results, write_report

    plan = load_plan(args.recipe)
    write_report(plan, results(plan))
    print((plan.out / "report.md").read_text())
    return 0


@cli_entry(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"run": run_command, "plan": plan_command, "report": report_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
