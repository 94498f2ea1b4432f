"""What every fec-jax command shares: one-line errors for a user's mistakes, quiet logs, and
the compilation cache of a run.

  fail(message)             prints `error: <message>` to stderr and exits with status 2
  ArgumentParser            argparse's, with its mistakes one `error:` line (no usage block), an
                            unknown option first, with the one meant (`--images`: `--image`)
  HelpFormatter             --help with the description as written and the options' defaults
  user_errors(*types)       turns those exceptions (mistakes a user can fix) into fail(str(e))
  interruptible()           Ctrl-C as one line and exit status 130, not a traceback
  path_problem(...)         what is wrong with a path option: empty, or an unexpanded_home
  home_in(path)             the `~` or `~user` a path starts with that no one expanded, or None
  unexpanded_home(...)      a path option, config file or --config path field starting with a
                            `~` no shell expanded (`--workdir=~/runs`)
  check_paths_given(...)    fail() for path options with a path_problem
  not_a_directory(path)     what (if anything) keeps `path` from being a directory
  note_config_differences   a note where --config differs from a workdir's run in what it evaluates
  check_data_found(...)     fail() where the data folder of a run's own config is gone (moved)
  config_name(model)        the file name of a model's config in configs/
  check_config_found(...)   fail() where no --config was given and the checkpoint has no config.json
  check_input_size(...)     fail() unless a model takes an image size (before any slow work)
  quiet()                   drops the known-harmless log lines of orbax and jax, nothing else
  use_compilation_cache     JAX's persistent compilation cache in the workdir
  define_config_file(...)   config_flags.DEFINE_config_file, whose typos are one `error:` line
  default_config_file(...)  a --config default: the run's own config where the command names one
  run(main, errors=())      absl.app.run(main), with flag and --config.field mistakes reported as
                            one line (the did-you-mean hint included; a path field's unexpanded
                            `~`), then quiet() and user_errors(*errors) around main, interruptible

A traceback is left for what is a bug; a user's mistake (bad path, config typo, wrong checkpoint)
is one line saying what was expected.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib.util
import logging
import os
import re
import sys
import traceback
from typing import Callable, Iterator, NoReturn, Sequence

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from fec_jax import reporting
from fec_jax.model import SEGMENTERS, variable_shapes

EXIT_USAGE = 2  # argparse's status for a bad command line; every fec-jax command uses it
EXIT_INTERRUPTED = 130  # a shell's status for a command that Ctrl-C stopped: 128 + SIGINT

# The flags define_config_file defines belong to the script that calls it, so that its --help
# lists --config (absl gives a flag to the module that defines it, and --help shows the main's).
flags.disclaim_key_flags()


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` to stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """--help with the description as written and each option's default after its help (a list
  as the values one would type; none for an option without a default, or a flag)."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
      return action.help
    if isinstance(action.default, (list, tuple)):
      return f"{action.help} (default: {' '.join(map(str, action.default))})"
    return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser, with a mistake on the command line (an unknown or missing option, a bad
  value) reported by fail(), pointing to --help instead of printing the usage block. Long options
  must be spelt out: an abbreviation of one (--siz for --size) is a mistake too. `meant` maps
  another command's name of an option, which difflib would not find close, to the option meant
  and why (visualize.py's `--workdir`: `--checkpoint, which takes a train.py workdir too`)."""

  def __init__(self, meant: dict[str, str] | None = None, **kwargs):
    super().__init__(allow_abbrev=False, **kwargs)
    self._meant = meant or {}

  def parse_args(self, args=None, namespace=None):
    """argparse's, but an option this parser lacks is the mistake it reports first, with the
    option meant where one is close (`--num_clusters` for `--num-clusters`, `--images`): argparse
    says only that the option it replaced is required, or names no option. --help before it shows
    the help, as argparse's."""
    args = sys.argv[1:] if args is None else list(args)
    options = [o for action in self._actions for o in action.option_strings]
    for arg in args:
      if arg == "--" or arg in ("-h", "--help"):  # what follows is positional; the help comes first
        break
      name = arg.split("=", 1)[0]
      # argparse takes an argument with a space for a value (a file `--my photo.jpg`), not an option
      if name.startswith("--") and name not in options and " " not in arg:
        hint = (
            f"; did you mean {self._meant[name]}?"
            if name in self._meant
            else reporting.did_you_mean([name.replace("_", "-")], options)
        )
        self.error(f"unrecognized option {name}{hint}")
    return super().parse_args(args, namespace)

  def _check_value(self, action, value):
    """argparse's check of a value against an option's choices, its message as it is, with the
    choice meant where one is close (`--model fec_smal`): among names only, as a number close in
    its digits (10 for 1 of range(1, 5)) is not the one meant."""
    try:
      super()._check_value(action, value)
    except argparse.ArgumentError as e:
      hint = reporting.did_you_mean([value], action.choices) if isinstance(value, str) else ""
      raise argparse.ArgumentError(action, e.message + hint) from None

  def error(self, message: str) -> NoReturn:
    fail(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
  """Reports an exception of `types` (e.g. CheckpointError) as fail(str(e)); others propagate."""
  try:
    yield
  except types as e:
    fail(str(e))


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
  """Ctrl-C (SIGINT: Python's KeyboardInterrupt) as one line on stderr and exit status 130, as a
  shell reports a command it stopped, rather than a traceback of wherever the command was (deep
  in jax, numpy or PIL; a traceback means a bug). train.py's run handles SIGINT itself
  (fec_jax.preemption: it saves a checkpoint), this its start and end."""
  try:
    yield
  except KeyboardInterrupt:
    print("stopped by Ctrl-C (SIGINT)", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def path_problem(flag: str, value: str, expected: str) -> str | None:
  """What is wrong with a path option's value, or None: empty (`--workdir=$UNSET`), which would
  mean the current directory or fail after the slow work, or starting with a `~` that no shell
  expanded (`--workdir=~/runs`: a shell expands it at a word's start only), which would name a
  folder `~` in the current directory (an unexpanded_home). expected: what the path should be."""
  if value == "":
    return f"{flag} is empty; expected {expected}"
  return unexpanded_home(flag, value)


def home_in(path: str) -> str | None:
  """The `~` or `~user` that `path` starts with and that os.path.expanduser would expand (no one
  did), or None. A `~name` that names no user is a file name (`~draft.jpg`): a shell leaves it as
  it is too."""
  if not path.startswith("~") or os.path.expanduser(path) == path:
    return None
  return path.split("/", 1)[0]


def unexpanded_home(flag: str, value: str) -> str | None:
  """Why `value`, given to `flag` (a path option, a config file or a --config path field),
  starts with a `~` that no shell expanded (a home_in), or None."""
  home = home_in(value)
  if home is None:
    return None
  return (
      f"{flag} {value}: the shell expands '~' only at a word's start, not after {flag}=, so "
      f"this names a folder '{home}' in the current directory; write {flag} {value} (a space, "
      f"not '=') or {'the path with $HOME' if home == '~' else 'the full path'}"
  )


# The --config path fields read as given, '~' included: PATH_FIELDS but data.tfds_data_dir, which
# TFDS reads with its '~' expanded (fec_jax.data.tfds_data_dir), as config.json records it.
_UNEXPANDED_FIELDS = tuple(f for f in reporting.PATH_FIELDS if f != "data.tfds_data_dir")


def check_paths_given(paths: Sequence[tuple[str, str | None, str]]) -> None:
  """fail() for a path option given with a path_problem. paths: (option, value, what it
  names); a value None (not given) is fine."""
  for flag, value, expected in paths:
    problem = value is not None and path_problem(flag, value, f"the path of {expected}")
    if problem:
      fail(problem)


def not_a_directory(path: str) -> str | None:
  """What keeps `path` from being a directory (os.makedirs(path) would fail): '<path> is a file'
  or, where the blocker is a parent, '<parent> is a file' (absolute paths; 'is not a directory'
  for a non-file such as a broken link); None when `path` is or can become one."""
  path = os.path.abspath(path)
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if os.path.isdir(path):
    return None
  return f"{path} {'is a file' if os.path.isfile(path) else 'is not a directory'}"


def check_input_size(model, size: tuple[int, int], flag: str) -> None:
  """fail() unless `model` takes images of `size` (H, W): traced with shapes only (fast, no
  weights; every variable collection, as fpn_* have batch_stats), the model says which layer
  cannot take the size and why."""
  images = jax.ShapeDtypeStruct((1, *size, 3), jax.numpy.float32)
  try:
    jax.eval_shape(model.apply, variable_shapes(model), images)
  except ValueError as e:
    fail(f"{flag} {size[0]} {size[1]}: {e}")


# The config fields that decide what an evaluation of a trained model means: compared with the
# run's config.json by note_config_differences.
EVALUATION_FIELDS = (
    "task",
    "model.name",
    "data.source",
    "data.root",
    "data.tfds_name",
    "data.tfds_data_dir",
    "data.val_split",
    "data.num_classes",
    "data.image_size",
    "data.crop_pct",
    "data.eval_interpolation",
    "data.img_scale",
    "data.size_divisor",
    "data.reduce_zero_label",
    "data.ignore_index",
    "data.mean",
    "data.std",
    "data.demo_image_size",
    "data.demo_val_fraction",
    "data.demo_num_val",
    "data.demo_seed",
)


def note_config_differences(config, workdir: str | None, given: bool) -> None:
  """A note on stderr where `config` differs from the config the run in `workdir` started with
  (its config.json) in EVALUATION_FIELDS, e.g. the data or the image size; `given`: --config
  was given (else the default config, the run's own, differs by the command line's overrides)."""
  try:
    saved = reporting.read_config(workdir) if workdir else None
  except ValueError as e:  # the evaluation does not need it: say so and go on
    print(f"note: not compared with the run's config: {e}", file=sys.stderr)
    return
  from fec_jax import data  # here, not for every command: the converter reads no data

  recorded = data.recorded_fields(config.get("data"))  # as the run's config.json has them
  changes = (reporting.config_changes(saved, config, recorded) if saved is not None else None) or {}
  changed = [k for k in EVALUATION_FIELDS if k in changes]
  if changed:
    which = "--config differs" if given else "the --config.* overrides differ"
    listed = ", ".join(f"{k} {changes[k][1]!r} (the run's: {changes[k][0]!r})" for k in changed)
    print(f"note: {which} from {workdir}'s config.json in {listed}", file=sys.stderr)


def check_data_found(config, workdir: str, given: bool) -> None:
  """fail() where `config` is the run's own (--config not `given`: configs/workdir.py read it
  from `workdir`'s config.json) and a data folder it names as the run did (config.data.root,
  tfds_data_dir) is gone: the data moved since the run, which the data's own error, naming the
  folder alone, would not say."""
  if given or not reporting.has_config(workdir):
    return
  where = os.path.join(workdir, reporting.CONFIG_FILE)
  saved = reporting.read_config(workdir).get("data", {})
  for field in ("root", "tfds_data_dir"):
    folder = config.data.get(field, "")
    if folder and folder == saved.get(field) and not os.path.isdir(folder):
      fail(
          f"config.data.{field} {folder} (the run's, from {where}) is not a directory; if the "
          f"data moved, give --config.data.{field}=WHERE_IT_IS_NOW"
      )


def config_name(model: str) -> str:
  """The file name of a model's config in configs/: a classifier's own (fec_small.py), a
  segmenter's ADE20K recipe (fpn_fec_small_ade20k.py)."""
  return f"{model}_ade20k.py" if model in SEGMENTERS else f"{model}.py"


def check_config_found(directory: str, flag: str, held: str, given: bool, configs: str) -> None:
  """fail() where --config was not `given` and `directory` (holding model `held`) has no
  config.json to take it from (a convert_torch_weights.py output, a run of an earlier fec-jax):
  the command's fallback, a demo config, is not the checkpoint's. The line names the config of
  `held` in the folder `configs` where there is one."""
  if given or reporting.has_config(directory):
    return
  name = config_name(held)
  example = f" (e.g. configs/{name})" if os.path.isfile(os.path.join(configs, name)) else ""
  fail(
      f"{flag} {directory} has no {reporting.CONFIG_FILE} (a convert_torch_weights.py output, or "
      f"a run of an earlier fec-jax) to take the config from; give --config, the config of its "
      f"{held}{example}"
  )


def use_compilation_cache(workdir: str, create: bool = True) -> None:
  """Keeps the compiled train and eval steps in WORKDIR/compilation_cache (JAX's persistent
  compilation cache), so that the same command run again, to resume, loads them instead of
  compiling them anew, and eval.py on the workdir loads its eval steps. Without `create`, only
  where the folder is there (a train.py run's). The workdir is shared by all hosts, and JAX
  writes entries from process 0 only. A cache the user chose (JAX_COMPILATION_CACHE_DIR) is left
  as it is.

  Not for several CPU processes: there only process 0 finds its programs in the cache, and while
  the others compile (40 s for the demo on a loaded 2-core machine) its first collective waits
  for them, and gloo gives up after 30 s ('Gloo context initialization failed')."""
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    return
  if not_a_directory(workdir) is not None:  # a file in the way: the run's check says so, where
    return  # a cache there would first have JAX warn at each compile that it cannot read it
  path = os.path.join(os.path.abspath(workdir), reporting.COMPILATION_CACHE)
  if not jax.config.jax_compilation_cache_dir and (create or os.path.isdir(path)):
    jax.config.update("jax_compilation_cache_dir", path)
    # Without XLA's GPU autotuning cache in that folder: JAX passes its path to XLA in the compile
    # options, which are part of every cache key, so a copied or moved workdir found none of its
    # programs (a walk-through saw 32 s of compile instead of 6 s). The programs hold their
    # autotuned kernels; only a program that is not in the cache tunes anew.
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")


# --- quiet logs ------------------------------------------------------------------------------

_ORBAX_DIR = os.path.dirname(importlib.util.find_spec("orbax.checkpoint").origin)


def _harmless(record: logging.LogRecord) -> bool:
  """Orbax's INFO lines (dozens per checkpoint save or restore: handler registries, timings),
  jax's "Unable to initialize backend 'tpu'" (INFO: libtpu is installed on a machine without a
  TPU) and its "Resetting cache at ..." (INFO: a failed start removed the compilation cache it
  began and reset JAX's, loop._hold; the line named the removed folder above the error). Orbax's
  warnings and other backends' failures (a CUDA that does not start) still show."""
  if record.levelno >= logging.WARNING:
    return False
  if record.pathname.startswith(_ORBAX_DIR):
    return True
  message = record.getMessage()
  if record.name == "jax._src.compilation_cache":
    return message.startswith("Resetting cache at ")
  return record.name == "jax._src.xla_bridge" and message.startswith(
      "Unable to initialize backend 'tpu'"
  )


def _not_harmless(record: logging.LogRecord) -> bool:
  return not _harmless(record)


# orbax logs through absl's logger
_NOISY_LOGGERS = ("absl", "jax._src.xla_bridge", "jax._src.compilation_cache")


def quiet() -> None:
  """Drops the log records of `_harmless` at the loggers that emit them, so under absl.app.run
  and in a script or notebook that calls the library alike. Idempotent."""
  for name in _NOISY_LOGGERS:
    logger = logging.getLogger(name)
    if _not_harmless not in logger.filters:
      logger.addFilter(_not_harmless)


# --- absl flags and ml_collections config overrides ------------------------------------------


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
  """The value of the last --name=VALUE / --name VALUE in argv (absl: the last one wins)."""
  value = None
  for i, arg in enumerate(argv):
    for dashes in ("-", "--"):
      if arg.startswith(f"{dashes}{name}="):
        value = arg.split("=", 1)[1]
      elif arg == f"{dashes}{name}" and i + 1 < len(argv):
        value = argv[i + 1]
  return value


def _config_file_flags(flag_values: flags.FlagValues) -> dict[str, flags.Flag]:
  """The ml_collections config-file flags defined (--config and the like)."""
  return {
      name: flag_values[name]
      for name in flag_values
      if isinstance(flag_values[name].parser, ConfigFileFlagParser)
  }


def _unknown_field(config, path: str) -> str | None:
  """Why `path` (e.g. "model.drop_path_rate") names no field of config, or None if it does."""
  node, walked = config, []
  for part in path.split("."):
    if not hasattr(node, "keys"):
      return (
          f"config field '{'.'.join(walked)}' is a {type(node).__name__}, it has no field "
          f"'{part}'"
      )
    if part not in node.keys():
      where = f"'{'.'.join(walked)}'" if walked else "the config"
      known = sorted(node.keys())
      # a close name here, or the same name a level down (crop_size for data.crop_size)
      close = difflib.get_close_matches(part, known, n=1) or [
          f"{k}.{part}" for k in known if hasattr(node[k], "keys") and part in node[k].keys()
      ]
      hint = (
          f"did you mean '{'.'.join([*walked, close[0]])}'?"
          if close
          else f"the fields of {where} are: {', '.join(known)}"
      )
      return f"unknown config field '{'.'.join([*walked, part])}'; {hint}"
    node, walked = node[part], [*walked, part]
  return None


def _locked_field(error: Exception) -> str | None:
  """get_config's `config.max_step = 3` on a locked config, whose ml_collections error lists every
  field of the config in one line (thousands of characters) before its "Did you mean", as a short
  reason naming the field, the line that set it and the close name; None for another error."""
  found = re.search(
      r'Key "([^"]+)" does not exist and cannot be added since the config', str(error)
  )
  if not isinstance(error, AttributeError) or not found:
    return None
  package = os.path.dirname(ml_collections.__file__) + os.sep  # not a config file's folder name
  frames = [
      f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(package)
  ]
  where = f"{os.path.basename(frames[-1].filename)} line {frames[-1].lineno}" if frames else "it"
  close = re.search(r'Did you mean "([^"]+)" instead of', str(error))
  hint = f"did you mean {close[1]!r}? " if close else ""
  return (
      f"{where} sets the config field {found[1]!r}, which the config does not have; {hint}(a "
      "field of your own goes in with `with config.unlocked():`)"
  )


# ml_collections raises get_config's TypeError or ValueError again with this message and the
# traceback, whose last line is the original error.
_WRAPPED = "Error whilst parsing config file"


def _config_problem(
    name: str, parser: ConfigFileFlagParser, source: str, argv: Sequence[str], given: bool = True
) -> str | None:
  """Why config file `source` of flag --name (`given` on the command line, or its default)
  cannot be loaded, or the first --name.a.b=VALUE of argv that names no field of it; None if
  neither. A relative path not found from the current directory but from the command's own folder
  (the repository root, where configs/ is: train.py run from elsewhere) says where that is."""
  path = source.split(":", 1)[0]
  unexpanded = unexpanded_home(f"--{name}", path)
  if given and unexpanded and not os.path.exists(path):
    return unexpanded
  try:
    config = parser.parse(source)
    getattr(config, "keys", None)  # ml_collections defers some load errors to the first use
  except Exception as e:  # a config file is the user's code: loading it can raise anything
    lines = str(e).strip().splitlines()
    if os.path.exists(path) and lines and lines[0].startswith(_WRAPPED):
      # get_config's own complaint about its argument or the files it reads (configs/workdir.py)
      complaint = lines[-1].removeprefix("ValueError: ")
      if not given:
        return f"--{name} not given, and its default cannot be loaded: {complaint}; give --{name}"
      return f"--{name}={source}: {complaint}"
    if not os.path.exists(path):
      reason = "no such file"
      ours = path
      if argv:
        ours = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(argv[0])), path))
      if given and not os.path.isabs(path) and os.path.isfile(ours):
        reason += (
            f" in the current directory, {os.getcwd()}; the commands run from the repository "
            f"root, or give the full path: --{name}={ours}{source[len(path):]}"
        )
    elif isinstance(e, OSError):
      reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    else:  # SyntaxError, no get_config (AttributeError), the file defines flags (train.py), ...
      reason = _locked_field(e) or f"{type(e).__name__}: {lines[0]}"
    if not given:
      return (
          f"--{name} not given, and its default {source} cannot be loaded ({reason}); give --{name}"
      )
    return f"--{name}={source}: cannot load it ({reason}); expected a Python file with get_config()"
  if not hasattr(config, "keys"):
    return (
        f"--{name}={source}: its get_config() returned an object of type "
        f"{type(config).__name__}; expected an ml_collections.ConfigDict"
    )
  for arg in argv:
    for prefix in (f"--{name}.", f"-{name}."):
      if arg.startswith(prefix):
        problem = _unknown_field(config, arg[len(prefix) :].split("=", 1)[0])
        if problem:
          return problem
  return None


