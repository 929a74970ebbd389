"""kt.recipe: the method as data. `kt-recipe run|plan|report RECIPE.yaml`.

A recipe (`recipes/*.yaml`) declares the data, the teacher, the cache, the students and objectives, the labeled
budgets and seeds, the baselines and the report; the runner turns it into the stages the single commands run,
each into its own folder, and reports what finished.

- schema: what a recipe may say (typed dataclasses, unknown fields refused by path)
- plan: the recipe as stages (one command each, flags, folders, dependencies) and report rows
- runner: running the stages (in process or under a launcher), records, refusal of a changed recipe
- report: results.json, report.md, report.png from whatever has finished
- cli: `kt-recipe`

It sits above the stage packages (it runs `kt-cache`, `kt-student` and `kt-retrieve`); nothing imports it.
"""
