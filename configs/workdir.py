"""The config a train.py run started with, read back from its workdir's config.json.

  python eval.py --workdir=DIR                     # the default where DIR holds a config.json
  python train.py --config=configs/workdir.py:DIR --workdir=NEW_DIR   # a new run, DIR's config

train.py, eval.py and visualize_seg.py use it as their --config default when --workdir (or
--checkpoint) names a workdir with a config.json, so a run is resumed and evaluated with the
config it started with; --config.field=value overrides apply as to any config file.
"""

import os

from configs import fec_small, fpn_fec_small_ade20k
from fec_jax import cli, reporting

TEMPLATES = {  # each task's fields and their types (every config of a task has the same fields)
    "classification": fec_small.get_config,
    "segmentation": fpn_fec_small_ade20k.get_config,
}


def get_config(workdir: str = ""):
  if not workdir:
    raise ValueError("expected --config=configs/workdir.py:DIR, DIR a train.py workdir")
  where = os.path.join(workdir, reporting.CONFIG_FILE)
  saved = reporting.read_config(workdir)
  if saved is None:
    home = cli.home_in(workdir)
    if home is not None:  # configs/workdir.py:~/run: no shell expands a '~' after the ':'
      raise ValueError(
          f"{where} does not exist; expected a train.py workdir ({home!r} is not expanded here: "
          f"it names a folder {home!r} in the current directory; give the full path, "
          f"{os.path.expanduser(workdir)!r})"
      )
    raise ValueError(f"{where} does not exist; expected a train.py workdir")
  if "task" not in saved and "model" not in saved:  # a settings file of a project, say
    raise ValueError(
        f"{where} is not a train.py run's config (it has neither the task nor the model field): "
        "a config.json of one's own or of another program"
    )
  task = saved.get("task")
  if task not in TEMPLATES:
    raise ValueError(
        f"{where} holds the task {task!r}; expected one of {sorted(TEMPLATES)}, or for a task of "
        "your own (fec_jax.tasks.register), its config file as --config (in Python, that "
        "file's get_config(): a config.json cannot bring a task's code nor its fields' types)"
    )
  return reporting.restore_config(saved, TEMPLATES[task](), where)