def define_config_file(
    name: str,
    default: str | None,
    help_string: str,
    flag_values: flags.FlagValues = flags.FLAGS,
    **kwargs,
):
  """config_flags.DEFINE_config_file. Where `default` is set and the command line has no --name,
  ml_collections loads the default right here, with the --name.field overrides of sys.argv: a
  mistake there is one `error:` line too (parse_flags reports the others). --help shows no
  default: the default is this checkout's path (or a run's), so `help_string` names it."""
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string, flag_values, **kwargs)
    flag_values[name].default_as_str = None
    return holder
  except flags.DuplicateFlagError:  # a script given as the config file: its loader reports it
    raise
  except Exception:  # a config file is the user's code (see _config_problem)
    problem = _config_problem(
        name, ConfigFileFlagParser(name), default, kwargs.get("sys_argv") or sys.argv, given=False
    )
    if problem is None:
      raise
    fail(problem)


def default_config_file(
    configs: str, fallback: str, run_flags: Sequence[str], argv: Sequence[str] | None = None
) -> str:
  """The --config default of a command that takes a run's directory: `configs`/workdir.py:DIR,
  the config the run started with (its config.json), where one of `run_flags` (--workdir, ...)
  names a directory DIR that holds a config.json; else `configs`/`fallback`."""
  argv = sys.argv if argv is None else argv
  try:  # --flagfile=FILE may give the directory (as ml_collections reads its overrides)
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error:  # an unreadable flag file: absl's parsing reports it
    pass
  for flag in run_flags:
    directory = _flag_argument(argv, flag)
    if directory and reporting.has_config(directory):
      return f"{os.path.join(configs, 'workdir.py')}:{directory}"
  return os.path.join(configs, fallback)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl.app.run's flags_parser: parses the flags; a mistake in them is one `error:` line."""
  try:
    rest = flag_values(argv)
    for name, flag in _config_file_flags(flag_values).items():
      if not hasattr(flag.value, "keys"):  # raises here if the config file did not load
        _fail_for_config_problem(argv, flag_values)  # get_config() returned no ConfigDict
      for field in _UNEXPANDED_FIELDS:  # --config.data.root=~/imagenet
        problem = unexpanded_home(
            f"--{name}.{field}", _flag_argument(argv, f"{name}.{field}") or ""
        )
        if problem:
          fail(problem)
  except flags.Error as e:  # unknown flag (absl's "Did you mean" included), bad value
    if isinstance(e, flags.DuplicateFlagError):  # a config file given twice, or one that is not
      _fail_for_config_problem(argv, flag_values, once=True)  # a config (it defines flags)
    if _WRAPPED in str(e):  # get_config raised a TypeError or ValueError
      _fail_for_config_problem(argv, flag_values)
    wrong = _wrong_value(str(e), argv, flag_values)
    if wrong:
      fail(wrong)
    missing = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", str(e))
    if missing:  # flags.mark_flag_as_required's wording
      fail(f"--{missing[1]} is missing: {flag_values[missing[1]].help}")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")  # a traceback inside
  except Exception:  # a config file is the user's code (see _config_problem)
    _fail_for_config_problem(argv, flag_values)
    raise
  return rest


