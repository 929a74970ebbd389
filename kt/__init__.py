"""kt: task-oriented knowledge transfer from vision foundation models to small task models.

`kt` holds the contracts that more than one stage needs (views, models, checkpoints and weights, shards and
segmentation masks (`masks`), config, errors); `models` builds a model by name, `weights` moves state dicts between kt's models and the
layouts timm and open_clip use, `checkpoints` writes and reads checkpoint folders (timm/open_clip model
folders + kt's card), names a model by run folder, checkpoint folder or name, and fingerprints it; the stages install beneath it as `kt.teacher_cache`, `kt.student` and `kt.retrieval`.
"""
import os as _os

# In a source checkout the stage folders (teacher_cache/, student/, retrieval/) sit beside kt/ and setuptools'
# package-dir installs them as kt.<stage>. Putting the checkout root on the package path lets a checkout that is
# on sys.path (python -m from its root, PYTHONPATH=checkout, a git worktree) import its own stages rather than
# those of whichever checkout was pip-installed in editable mode. An installed wheel has no pyproject.toml above
# kt/, so this does nothing there.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "student")):
    __path__.append(_root)