def _wrong_value(message: str, argv: list[str], flag_values: flags.FlagValues) -> str | None:
  """absl's error for a --config.field value that is not of the field's type (`flag
  --config.epochs=many: invalid literal for int() with base 10: 'many'`; for a bool, `flag
  --config.data.reduce_zero_label=yes: ('Non-boolean argument to boolean flag', 'yes')`) as a
  line naming the type and the config's value; None for another error."""
  found = re.match(r"flag --(\w+)\.([\w.]+)=", message)
  flag = _config_file_flags(flag_values).get(found[1]) if found else None
  if flag is None or not hasattr(flag.value, "keys"):
    return None
  try:
    like = functools.reduce(lambda node, part: node[part], found[2].split("."), flag.value)
  except (KeyError, TypeError):
    return None
  if not isinstance(like, (int, float)):
    return None
  name = f"{found[1]}.{found[2]}"
  expected = "true or false" if isinstance(like, bool) else reporting.kind(like)
  return (
      f"flag --{name}={_flag_argument(argv, name)}: expected {expected} "
      f"(config.{found[2]} is {like!r})"
  )


def _fail_for_config_problem(argv: list[str], flag_values: flags.FlagValues, once=False) -> None:
  """fail() with the first config file flag's problem (_config_problem) if it has one; with
  `once`, a config file flag given more than once is one (absl lets the last one win, but the
  second defines each --name.field override again)."""
  for name, flag in _config_file_flags(flag_values).items():
    given = [a for a in argv if re.match(rf"--?{name}(=|$)", a)]
    if once and len(given) > 1:
      fail(f"--{name} is given {len(given)} times; give one config file")
    source = _flag_argument(argv, name)
    on_command_line = source is not None
    source = source if on_command_line else flag.default_unparsed
    problem = _config_problem(name, flag.parser, source, argv, on_command_line)
    if problem:
      fail(problem)


def run(main: Callable[[list[str]], object], errors: tuple[type[BaseException], ...] = ()):
  """absl.app.run(main) with one-line errors for flag and config mistakes and for `errors`
  raised by main, and the harmless log lines of quiet() dropped."""

  def checked(argv):
    quiet()
    with user_errors(*errors):
      return main(argv)

  with interruptible():
    app.run(checked, flags_parser=parse_flags)
