"""The commands' shared behaviour (fec_jax/cli.py), in process: a user's mistake is one `error:`
line with exit status 2 before any slow work; known-harmless log lines are dropped, nothing else.
visualize.py and python -m fec_jax.summary on bad input; the converter's are in test_convert.py."""

import argparse
import importlib
import json
import logging
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
from absl import flags
from flax import traverse_util
from PIL import ExifTags, Image

from configs import demo, demo_seg, fec_small, workdir
from fec_jax import checkpoint, cli, convert, create_model, reporting, summary, tasks, visualize
from fec_jax.data.transforms import decode
from fec_jax.model import FAST_COMPILE, variable_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outcome(capsys, fn, *args):
  """(exit status, stdout, stderr) of fn(*args); status 0 where it returns."""
  try:
    fn(*args)
    code = 0
  except SystemExit as e:
    code = e.code or 0
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_fail_and_user_errors(capsys):
  assert outcome(capsys, cli.fail, "no such file x") == (2, "", "error: no such file x\n")

  def raises(error):
    with cli.user_errors(checkpoint.CheckpointError):
      raise error

  assert outcome(capsys, raises, checkpoint.CheckpointError("bad dir")) == (
      2,
      "",
      "error: bad dir\n",
  )
  with pytest.raises(KeyError):  # not a user error: propagates as a traceback
    raises(KeyError("bug"))


def test_a_path_with_a_tilde_no_shell_expanded_is_an_error(capsys):
  """`--workdir=~/runs/demo` reaches the command with its `~` (a shell expands it at a word's
  start only): that was a folder named `~` in the current directory, trained in silently."""
  given = [("--workdir", "~/runs/demo", "the run's directory")]
  assert outcome(capsys, cli.check_paths_given, given) == (
      2,
      "",
      "error: --workdir ~/runs/demo: the shell expands '~' only at a word's start, not after "
      "--workdir=, so this names a folder '~' in the current directory; write --workdir "
      "~/runs/demo (a space, not '=') or the path with $HOME\n",
  )
  given = [("--workdir", "runs/~demo", "the run's directory")]  # '~' inside a name is a name
  assert outcome(capsys, cli.check_paths_given, given) == (0, "", "")
  # `--image ~draft.jpg`: a '~name' of no user is a file name, which a shell leaves as it is too
  given = [("--image", "~draft.jpg", "an image file")]
  assert outcome(capsys, cli.check_paths_given, given) == (0, "", "")
  given = [("--workdir", "~root/runs", "the run's directory")]  # a user's home, which a shell
  assert outcome(capsys, cli.check_paths_given, given)[2] == (  # expands: root's, on any Unix
      "error: --workdir ~root/runs: the shell expands '~' only at a word's start, not after "
      "--workdir=, so this names a folder '~root' in the current directory; write --workdir "
      "~root/runs (a space, not '=') or the full path\n"
  )


@pytest.mark.parametrize(
    "main,argv,expected",
    [
        (
            visualize.main,
            ["--checkpoint", "c", "--image", "a.jpg", "--out", "o", "--image-size", "abc"],
            "argument --image-size: invalid int value: 'abc' (see visualize.py --help)",
        ),
        (
            convert.main,
            ["--input", "a.pth", "--output", "o", "--model", "fec_smal"],
            "argument --model: invalid choice: 'fec_smal' (choose from 'fec_base', 'fec_base_det', "
            "'fec_base_seg', 'fec_large', 'fec_large_det', 'fec_large_seg', 'fec_small', "
            "'fec_small_det', 'fec_small_seg', 'fpn_fec_base', 'fpn_fec_large', 'fpn_fec_small'); "
            "did you mean fec_small? (see convert_torch_weights.py --help)\n",
        ),
        (
            summary.main,
            ["fec_small", "--siz", "224"],
            "unrecognized option --siz; did you mean --size? (see python -m fec_jax.summary "
            "--help)",
        ),
        (  # a misspelt required option: argparse said that --image was missing
            visualize.main,
            ["--checkpoint", "c", "--images", "a.jpg", "b.jpg", "--out", "o"],
            "error: unrecognized option --images; did you mean --image? (see visualize.py --help)",
        ),
        (  # eval.py's absl flags are written with '_'
            visualize.main,
            ["--checkpoint", "c", "--image", "a.jpg", "--out", "o", "--num_clusters=2"],
            "unrecognized option --num_clusters; did you mean --num-clusters?",
        ),
        (  # visualize_seg.py's name of it
            visualize.main,
            ["--checkpoint", "c", "--image", "a.jpg", "--output", "o"],
            "unrecognized option --output; did you mean --out?",
        ),
        (  # train.py's, eval.py's and visualize_seg.py's name of a run: argparse named no option
            visualize.main,
            ["--workdir=runs/demo", "--image", "a.jpg", "--out", "o"],
            "error: unrecognized option --workdir; did you mean --checkpoint, which takes a "
            "train.py workdir too? (see visualize.py --help)",
        ),
        (  # what follows '--' is no option
            summary.main,
            ["--", "--size"],
            "error: unknown model --size; the models are: fec_base,",
        ),
    ],
)
def test_argparse_mistakes_are_one_error_line(capsys, main, argv, expected):
  code, out, err = outcome(capsys, main, argv)
  assert (code, out) == (2, "") and err.startswith("error: ") and err.count("\n") == 1, err
  assert expected in err


@pytest.mark.parametrize(
    "kwargs, value, expected",
    [
        (
            {"choices": ["infer", "train"]},
            "infr",
            "'infr' (choose from 'infer', 'train'); did you mean infer?",
        ),
        (
            {"choices": {"infer": 1, "train": 2}},
            "trian",
            "'trian' (choose from 'infer', 'train'); did you mean train?",
        ),
        # a number close in its digits is no choice meant: it said '; did you mean 1?'
        ({"type": int, "choices": range(1, 5)}, "10", "10 (choose from 1, 2, 3, 4)"),
        ({"type": int, "choices": [1, 2, 4]}, "14", "14 (choose from 1, 2, 4)"),
        ({"type": float, "choices": [0.5, 1.0]}, "0.55", "0.55 (choose from 0.5, 1.0)"),
    ],
)
def test_an_invalid_choice_is_argparse_message_with_a_close_name(capsys, kwargs, value, expected):
  """cli.ArgumentParser's check of a choice says what argparse's says, for choices of any kind
  (a list, a dict, a range, values converted by type=), and the name meant where one is close."""
  parser = cli.ArgumentParser(prog="p")
  parser.add_argument("--x", **kwargs)
  assert outcome(capsys, parser.parse_args, ["--x", value]) == (
      2,
      "",
      f"error: argument --x: invalid choice: {expected} (see p --help)\n",
  )
  assert outcome(capsys, parser.parse_args, ["--x", str(next(iter(kwargs["choices"])))])[0] == 0


def test_an_invalid_choice_is_said_in_argparse_own_words(capsys, monkeypatch):
  """The message is argparse's own, whatever its Python's words are (it was written out again, as
  Python 3.11's says it), with the close name after it."""

  def check_value(self, action, value):
    if value not in action.choices:
      raise argparse.ArgumentError(action, f"{value} is not one of {', '.join(action.choices)}")

  monkeypatch.setattr(argparse.ArgumentParser, "_check_value", check_value)
  parser = cli.ArgumentParser(prog="p")
  parser.add_argument("--x", choices=["infer", "train"])
  assert outcome(capsys, parser.parse_args, ["--x", "infr"])[2] == (
      "error: argument --x: infr is not one of infer, train; did you mean infer? (see p --help)\n"
  )


def test_an_option_value_with_a_space_that_starts_like_an_option_is_a_value():
  """argparse reads an argument that holds a space as a value, not an option (a file named
  `--my photo.jpg`): the check for unknown options that runs first reads it so too."""
  parser = cli.ArgumentParser(prog="prog")
  parser.add_argument("--image", nargs="+", required=True)
  parser.add_argument("--title")
  args = parser.parse_args(["--image", "--my photo.jpg", "a.jpg", "--title", "-- a b"])
  assert (args.image, args.title) == (["--my photo.jpg", "a.jpg"], "-- a b")


def test_help_before_an_unknown_option_shows_the_help(capsys):
  """`visualize.py --help --images`: argparse's help, as before the check for unknown options
  (which said only `unrecognized option --images`)."""
  code, out, err = outcome(capsys, visualize.main, ["--help", "--images"])
  assert (code, err) == (0, "") and out.startswith("usage: visualize.py"), (out, err)


# --- config flags ----------------------------------------------------------------------------


@pytest.fixture
def parse(monkeypatch):
  """Parses argv with a --config file flag (configs/demo.py by default) on fresh flags, as
  train.py and eval.py define them; returns (status, stdout, stderr, the config)."""

  def parse_argv(capsys, *args, default="configs/demo.py", prog="prog", cwd=ROOT):
    argv = [prog, *args]
    monkeypatch.setattr("sys.argv", argv)  # ml_collections reads the overrides from sys.argv
    monkeypatch.chdir(cwd)
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    result = {}

    def define_and_parse():
      cli.define_config_file("config", default, "", flag_values=values)
      cli.parse_flags(argv, values)
      result["config"] = values.config

    return (*outcome(capsys, define_and_parse), result.get("config"))

  return parse_argv


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.global_batchsize=8"],
            "unknown config field 'global_batchsize'; did you mean 'global_batch_size'?",
        ),
        (
            ["--config=configs/demo.py", "--config.global_batchsize=8"],
            "unknown config field 'global_batchsize'; did you mean 'global_batch_size'?",
        ),
        (
            ["--config", "configs/demo.py", "--config.model.drop_pathrate=0.1"],
            "unknown config field 'model.drop_pathrate'; did you mean 'model.drop_path_rate'?",
        ),
        (["--config.model.name.x=1"], "config field 'model.name' is a str, it has no field 'x'"),
        (
            ["--config.num_workers=2"],  # a data field given at the top level
            "unknown config field 'num_workers'; did you mean 'data.num_workers'?",
        ),
        (
            ["--config=configs/nope.py"],
            "--config=configs/nope.py: cannot load it (no such file); expected a Python file with "
            "get_config()",
        ),
        (
            ["--config=configs/nope.py", "--config.epochs=1"],
            "--config=configs/nope.py: cannot load it (no such file); expected a Python file with "
            "get_config()",
        ),
        (["--workdirr=x"], "Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
        (  # absl's: "invalid literal for int() with base 10: 'many'"
            ["--config.epochs=many"],
            "flag --config.epochs=many: expected an int (config.epochs is 14)",
        ),
        (  # absl's: "could not convert string to float: 'none'"
            ["--config", "configs/demo.py", "--config.model.drop_path_rate", "none"],
            "flag --config.model.drop_path_rate=none: expected a float "
            "(config.model.drop_path_rate is 0.0)",
        ),
        (  # absl's: "('Non-boolean argument to boolean flag', 'yes')"
            ["--config=configs/demo_seg.py", "--config.data.reduce_zero_label=yes"],
            "flag --config.data.reduce_zero_label=yes: expected true or false "
            "(config.data.reduce_zero_label is False)",
        ),
        (  # ~ after '=' reaches the command: a folder '~' in the current directory
            ["--config=configs/fec_small.py", "--config.data.root=~/imagenet"],
            "--config.data.root ~/imagenet: the shell expands '~' only at a word's start, not "
            "after --config.data.root=, so this names a folder '~' in the current directory; "
            "write --config.data.root ~/imagenet (a space, not '=') or the path with $HOME",
        ),
        (
            ["--config=~/configs/demo.py"],
            "--config ~/configs/demo.py: the shell expands '~' only at a word's start, not after "
            "--config=, so this names a folder '~' in the current directory; write --config "
            "~/configs/demo.py (a space, not '=') or the path with $HOME",
        ),
        (
            ["--config.init_from=~/ckpt/fec_small"],
            "--config.init_from ~/ckpt/fec_small: the shell expands '~' only at a word's start, "
            "not after --config.init_from=, so this names a folder '~' in the current directory; "
            "write --config.init_from ~/ckpt/fec_small (a space, not '=') or the path with $HOME",
        ),
    ],
)
def test_config_mistakes_are_one_line(parse, capsys, args, message):
  code, out, err, _ = parse(capsys, *args)
  assert (code, out, err) == (2, "", f"error: {message}\n")


def test_a_config_of_the_repository_given_from_another_folder_says_where_it_is(
    parse, capsys, tmp_path
):
  """--config=configs/finetune.py in another folder than the repository root (where the docs run
  the commands) names the current folder and the full path of the command's own configs/ file;
  a file that the repository lacks too is "no such file" alone."""
  train = os.path.join(ROOT, "train.py")
  default = os.path.join(ROOT, "configs", "demo.py")
  for given, where in [
      ("configs/finetune.py", f"{ROOT}/configs/finetune.py"),
      ("configs/workdir.py:runs/a", f"{ROOT}/configs/workdir.py:runs/a"),
      ("./configs/finetune.py", f"{ROOT}/configs/finetune.py"),
      ("configs/nope.py", None),
  ]:
    code, out, err, _ = parse(
        capsys, f"--config={given}", default=default, prog=train, cwd=tmp_path
    )
    reason = "no such file" + (
        ""
        if where is None
        else f" in the current directory, {tmp_path}; the commands run from the repository root, "
        f"or give the full path: --config={where}"
    )
    assert (code, out, err) == (
        2,
        "",
        f"error: --config={given}: cannot load it ({reason}); expected a Python file with "
        "get_config()\n",
    )


def test_a_tfds_data_dir_with_a_tilde_is_read_as_tfds_reads_it(parse, capsys):
  """TFDS expands the `~` of its data_dir (and config.json records it expanded): no folder `~`
  of the current directory, so not the error of data.root's and init_from's."""
  args = ["--config=configs/fec_small.py", "--config.data.source=tfds"]
  code, out, err, config = parse(capsys, *args, "--config.data.tfds_data_dir=~/tfds")
  assert (code, out, err, config.data.tfds_data_dir) == (0, "", "", "~/tfds")


def test_the_demo_image_size_given_sets_the_demo_image_size(parse, capsys):
  """--config.data.demo_image_size=64 on configs/demo.py trains at 64 (it drew 64x64 digits and
  cropped them to 32x32); an image_size given too stays as given."""
  args = ["--config=configs/demo.py", "--config.data.demo_image_size=64"]
  code, out, err, config = parse(capsys, *args)
  assert (code, out, err, config.data.image_size) == (0, "", "", 64)
  code, out, err, config = parse(capsys, *args, "--config.data.image_size=32")
  assert (code, out, err, config.data.image_size) == (0, "", "", 32)


def test_the_demo_image_size_given_sets_the_segmentation_demo_crop_and_resize(parse, capsys):
  """--config.data.demo_image_size=96 on configs/demo_seg.py resizes and crops at 96 (they were
  64 whatever the size); an img_scale or crop_size given too stays as given."""
  args = ["--config=configs/demo_seg.py", "--config.data.demo_image_size=96"]
  code, out, err, config = parse(capsys, *args)
  assert (code, out, err) == (0, "", "")
  assert (config.data.img_scale, config.data.crop_size) == ((96, 96), (96, 96))
  code, out, err, config = parse(capsys, *args, "--config.data.crop_size=64,64")
  assert (code, out, err) == (0, "", "")
  assert (config.data.img_scale, config.data.crop_size) == ((96, 96), (64, 64))


@pytest.mark.parametrize(
    "source, reason",
    [
        ("x = 1\n", "AttributeError: module 'config_config' has no attribute 'get_config'"),
        ("def get_config(:\n", "SyntaxError: invalid syntax (bad.py, line 1)"),
        ("def get_config():\n  return undefined\n", "NameError: name 'undefined' is not defined"),
    ],
)
def test_a_file_that_is_not_a_config_is_one_line(
    parse, capsys, tmp_path, monkeypatch, source, reason
):
  """Loading a config file runs the user's code: whatever it raises is one line naming it."""
  (tmp_path / "bad.py").write_text(source)
  for args in ([], ["--config.seed=1"]):
    # ml_collections loads every config file as module 'config_config', into the namespace of
    # the one loaded before in this process (a command loads one)
    monkeypatch.delitem(sys.modules, "config_config", raising=False)
    code, out, err, _ = parse(capsys, f"--config={tmp_path / 'bad.py'}", *args)
    assert (code, out, err) == (
        2,
        "",
        f"error: --config={tmp_path / 'bad.py'}: cannot load it ({reason}); expected a Python "
        "file with get_config()\n",
    )


def test_a_config_that_refuses_its_argument_says_why_in_one_line(parse, capsys, tmp_path):
  """get_config's own ValueError (ml_collections raises it again with the traceback in its
  message) is the error line: configs/workdir.py without a workdir, or a file of the user's."""
  (tmp_path / "picky.py").write_text(
      "def get_config(size=''):\n  raise ValueError(f'size {size!r} is not one of: 1, 2')\n"
  )
  for source, message in (
      (f"{tmp_path / 'picky.py'}:3", "size '3' is not one of: 1, 2"),
      ("configs/workdir.py", "expected --config=configs/workdir.py:DIR, DIR a train.py workdir"),
      (
          f"configs/workdir.py:{tmp_path}",
          f"{tmp_path}/config.json does not exist; expected a train.py workdir",
      ),
  ):
    for args in ([], ["--config.seed=1"]):
      code, out, err, _ = parse(capsys, f"--config={source}", *args)
      assert (code, out, err) == (2, "", f"error: --config={source}: {message}\n")


def test_a_run_config_under_an_unexpanded_home_says_so(parse, capsys, tmp_path, monkeypatch):
  """No shell expands the '~' of configs/workdir.py:~/run (it follows a ':'), nor does
  get_config: the error named only a folder that "does not exist"."""
  monkeypatch.setenv("HOME", str(tmp_path))
  reporting.write_config(str(tmp_path / "run"), demo.get_config())
  message = (
      "~/run/config.json does not exist; expected a train.py workdir ('~' is not expanded here: "
      f"it names a folder '~' in the current directory; give the full path, '{tmp_path}/run')"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    workdir.get_config("~/run")
  code, out, err, _ = parse(capsys, "--config=configs/workdir.py:~/run")
  assert (code, out, err) == (2, "", f"error: --config=configs/workdir.py:~/run: {message}\n")


def test_a_script_given_as_the_config_is_one_line(parse, capsys, tmp_path, monkeypatch):
  """A script (train.py as --config) defines its own --config on loading: the error names the
  file, not an override checked against the script's default config."""
  (tmp_path / "script.py").write_text(
      "from absl import flags\n"
      "from fec_jax import cli\n"
      "values = flags.FlagValues()\n"
      "flags.DEFINE_string('config', None, '', flag_values=values)\n"
      "cli.define_config_file('config', 'configs/demo.py', '', flag_values=values)\n"
  )
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  code, out, err, _ = parse(capsys, f"--config={tmp_path / 'script.py'}", "--config.sed=1")
  assert (code, out) == (2, "") and err.count("\n") == 1, err
  assert err.startswith(
      f"error: --config={tmp_path / 'script.py'}: cannot load it (DuplicateFlagError: "
  ), err


def test_a_config_that_is_no_configdict_or_given_twice_is_one_line(parse, capsys, tmp_path):
  (tmp_path / "five.py").write_text("def get_config():\n  return 5\n")
  assert parse(capsys, f"--config={tmp_path / 'five.py'}")[:3] == (
      2,
      "",
      f"error: --config={tmp_path / 'five.py'}: its get_config() returned an object of type "
      "int; expected an ml_collections.ConfigDict\n",
  )
  # absl lets the last one win, but ml_collections defines every override flag a second time
  twice = ["--config=configs/demo.py", "--config", "configs/demo.py", "--config.seed=3"]
  assert parse(capsys, *twice)[:3] == (
      2,
      "",
      "error: --config is given 2 times; give one config file\n",
  )


def test_a_config_file_that_sets_a_field_the_config_lacks_is_a_short_line(parse, capsys, tmp_path):
  # ml_collections' error printed every field of the config (about 2,500 characters) first
  for field, hint in [("max_step", "did you mean 'max_steps'? "), ("model.zzzz", "")]:
    path = tmp_path / f"{field.replace('.', '_')}.py"
    path.write_text(
        f"from configs import demo\n\ndef get_config():\n  c = demo.get_config()\n"
        f"  c.{field} = 3\n  return c\n"
    )
    assert parse(capsys, f"--config={path}")[:3] == (
        2,
        "",
        f"error: --config={path}: cannot load it ({path.name} line 5 sets the config field "
        f"'{field.split('.')[-1]}', which the config does not have; {hint}(a field of your own "
        "goes in with `with config.unlocked():`)); expected a Python file with get_config()\n",
    )


def test_a_config_file_in_a_folder_named_like_ml_collections_is_named(parse, capsys, tmp_path):
  # frames were told from ml_collections' by that word in their path: the line named was another
  path = tmp_path / "ml_collections_configs" / "mine.py"
  path.parent.mkdir()
  path.write_text(
      "from configs import demo\n\ndef get_config():\n  c = demo.get_config()\n"
      "  c.max_step = 3\n  return c\n"
  )
  assert "(mine.py line 5 sets the config field 'max_step'" in parse(capsys, f"--config={path}")[2]


def test_unknown_field_without_a_close_name_lists_the_fields(parse, capsys):
  code, _, err, _ = parse(capsys, "--config=configs/demo.py", "--config.data.zzzzzz=1")
  assert (
      code == 2
      and err.startswith("error: unknown config field 'data.zzzzzz'; the fields of 'data' are: ")
      and err.count("\n") == 1
  ), err


@pytest.mark.parametrize(
    "config_file, override, message",
    [
        (
            "configs/demo.py",
            "--config.data.mean=(0.5,x,3)",
            "config.data: mean must hold numbers, got ('(0.5,x,3)',); e.g. "
            "--config.data.mean=0.485,0.456,0.406",
        ),
        (
            "configs/demo.py",
            "--config.data.scale=(0.5,x)",
            "config.data: scale must hold numbers, got ('(0.5,x)',); e.g. "
            "--config.data.scale=0.08,1.0",
        ),
        (
            "configs/demo_seg.py",
            "--config.data.std=0.2,x,0.2",
            "config.data: std must hold numbers, got ('0.2,x,0.2',); e.g. "
            "--config.data.std=0.229,0.224,0.225",
        ),
    ],
)
def test_an_override_of_numbers_with_a_word_is_one_line(
    parse, capsys, config_file, override, message
):
  """ml_collections makes a tuple override that does not parse a tuple of one string, on which
  the data checks' comparisons raised a TypeError (a traceback)."""
  code, _, err, config = parse(capsys, f"--config={config_file}", override)
  assert (code, err) == (0, "")
  with pytest.raises(ValueError) as e:
    tasks.get(config).check_config()
  assert str(e.value) == message


def test_good_overrides_apply(parse, capsys):
  code, _, err, config = parse(
      capsys,
      "--config=configs/demo.py",
      "--config.global_batch_size=8",
      "--config.model.drop_path_rate=0.2",
  )
  assert (code, err) == (0, "")
  assert (config.global_batch_size, config.model.drop_path_rate) == (8, 0.2)


STANDALONE_CONFIGS = sorted(  # workdir.py reads back a run's config (below)
    p.stem for p in pathlib.Path(ROOT, "configs").glob("*.py") if p.name != "workdir.py"
)


@pytest.mark.parametrize("name", STANDALONE_CONFIGS)
def test_a_run_config_comes_back_from_its_config_json(name, tmp_path):
  """configs/workdir.py:DIR is the config the run in DIR started with: the same fields, values
  and types (the tuples that config.json holds as lists included)."""
  started = importlib.import_module(f"configs.{name}").get_config()
  reporting.write_config(str(tmp_path), started)
  restored = workdir.get_config(str(tmp_path))

  def typed(config):
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {key: (type(value), value) for key, value in flat.items()}

  assert typed(restored) == typed(started)
  assert restored.is_locked


@pytest.fixture
def run_dir(tmp_path):
  """A workdir of a demo run (its config.json only) and the config.json's data."""
  reporting.write_config(str(tmp_path), demo.get_config())
  return tmp_path, json.loads((tmp_path / reporting.CONFIG_FILE).read_text())


def test_without_config_a_command_on_a_workdir_takes_the_runs_config(parse, capsys, run_dir):
  directory, saved = run_dir
  saved["seed"], saved["data"]["mean"] = 7, [0.5, 0.5, 0.5]  # a run of other values
  (directory / reporting.CONFIG_FILE).write_text(json.dumps(saved))
  for argv in (["--workdir", str(directory)], [f"--checkpoint={directory}"]):
    assert cli.default_config_file("configs", "demo.py", ("workdir", "checkpoint"), argv) == (
        f"configs/workdir.py:{directory}"
    )
  (directory / "flags.txt").write_text(f"--workdir={directory}\n")
  flagfile = [f"--flagfile={directory / 'flags.txt'}"]
  assert cli.default_config_file("configs", "demo.py", ("workdir",), flagfile) == (
      f"configs/workdir.py:{directory}"
  )
  for argv in ([], [f"--workdir={directory / 'new'}"], [f"--checkpoint={directory}"]):
    assert cli.default_config_file("configs", "demo.py", ("workdir",), argv) == "configs/demo.py"
  default = cli.default_config_file("configs", "demo.py", ("workdir",), [f"--workdir={directory}"])
  code, _, err, config = parse(capsys, "--config.eval_batch_size=8", default=default)
  assert (code, err) == (0, "")
  assert (config.seed, config.data.mean, config.eval_batch_size) == (7, (0.5, 0.5, 0.5), 8)


def test_a_run_whose_data_moved_is_one_error_line_naming_its_config_json(tmp_path, capsys):
  """The run's own config (no --config) names a data folder that is gone: one line that says
  where the folder came from and what to give; a --config, an override of the folder, or a
  folder still there pass (where the folder is missing, the data's own error follows)."""
  for source, field in (("folder", "root"), ("tfds", "tfds_data_dir")):
    config = fec_small.get_config()
    config.data.source, config.data[field] = source, str(tmp_path / "moved")
    run = tmp_path / source
    reporting.write_config(str(run), config)
    config = workdir.get_config(str(run))
    with pytest.raises(SystemExit) as e:
      cli.check_data_found(config, str(run), given=False)
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: config.data.{field} {tmp_path / 'moved'} (the run's, from "
        f"{run / reporting.CONFIG_FILE}) is not a directory; if the data moved, give "
        f"--config.data.{field}=WHERE_IT_IS_NOW\n"
    )
    cli.check_data_found(config, str(run), given=True)
    config.data[field] = str(tmp_path / "elsewhere")
    cli.check_data_found(config, str(run), given=False)
    config.data[field] = str(tmp_path / "moved")
    (tmp_path / "moved").mkdir(exist_ok=True)
    cli.check_data_found(config, str(run), given=False)
    (tmp_path / "moved").rmdir()
  cli.check_data_found(config, str(tmp_path / "fresh"), given=False)  # no config.json: no run


def test_a_config_json_without_a_field_added_later_gets_its_default(tmp_path):
  """data.class_names came after the first segmentation runs, init_from_step and
  init_from_required after the first runs: their config.json lacks them."""
  reporting.write_config(str(tmp_path), demo_seg.get_config())
  saved = json.loads((tmp_path / reporting.CONFIG_FILE).read_text())
  del saved["data"]["class_names"], saved["init_from_step"], saved["init_from_required"]
  saved["data"]["demo_num_val"] = 7
  (tmp_path / reporting.CONFIG_FILE).write_text(json.dumps(saved))
  config = workdir.get_config(str(tmp_path))
  assert (config.data.class_names, config.init_from_step, config.data.demo_num_val) == ((), -1, 7)
  assert not config.init_from_required
  del saved["data"]["reduce_zero_label"]  # not one of them
  (tmp_path / reporting.CONFIG_FILE).write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="lacks data.reduce_zero_label: it is not a config of"):
    workdir.get_config(str(tmp_path))


def test_the_config_json_of_a_task_of_ones_own_says_where_its_config_is(tmp_path):
  # from Python, the error named only --config, a command's flag
  config = demo.get_config()
  config.task = "mine"
  reporting.write_config(str(tmp_path), config)
  with pytest.raises(ValueError, match=r"task 'mine'; .* as --config \(in Python, that file's "):
    workdir.get_config(str(tmp_path))


@pytest.mark.parametrize(
    "case, reason",
    [
        ("earlier", "lacks data.mean, data.std: it is not a config of this fec-jax's "),
        ("later", "has the unknown data.new_field: it is not a config of this fec-jax"),
        ("task", "holds the task 'detection'; expected one of ['classification', "),
        ("type", "holds epochs as 'many'; expected an int"),
        ("null", "holds seed as None; expected an int"),
        ("nested", "holds data.mean as ((0.5,), (0.5,), (0.5,)); expected a tuple of float values"),
        ("unserializable", "holds data.root as 'unserializable object: <object>', a value JSON"),
        ("not_json", "is not JSON (Expecting property name enclosed in double quotes"),
        ("not_utf8", "is not JSON ('utf-8' codec can't decode byte 0xff in position 0"),
        ("list", "holds a JSON list; expected an object, the config the run started with"),
        ("foreign", "is not a train.py run's config (it has neither the task nor the model "),
        ("directory", "is a directory; expected the config the run started with, a file"),
    ],
)
def test_a_runs_config_json_that_is_no_config_is_one_line(parse, capsys, run_dir, case, reason):
  directory, saved = run_dir
  if case == "earlier":
    del saved["data"]["mean"], saved["data"]["std"]
  elif case == "later":
    saved["data"]["new_field"] = 1
  elif case == "task":
    saved["task"] = "detection"
  elif case == "type":
    saved["epochs"] = "many"
  elif case == "null":
    saved["seed"] = None
  elif case == "nested":
    saved["data"]["mean"] = [[0.5], [0.5], [0.5]]
  elif case == "list":
    saved = [saved]
  elif case == "foreign":  # a project's settings: it was "holds the task None"
    saved = {"name": "my project"}
  elif case == "unserializable":
    saved["data"]["root"] = f"{reporting.UNSERIALIZABLE}: <object>"
  path = directory / reporting.CONFIG_FILE
  path.unlink()
  if case == "directory":
    path.mkdir()
  else:
    path.write_bytes(
        {"not_json": b"{", "not_utf8": b"\xff{}"}.get(case, json.dumps(saved).encode())
    )
  code, out, err, _ = parse(capsys, default=f"configs/workdir.py:{directory}")
  assert (code, out) == (2, "") and err.count("\n") == 1, err
  start = "error: --config not given, and its default cannot be loaded: "
  assert err.startswith(f"{start}{path} {reason}") and err.endswith("; give --config\n"), err


def test_run_reports_mistakes_and_user_errors(monkeypatch, capsys):
  """cli.run: absl.app.run with parse_flags, quiet() and user_errors around main."""
  monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # app.run adds one

  def main(argv):
    raise checkpoint.CheckpointError(f"nothing at {argv[1]}")

  monkeypatch.setattr("sys.argv", ["prog", "here"])
  assert outcome(capsys, cli.run, main, (checkpoint.CheckpointError,)) == (
      2,
      "",
      "error: nothing at here\n",
  )
  monkeypatch.setattr("sys.argv", ["prog", "--no_such_flag=1"])
  assert outcome(capsys, cli.run, main) == (
      2,
      "",
      "error: Unknown command line flag 'no_such_flag'\n",
  )


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
  """Ctrl-C during eval.py or visualize.py printed Python's KeyboardInterrupt traceback, from
  wherever the command was (numpy, jax's tracing): the absl commands (cli.run) and the argparse
  ones (their __main__) say that Ctrl-C stopped them, in one line."""
  monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # app.run adds one
  stopped = (130, "", "stopped by Ctrl-C (SIGINT)\n")

  def main(*_):
    raise KeyboardInterrupt

  def interrupted(fn, *args):
    try:
      return outcome(capsys, fn, *args)
    except KeyboardInterrupt:  # pytest takes it for its own Ctrl-C and stops the session
      return "a KeyboardInterrupt traceback"

  monkeypatch.setattr("sys.argv", ["prog"])
  assert interrupted(cli.run, main) == stopped
  monkeypatch.setattr(cli.ArgumentParser, "parse_args", main)
  for script in ("visualize.py", "convert_torch_weights.py"):
    path = os.path.join(ROOT, script)
    assert interrupted(runpy.run_path, path, None, "__main__") == stopped, script
  monkeypatch.delitem(sys.modules, "fec_jax.summary")  # runpy runs it anew as __main__
  assert interrupted(runpy.run_module, "fec_jax.summary", None, "__main__") == stopped


# --- quiet logs ------------------------------------------------------------------------------


def record(name, level, message, pathname=__file__):
  return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_quiet_drops_only_the_harmless_lines():
  cli.quiet()
  cli.quiet()  # idempotent
  assert logging.getLogger("absl").filters.count(cli._not_harmless) == 1
  orbax_file = os.path.join(cli._ORBAX_DIR, "checkpoint_manager.py")
  tpu = "Unable to initialize backend 'tpu': NOT_FOUND: TPU initialization failed"
  cache = "jax._src.compilation_cache"  # a failed start resets it (loop._hold)
  dropped = [
      record("absl", logging.INFO, "Found 1 checkpoint steps", orbax_file),
      record("jax._src.xla_bridge", logging.INFO, tpu),
      record(cache, logging.INFO, "Resetting cache at runs/a/compilation_cache."),
  ]
  kept = [
      record("absl", logging.WARNING, "a real orbax warning", orbax_file),
      record("jax._src.xla_bridge", logging.INFO, "Unable to initialize backend 'cuda': x"),
      record("jax._src.xla_bridge", logging.WARNING, tpu),
      record("absl", logging.INFO, "step 10: loss 2.3"),  # our own progress lines
      record(cache, logging.WARNING, "Error writing persistent compilation cache entry"),
  ]
  passes = [bool(logging.getLogger(r.name).filter(r)) for r in dropped + kept]
  assert passes == [False] * 3 + [True] * 5


def zero_weights(directory, name: str, **overrides) -> None:
  """A converter-style checkpoint of model `name` with zero weights (and BatchNorm statistics)."""
  variables = jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), variable_shapes(create_model(name, **overrides))
  )
  checkpoint.save_params(
      str(directory), variables["params"], name, overrides, variables.get("batch_stats")
  )


def test_converted_weights_are_not_called_step_0(tmp_path):
  """eval.py's line names the weights it read: a converter output has no step of a run."""
  zero_weights(tmp_path / "c", "fec_small", num_classes=3)
  assert checkpoint.weights_name(str(tmp_path / "c"), 0) == "converted weights"
  os.mkdir(tmp_path / "c" / "0" / checkpoint.PROGRESS_ITEM)  # as a train.py step holds it
  assert checkpoint.weights_name(str(tmp_path / "c"), 0, ema=True) == "step 0, EMA weights"


def test_a_step_that_is_not_an_int_is_named(tmp_path):
  """load_pretrained(DIR, step="0") said "DIR has no step 0; saved steps: [0]"."""
  zero_weights(tmp_path / "c", "fec_small", num_classes=3)
  for step in ("0", 0.0, True):
    with pytest.raises(TypeError, match=f"step must be an int, a saved step of .*, got {step!r}"):
      checkpoint.load_pretrained(tmp_path / "c", step=step)
  assert checkpoint.load_model(tmp_path / "c", np.int64(0))[1] == 0


def test_checkpoint_load_logs_nothing_harmful(tmp_path, caplog, monkeypatch):
  """load_pretrained: no "Given directory is read only" warning; its INFO lines are orbax's,
  which quiet() drops, in a script too (outside absl.app.run)."""
  monkeypatch.setattr(logging.getLogger("absl"), "filters", [])  # without quiet()
  zero_weights(tmp_path / "c", "fec_small", num_classes=3)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    checkpoint.load_pretrained(tmp_path / "c")
  assert caplog.records and not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert all(cli._harmless(r) for r in caplog.records), [r.getMessage() for r in caplog.records]
  assert sorted(os.listdir(tmp_path / "c")) == ["0"]  # loading writes nothing
  cli.quiet()
  caplog.clear()
  with caplog.at_level(logging.INFO):
    checkpoint.load_pretrained(tmp_path / "c")
  assert not caplog.records


# --- python -m fec_jax.summary ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["fec_smal"],
            "unknown model fec_smal; the models are: fec_base, fec_base_det, fec_base_seg, "
            "fec_large, fec_large_det, fec_large_seg, fec_small, fec_small_det, "
            "fec_small_seg, fpn_fec_base, fpn_fec_large, fpn_fec_small; did you mean fec_small?\n",
        ),
        (
            ["fec_bse", "fec_small", "segformer", "fpn_fec_smal"],
            "unknown model fec_bse, fpn_fec_smal, segformer; the models are: fec_base, ",
        ),
        (
            ["fec_small", "--size", "60"],
            "--size 60 60: network.1: ClusterPool needs an even feature "
            "map (per fold region), got 15x15;",
        ),
        (["fec_small", "--size", "1", "2", "3"], "--size takes H or H W (positive), got 1 2 3"),
    ],
)
def test_summary_mistakes(capsys, args, message):
  code, out, err = outcome(capsys, summary.main, args)
  assert (code, out) == (2, "") and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_mistyped_model_or_task_name_is_given_the_closest_name(capsys):
  """A model name one letter off: every command that takes one says which it may mean, as for an
  unknown option (summary listed the models only; the config's check too); config.task too."""
  code, _, err = outcome(
      capsys, summary.main, ["fec_bse", "fec_small", "segformer", "fpn_fec_smal"]
  )
  assert code == 2 and err.endswith("; did you mean fec_base, fpn_fec_small?\n"), err
  with pytest.raises(ValueError, match=r"; available: fec_base, .*; did you mean fec_large\?$"):
    create_model("fec_larg")
  with pytest.raises(convert.ConversionError, match=r"; did you mean fpn_fec_base\?$"):
    convert.torch_to_variables({}, "fpn_fec_bas")
  config = demo.get_config()
  config.model.name = "fec_smal"
  with pytest.raises(ValueError) as e:
    tasks.get(config).check_config()
  assert str(e.value) == (
      "config.model.name 'fec_smal' is not a classification variant; choose one of ['fec_base', "
      "'fec_large', 'fec_small']; did you mean fec_small?"
  )
  config = demo_seg.get_config()
  config.model.name = "fpn_fec_smal"
  with pytest.raises(ValueError) as e:
    tasks.get(config).check_config()
  assert str(e.value) == (
      "config.model.name 'fpn_fec_smal' is not a segmenter; choose one of ['fpn_fec_base', "
      "'fpn_fec_large', 'fpn_fec_small']; did you mean fpn_fec_small?"
  )
  config.task = "segmentaton"
  with pytest.raises(ValueError) as e:
    tasks.get(config)
  assert str(e.value) == (
      "config.task 'segmentaton' is not a task; choose one of ['classification', 'segmentation']; "
      "did you mean segmentation? (a task of your own: fec_jax.tasks.register('segmentaton', "
      "YourTask) first, e.g. in the config file that names it)"
  )
  assert reporting.did_you_mean(["segformer"], ["fec_small"]) == ""  # no name is close


def test_a_model_name_that_is_no_str_is_an_unknown_model_still():
  """did_you_mean leaves out what is no str: a model name None (a config file's) was a TypeError
  of difflib's ('NoneType' object is not iterable) instead of the unknown model's error."""
  with pytest.raises(
      ValueError, match=r"^unknown model None; available: fec_base, .*, fpn_fec_small$"
  ):
    create_model(None)
  with pytest.raises(convert.ConversionError, match=r"^unknown model 3; available: fec_base, "):
    convert.torch_to_variables({}, 3)
  config = demo.get_config()
  config.model.name = None
  with pytest.raises(ValueError, match=r"^config.model.name None is not a classification variant"):
    tasks.get(config).check_config()
  assert reporting.did_you_mean([None, 3, "fec_smal"], [1, None, "fec_small"]) == (
      "; did you mean fec_small?"
  )


def test_summary_of_a_segmenter(monkeypatch, capsys):
  """fpn_* apply with their batch_stats too: the size check and the MACs' compile take them."""
  compile_lowered = jax.stages.Lowered.compile

  def quick(lowered, compiler_options=None):  # the same cost analysis, 2x faster to compile
    return compile_lowered(lowered, FAST_COMPILE)

  monkeypatch.setattr(jax.stages.Lowered, "compile", quick)
  code, out, err = outcome(capsys, summary.main, ["fpn_fec_small", "--size", "32"])
  assert (code, err) == (0, ""), err
  assert out.splitlines()[1].split()[:3] == ["fpn_fec_small", "9,568,286", "9.13"], out
  code, out, err = outcome(capsys, summary.main, ["fpn_fec_small", "--size", "60"])
  assert (code, out) == (2, "") and err.count("\n") == 1, err
  assert err.startswith("error: --size 60 60: backbone.network.1: ClusterPool needs an even"), err


# --- visualize.py ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Converter-style checkpoints of fec_small and of the segmenter fpn_fec_small, a photo, a
  truncated and a non-image file, an output directory that holds photo_encodings.png."""
  root = tmp_path_factory.mktemp("vis")
  zero_weights(root / "ckpt", "fec_small", num_classes=1000)
  zero_weights(root / "fpn", "fpn_fec_small")
  Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(root / "photo.jpg")
  (root / "truncated.jpg").write_bytes((root / "photo.jpg").read_bytes()[:300])
  (root / "notes.jpg").write_text("not an image")
  (root / "held").mkdir()
  (root / "held" / "photo_encodings.png").write_bytes(b"mine")
  return root


VISUALIZE_MISTAKES = [
    (
        "image size count",
        ["--image-size", "64", "64", "64"],
        "--image-size takes S or H W (positive), got 64 64 64",
    ),
    (
        "image size for the model",
        ["--image-size", "60"],
        "--image-size 60 60: network.1: ClusterPool needs an even feature map",
    ),
    (
        "even median filter",
        ["--median-filter", "4"],
        "--median-filter must be odd (or 0 = off), got 4",
    ),
    ("no clusters", ["--num-clusters", "0"], "--num-clusters must be at least 1, got 0"),
    ("alpha", ["--alpha", "2"], "--alpha is an opacity between 0 and 1, got 2.0"),
    ("missing image", ["--image", "{root}/nope.jpg"], "--image {root}/nope.jpg does not exist"),
    (
        "directory as image",
        ["--image", "{root}"],
        "--image {root} is a directory; expected image files",
    ),
    (
        "truncated image",
        ["--image", "{root}/truncated.jpg"],
        "--image {root}/truncated.jpg is not a readable image (OSError: ",
    ),
    (
        "not an image",
        ["--image", "{root}/notes.jpg"],
        "--image {root}/notes.jpg is not a readable image (UnidentifiedImageError: ",
    ),
    (
        "file as output",
        ["--out", "{root}/photo.jpg"],
        "--out {root}/photo.jpg: {root}/photo.jpg is a file; expected a directory for the PNGs",
    ),
    (
        "file as a parent of the output",
        ["--out", "{root}/photo.jpg/sub"],
        "--out {root}/photo.jpg/sub: {root}/photo.jpg is a file; expected a directory for the PNGs",
    ),
    (
        "empty output",
        ["--out", ""],
        "--out is empty; expected the path of an output directory",
    ),
    (
        "empty image",
        ["--image", "{root}/photo.jpg", ""],
        "--image is empty; expected the path of an image file",
    ),
    (
        "empty checkpoint",
        ["--checkpoint", ""],
        "--checkpoint is empty; expected the path of a checkpoint directory",
    ),
    (
        "missing checkpoint",
        ["--checkpoint", "{root}/nockpt"],
        "--checkpoint {root}/nockpt does not exist; expected the --output of "
        "convert_torch_weights.py or a train.py --workdir\n",
    ),
    (
        "missing step",
        ["--step", "7"],
        "{root}/ckpt has no step 7: it holds converted weights (a convert_torch_weights.py "
        "output), which are step 0 only; a step (--step, --config.init_from_step) is for a "
        "train.py run's workdir: leave it out",
    ),
    (
        "repeated K",
        ["--num-clusters", "3", "5", "3"],
        "--num-clusters gives 3 more than once; each K writes one picture",
    ),
    (
        "heads without encodings",
        ["--heads", "2"],
        "--heads sets the columns of the --encodings picture; give --encodings too",
    ),
    ("no heads", ["--encodings", "--heads", "0"], "--heads must be at least 1, got 0"),
    (
        "encoding layer spelt otherwise",
        ["--encodings", "network.4", "stage4"],
        "--encodings takes network.S (every block of the stage at network.S, S = 0, 2, 4, 6), "
        "network.S.J (block J), last or all, got 'stage4'",
    ),
    (
        "encoding layer the model lacks",
        ["--encodings", "last", "network.4.5"],
        "--encodings network.4.5 is not in the model; its encoding layers are the blocks of the "
        "stages network.0 (blocks 0-2), network.2 (blocks 0-3), network.4 (blocks 0-4), "
        "network.6 (blocks 0-1)\n",
    ),
    (
        "pool as encoding layer",
        ["--encodings", "network.3"],
        "--encodings network.3 is a ClusterPool (drawn in the _levels.png strip); its encoding "
        "layers are the blocks of the stages network.0 (blocks 0-2), ",
    ),
    (
        "encodings already in the output",
        ["--encodings", "--out", "{root}/held"],
        "--out {root}/held already holds photo_encodings.png; pass --overwrite to replace it, or "
        "choose another --out\n",
    ),
]


@pytest.mark.parametrize(
    "case, args, message", VISUALIZE_MISTAKES, ids=[c for c, _, _ in VISUALIZE_MISTAKES]
)
def test_visualize_mistakes_before_the_checkpoint_load(
    files, monkeypatch, capsys, case, args, message
):
  def slow(*args, **kwargs):
    raise AssertionError("the params were restored before the arguments were checked")

  monkeypatch.setattr(visualize, "load_pretrained", slow)
  defaults = {
      "--checkpoint": "{root}/ckpt",
      "--image": "{root}/photo.jpg",
      "--out": "{root}/out",
      "--image-size": "64",
  }
  for flag, value in defaults.items():
    if flag not in args:
      args = [*args, flag, value]
  args = [a.format(root=files) for a in args]
  code, out, err = outcome(capsys, visualize.main, args)
  assert (code, out) == (2, ""), err
  assert err.startswith("error: " + message.format(root=files)) and err.count("\n") == 1, err
  assert not (files / "out").exists()  # no empty output directory left behind


def test_visualize_draws_a_segmenters_clusters(files, tmp_path, capsys):
  """A Semantic FPN segmentation run: its backbone's clusters, the same files, no class line,
  at the run's crop size by default; with --encodings, the grid of the layers asked for."""
  segmenter, out = tmp_path / "segmenter", tmp_path / "vis"
  shutil.copytree(files / "fpn", segmenter)
  config = demo_seg.get_config()
  config.data.crop_size = (64, 96)
  reporting.write_config(str(segmenter), config)
  args = ["--checkpoint", str(segmenter), "--image", str(files / "photo.jpg"), "--out", str(out)]
  args += ["--encodings", "network.4", "network.0.1", "network.4.2.token_mixer", "--heads", "6"]
  code, printed, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (0, ""), err
  assert sorted(os.listdir(out)) == ["photo_encodings.png", "photo_k3.png", "photo_levels.png"]
  assert len(printed.splitlines()) == 1 and printed.endswith(" (model input 64x96)\n"), printed
  # a row per layer in forward order, each once: network.0.1 (4 heads), network.4.0 to .4 (8
  # heads, the first 6 drawn); panels of the 64x96 input drawn 3x larger, 4 pixels apart, each
  # under a 26-pixel title
  encodings = np.asarray(Image.open(out / "photo_encodings.png"))
  assert encodings.shape == (6 * (26 + 192) + 5 * 4, 6 * (288 + 4) - 4, 3)
  assert panel_grid(encodings, (192, 288), 26) == [4, 6, 6, 6, 6, 6]


def panel_grid(picture: np.ndarray, panel: tuple[int, int], title: int) -> list[int]:
  """The panels in each row of an {stem}_encodings.png grid of `panel`-sized panels (4 pixels
  apart, a `title`-pixel title band above each): how many of the places hold one, each row's
  counted from its left as long as there is one."""
  counts = []
  for top in range(0, picture.shape[0], title + panel[0] + 4):
    row = picture[top + title : top + title + panel[0]]
    n = 0
    while (n + 1) * (panel[1] + 4) - 4 <= picture.shape[1]:
      place = row[:, n * (panel[1] + 4) : n * (panel[1] + 4) + panel[1]]
      if (place == 255).all():  # white: no panel
        break
      n += 1
    counts.append(n)
  return counts


def test_visualize_encoding_layers_by_default_all_and_by_name():
  """fec_large's 24 blocks: by default the last of each stage; all; names in any order, once."""
  model = create_model("fec_large")
  assert visualize.encoding_layers(model, []) == visualize.encoding_layers(model, ["last"])
  assert visualize.encoding_layers(model, []) == tuple(
      f"network.{s}.{j}.token_mixer" for s, j in ((0, 3), (2, 3), (4, 11), (6, 3))
  )
  assert len(visualize.encoding_layers(model, ["all"])) == 24
  assert visualize.encoding_layers(model, ["network.6", "network.4.10", "network.6.2", "last"]) == (
      "network.0.3.token_mixer",
      "network.2.3.token_mixer",
      "network.4.10.token_mixer",
      "network.4.11.token_mixer",
      *(f"network.6.{j}.token_mixer" for j in range(4)),
  )


def test_visualize_notes_more_heads_than_the_layers_have(capsys):
  """fec_large has 6 heads in stages 0-1, 12 in 2-3: --heads above the most of the layers drawn
  is a note (the picture has fewer columns than asked); up to it, a layer of fewer has each."""
  model = create_model("fec_large")
  for layers, heads, note in (
      (("network.0.3.token_mixer", "network.2.3.token_mixer"), 7, 6),
      (("network.0.3.token_mixer", "network.4.11.token_mixer"), 7, None),
      (visualize.encoding_layers(model, ["all"]), 13, 12),
      (("network.6.0.token_mixer",), None, None),
  ):
    visualize.note_heads(model, layers, heads)
    err = capsys.readouterr().err
    expected = f"note: --heads {heads}: the layers drawn have at most {note} heads; each is drawn\n"
    assert err == ("" if note is None else expected)


def test_visualize_out_of_device_memory_is_one_line(files, tmp_path, capsys, monkeypatch):
  def exhausted(*args):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 688 bytes.")

  monkeypatch.setattr(visualize, "cluster_maps", exhausted)
  out = tmp_path / "vis"
  args = ["--checkpoint", str(files / "ckpt"), "--image", str(files / "photo.jpg")]
  code, printed, err = outcome(
      capsys, visualize.main, [*args, "--image-size", "64", "--out", str(out)]
  )
  assert (code, printed) == (2, "")
  assert err == (
      "error: the model at 64x64, 1 image per pass, needs more memory than the cpu device has "
      "(RESOURCE_EXHAUSTED: Out of memory allocating 688 bytes.); give a smaller --image-size or "
      "--batch-size\n"
  )
  assert not out.exists()  # no empty output directory left behind


def test_visualize_draws_at_the_image_size_of_the_run(files, tmp_path, capsys):
  """A train.py workdir's config.json gives the default --image-size (the demo's 32, not 224)."""
  workdir = tmp_path / "workdir"
  shutil.copytree(files / "ckpt", workdir)
  config = demo.get_config()
  config.data.image_size = 64
  reporting.write_config(str(workdir), config)
  args = ["--checkpoint", str(workdir), "--image", str(files / "photo.jpg")]
  code, printed, err = outcome(capsys, visualize.main, [*args, "--out", str(tmp_path / "vis")])
  assert (code, err) == (0, ""), err
  assert printed.splitlines()[-1].endswith(" (model input 64x64)")


def _grey_photo_args(tmp_path, workdir) -> tuple:
  """(a grey 64x64 photo.png, visualize.py's arguments to draw it with the checkpoint `workdir`
  into tmp_path/vis)."""
  photo = tmp_path / "photo.png"
  Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photo)
  return photo, [
      "--checkpoint",
      str(workdir),
      "--image",
      str(photo),
      "--out",
      str(tmp_path / "vis"),
  ]


def _pets_run(tmp_path) -> tuple:
  """(workdir, root): a workdir of zero weights for 3 classes whose config.json reads folder data
  at root (tmp_path/pets, not made)."""
  workdir, root = tmp_path / "workdir", tmp_path / "pets"
  zero_weights(workdir, "fec_small", num_classes=3)
  config = demo.get_config()
  config.data.update(source="folder", root=str(root), num_classes=3, image_size=64)
  reporting.write_config(str(workdir), config)
  return workdir, root


def test_visualize_names_classes_by_the_runs_folders_and_notes_where_they_are_gone(
    tmp_path, capsys
):
  """A folder run's predictions are named by its class folders; where these have moved since,
  the numbered names come with a note that says why."""
  workdir, root = _pets_run(tmp_path)
  photo, args = _grey_photo_args(tmp_path, workdir)
  code, printed, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (
      0,
      f"note: the run's class folders in {root / 'train'} are gone or changed: its 3 classes are "
      "printed as 'class 0', 'class 1', ...\n",
  )
  assert printed.startswith(f"{photo}: class 0 (")  # zero weights: equal logits, the first wins
  for name in ("cat", "dog", "eel"):
    (root / "train" / name).mkdir(parents=True)
  code, printed, err = outcome(capsys, visualize.main, [*args, "--overwrite"])
  assert (code, err) == (0, "") and printed.startswith(f"{photo}: cat (")


def test_visualize_names_classes_by_the_names_the_run_recorded(tmp_path, capsys):
  """The names a run's labels had when it started (its classes.json) name its predictions where
  its class folders are gone, and where they were renamed since (the labels mean the recorded
  ones)."""
  workdir, root = _pets_run(tmp_path)
  reporting.write_classes(str(workdir), (("cat", "dog", "eel"), f"class folders in {root}/train"))
  photo, args = _grey_photo_args(tmp_path, workdir)
  code, printed, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (0, "") and printed.startswith(f"{photo}: cat (")
  for name in ("ant", "bee", "cow"):
    (root / "train" / name).mkdir(parents=True)
  code, printed, err = outcome(capsys, visualize.main, [*args, "--overwrite"])
  assert code == 0 and printed.startswith(f"{photo}: cat (")
  assert err == (
      f"note: the class folders in {root / 'train'} now name the run's labels otherwise than "
      "when it started (its classes.json, whose names are printed)\n"
  )
  reporting.write_classes(str(workdir), (("cat", "dog"), f"class folders in {root}/train"))
  code, printed, err = outcome(capsys, visualize.main, [*args, "--overwrite"])
  assert code == 0 and printed.startswith(f"{photo}: class ")
  assert err == (
      "note: the run's class names in classes.json name 2 classes, the model has 3: they are "
      "printed as 'class 0', 'class 1', ...\n"
  )


def test_visualize_out_in_a_split_of_the_runs_data_is_refused(tmp_path, capsys):
  """--out in a class folder of the run's train split (its config.json's data.root), or in a
  split folder, where it would be a class of its own: the next run on that data read the PNGs as
  images of the class. One error before the checkpoint is read; one beside the splits is fine."""
  workdir, root = _pets_run(tmp_path)
  (root / "train" / "cat").mkdir(parents=True)
  photo, args = _grey_photo_args(tmp_path, workdir)
  for split, out in [("train", root / "train" / "cat" / "pics"), ("val", root / "val" / "pics")]:
    code, printed, err = outcome(capsys, visualize.main, [*args[:-1], str(out)])
    assert (code, printed) == (2, "")
    assert err == (
        f"error: --out {out} lies in the {split} split of the run's data, {root / split} "
        f"(config.data.root in {workdir / reporting.CONFIG_FILE}): its folders are classes and "
        "its images examples, so a run on that data would read the PNGs as images of a class; "
        "give an --out outside the data's split folders\n"
    )
    assert not out.exists()
  code, _, err = outcome(capsys, visualize.main, [*args[:-1], str(root / "pictures")])
  assert code == 0, err


def test_visualize_says_when_the_runs_class_folders_are_there_but_not_the_models_classes(
    tmp_path, capsys
):
  """A task of one's own whose head is not one output per class folder (a multi-label head on
  the folders a, ab, b, none: 2 outputs): the folders are there, and the note says that their
  number differs, not that they are gone."""
  workdir, root = tmp_path / "workdir", tmp_path / "shapes"
  zero_weights(workdir, "fec_small", num_classes=2)
  for name in ("a", "ab", "b", "none"):
    (root / "train" / name).mkdir(parents=True)
  config = demo.get_config()
  config.task = "multilabel"
  config.data.update(source="folder", root=str(root), num_classes=4, image_size=64)
  reporting.write_config(str(workdir), config)
  photo, args = _grey_photo_args(tmp_path, workdir)
  code, printed, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (
      0,
      f"note: the run's class folders in {root / 'train'} name 4 classes, the model has 2: they "
      "are printed as 'class 0', 'class 1', ...\n",
  )
  assert printed.startswith(f"{photo}: class 0 (logit 0.00")


def test_visualize_gives_a_softmax_probability_only_for_a_classification_run(tmp_path, capsys):
  """A task of one's own (a multi-label head's sigmoids, say) gets its top logit instead."""
  workdir = tmp_path / "workdir"
  zero_weights(workdir, "fec_small", num_classes=4)
  config = demo.get_config()
  config.data.update(num_classes=4, image_size=64)
  reporting.write_config(str(workdir), config)
  photo, args = _grey_photo_args(tmp_path, workdir)
  code, printed, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (0, "")
  assert printed.splitlines()[0] == f"{photo}: class 0 (25.0%)"  # zero weights: equal logits
  config.task = "multilabel"
  reporting.write_config(str(workdir), config)
  code, printed, err = outcome(capsys, visualize.main, [*args, "--overwrite"])
  assert (code, err) == (0, "")
  assert printed.splitlines()[0] == (
      f"{photo}: class 0 (logit 0.00; task 'multilabel': no softmax probability)"
  )


def test_visualize_notes_more_groups_than_final_clusters(files, tmp_path, capsys):
  args = ["--checkpoint", str(files / "ckpt"), "--image", str(files / "photo.jpg")]
  args += ["--image-size", "64", "--num-clusters", "3", "5", "--out", str(tmp_path / "vis")]
  code, _, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (
      0,
      "note: at 64x64 the model has 4 final clusters (the last ClusterPool's centers), so the k5 "
      "picture shows at most 4 groups (a larger --image-size has more)\n",
  )
  # every K above them is named, not only the first
  args += ["--num-clusters", "3", "5", "6", "--overwrite"]
  code, _, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (
      0,
      "note: at 64x64 the model has 4 final clusters (the last ClusterPool's centers), so the k5, "
      "k6 pictures show at most 4 groups (a larger --image-size has more)\n",
  )


def test_visualize_ema_without_ema_weights_is_the_one_line(files, tmp_path, capsys):
  """--ema on weights without EMA: the error alone (the note on the final clusters came first)."""
  args = ["--checkpoint", str(files / "ckpt"), "--image", str(files / "photo.jpg"), "--ema"]
  args += ["--image-size", "64", "--num-clusters", "5", "--out", str(tmp_path / "vis")]
  code, _, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (
      2,
      f"error: {files}/ckpt step 0 holds no EMA weights (a converter output, or a train.py run "
      "with ema_decay 0); leave out the EMA option (--ema; for init_from, init_from_ema)\n",
  )
  assert not os.path.exists(tmp_path / "vis")


def test_visualize_encodings_the_model_lacks_is_the_one_line(files, tmp_path, capsys):
  """An --encodings layer the model lacks: the error alone (the note on the final clusters came
  first, as for --ema)."""
  args = ["--checkpoint", str(files / "ckpt"), "--image", str(files / "photo.jpg")]
  args += ["--image-size", "64", "--num-clusters", "5", "--encodings", "network.9", "--heads", "9"]
  code, _, err = outcome(capsys, visualize.main, [*args, "--out", str(tmp_path / "vis")])
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("error: --encodings network.9 is not in the model; its encoding layers")
  assert not os.path.exists(tmp_path / "vis")


def test_visualize_weights_that_cannot_be_restored_are_the_one_line(
    files, tmp_path, capsys, monkeypatch
):
  """An error restoring the weights (a step whose arrays do not fit or cannot be read): the error
  alone, not after the notes on the final clusters and heads, which come once the weights are
  read."""

  def broken(*args, **kwargs):
    raise checkpoint.CheckpointError(f"{files / 'ckpt'} step 0: the params cannot be read")

  monkeypatch.setattr(visualize, "load_pretrained", broken)
  args = ["--checkpoint", str(files / "ckpt"), "--image", str(files / "photo.jpg")]
  args += ["--image-size", "64", "--num-clusters", "5", "--out", str(tmp_path / "vis")]
  code, _, err = outcome(capsys, visualize.main, args)
  assert (code, err) == (2, f"error: {files / 'ckpt'} step 0: the params cannot be read\n")
  assert not os.path.exists(tmp_path / "vis")


def test_visualize_out_in_a_checkpoint_is_one_line(files, tmp_path, capsys, monkeypatch):
  """An --out that the run would take for a step of its own (a numbered name in a workdir: every
  command on the workdir then failed on the PNG folder as its latest step) or that lies in a
  step's directory (a run deletes it with what it holds): one line, before the weights load;
  nothing is written. A workdir's top level and other names are fine."""

  def slow(*args, **kwargs):
    raise AssertionError("the params were restored before the arguments were checked")

  run = tmp_path / "run"
  shutil.copytree(files / "ckpt", run)
  (run / "metrics.jsonl").write_text("")  # a train.py workdir: more than its steps
  args = ["--checkpoint", str(run), "--image", str(files / "photo.jpg"), "--image-size", "64"]
  monkeypatch.setattr(visualize, "load_pretrained", slow)
  for out, message in (
      (
          run / "7",
          f"--out {run}/7 would be taken for step 7 of the checkpoint {run} (its steps are its "
          "numbered directories): give the output a name that is not a number",
      ),
      (
          run / "0" / "vis",
          f"--out {run}/0/vis is inside the checkpoint {run}: write it outside the checkpoint's "
          "directories (a run deletes an old step's directory with what it holds; a converter "
          "output's directory holds only its steps)",
      ),
  ):
    assert outcome(capsys, visualize.main, [*args, "--out", str(out)]) == (
        2,
        "",
        f"error: {message}\n",
    )
    assert not out.exists()
  assert sorted(os.listdir(run)) == ["0", "metrics.jsonl"]


def test_visualize_refuses_to_overwrite(files, tmp_path, capsys):
  out = tmp_path / "vis"
  out.mkdir()
  (out / "photo_k3.png").write_bytes(b"mine")
  (out / "photo_encodings.png").write_bytes(b"mine")  # not written without --encodings
  args = [
      "--checkpoint",
      str(files / "ckpt"),
      "--image",
      str(files / "photo.jpg"),
      "--image-size",
      "64",
      "--out",
      str(out),
  ]
  assert outcome(capsys, visualize.main, args) == (
      2,
      "",
      f"error: --out {out} already holds photo_k3.png; pass --overwrite to replace it, or "
      "choose another --out\n",
  )
  assert (out / "photo_k3.png").read_bytes() == b"mine"
  code, printed, err = outcome(capsys, visualize.main, [*args, "--overwrite"])
  assert (code, err) == (0, ""), err  # nothing but the results
  assert printed.splitlines()[-1].startswith("1 image in ")
  assert sorted(os.listdir(out)) == ["photo_encodings.png", "photo_k3.png", "photo_levels.png"]
  assert (out / "photo_k3.png").read_bytes() != b"mine"
  assert (out / "photo_encodings.png").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "paths, stems",
    [
        (["a/cat.jpg", "b/cat.png", "cat_1.png"], ["cat", "cat_2", "cat_1"]),
        (["cat_1.png", "a/cat.jpg", "b/cat.png"], ["cat_1", "cat", "cat_2"]),
        (["cat.jpg", "cat.png", "cat.gif", "cat_2.png"], ["cat", "cat_1", "cat_3", "cat_2"]),
        (["x.jpg", "x.jpg", "x_1.jpg", "x_1.png"], ["x", "x_2", "x_1", "x_1_1"]),
        (["dog.jpg", "cat.jpg"], ["dog", "cat"]),
    ],
)
def test_visualize_gives_every_image_its_own_files(paths, stems):
  """Stems are distinct from each other and from every image's own stem: no PNG of one image is
  written over by another's."""
  assert visualize.unique_stems(paths) == stems
  names = visualize._output_names(stems, [2, 3])
  assert len(set(names)) == len(names) == 3 * len(paths)
  with_encodings = visualize._output_names(stems, [2, 3], encodings=True)
  assert len(set(with_encodings)) == len(with_encodings) == 4 * len(paths)
  assert set(with_encodings) - set(names) == {f"{stem}_encodings.png" for stem in stems}


def test_visualize_loads_16_bit_images_as_training_does(tmp_path):
  """A 16-bit PNG is scaled to 8 bits as transforms.decode does for training, not clipped to
  white by PIL's convert("RGB")."""
  values = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
  Image.fromarray(values).save(tmp_path / "deep.png")
  with Image.open(tmp_path / "deep.png") as img:
    assert img.mode in ("I;16", "I")
  original, resized = visualize.load_image(str(tmp_path / "deep.png"), (16, 8))
  expected = decode((tmp_path / "deep.png").read_bytes())[0]  # uint8 [24, 32, 3]
  assert original.dtype == np.uint8 and original.shape == (24, 32, 3)
  np.testing.assert_array_equal(original, expected)
  assert len(np.unique(original)) == 256  # every 8-bit level, not nearly all white (255)
  np.testing.assert_array_equal(resized, cv2.resize(expected, (8, 16)))  # the official resize


@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_visualize_reads_and_resizes_as_the_official_script(tmp_path, orientation):
  """The official cluster_visualize.py reads with cv2.imread (which turns a photo upright by its
  EXIF orientation) and resizes with cv2.resize; load_image gives the same pixels."""
  rng = np.random.default_rng(orientation)
  pixels = (rng.random((1, 1, 3)) * 255 * np.linspace(0, 1, 60 * 80)[:, None, None]).reshape(
      60, 80, 3
  )
  exif = Image.Exif()
  exif[ExifTags.Base.Orientation] = orientation
  path = tmp_path / "photo.jpg"
  Image.fromarray(pixels.astype(np.uint8)).save(path, exif=exif, quality=90)
  official = cv2.imread(str(path))[..., ::-1]  # BGR -> RGB
  original, resized = visualize.load_image(str(path), (32, 48))
  assert original.shape == ((80, 60, 3) if orientation == 6 else (60, 80, 3))
  np.testing.assert_array_equal(original, official)
  np.testing.assert_array_equal(resized, cv2.resize(official, (48, 32)))
  assert visualize.load_image(str(path), 32)[1].shape == (32, 32, 3)  # one side: a square


def test_visualize_median_filter_keeps_more_than_256_groups():
  """Group ids above 255 are filtered as they are (no uint8 wrap merging groups 0 and 256)."""
  rng = np.random.default_rng(0)
  blocks = rng.permutation(300).reshape(15, 20).astype(np.int32)
  labels = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)  # [60, 80]: 4x4 blocks, 300 ids
  labels[rng.random(labels.shape) < 0.1] = 299  # salt the filter removes
  filtered = visualize.median_filter(labels, 3)
  assert filtered.dtype == np.int32
  window = np.lib.stride_tricks.sliding_window_view(np.pad(labels, 1, mode="edge"), (3, 3))
  np.testing.assert_array_equal(filtered, np.median(window.reshape(60, 80, 9), axis=-1))
  assert len(np.unique(filtered)) == 300  # every block's inner 2x2 keeps its own id
  assert visualize.median_filter(labels, 0) is labels


def test_visualize_palette_is_distinct_and_vivid_beyond_twelve():
  """An encoding head has dozens of clusters: past the 12 fixed colors, each of 160 differs and
  none is greyish (max - min channel >= 100; the fixed random RGB it replaces went down to 16)."""
  colors = visualize.palette(160)
  assert colors.dtype == np.uint8 and colors.shape == (160, 3)
  np.testing.assert_array_equal(colors[:12], visualize.GROUP_COLORS)
  assert len({tuple(c) for c in colors}) == 160
  chroma = colors[12:].max(-1).astype(int) - colors[12:].min(-1)
  assert chroma.min() >= 100


# --- visualize_seg.py ------------------------------------------------------------------------


def visualize_seg(*args):
  """visualize_seg.py in a subprocess (its absl flags are global): (status, stdout, stderr)."""
  result = subprocess.run(
      [sys.executable, "visualize_seg.py", *map(str, args)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize(
    "script, flag",
    [
        ("eval.py", "--workdir"),
        ("eval.py", "--checkpoint"),
        ("visualize_seg.py", "--workdir"),
        ("visualize_seg.py", "--checkpoint"),
        ("visualize.py", "--checkpoint"),
    ],
)
def test_a_file_as_the_checkpoint_is_named_by_its_flag(tmp_path, script, flag):
  """A file given as --workdir or --checkpoint: the error names the flag (it said "checkpoint
  directory FILE is a file", a name the command line has not)."""
  (tmp_path / "notes.txt").write_text("mine")
  Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
  more = {
      "eval.py": [],
      "visualize_seg.py": [f"--output={tmp_path}/seg.png"],
      "visualize.py": ["--image", tmp_path / "photo.jpg", "--out", tmp_path / "out"],
  }[script]
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, script), f"{flag}=notes.txt", *map(str, more)],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert (result.returncode, result.stdout, result.stderr) == (
      2,
      "",
      f"error: {flag} {tmp_path}/notes.txt is a file; expected the --output of "
      "convert_torch_weights.py or a train.py --workdir\n",
  )


def test_visualize_seg_bad_dtype_is_one_error_line(tmp_path):
  code, out, err = visualize_seg(
      f"--workdir={tmp_path}", f"--output={tmp_path}/seg.png", "--config.model.dtype=foo"
  )
  assert (code, out, err) == (
      2,
      "",
      "error: config.model.dtype must be one of ('float32', 'bfloat16', 'float16'), got 'foo'\n",
  )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--workdir=", "--output={tmp}/seg.png"],
            "--workdir is empty; expected the path of a train.py workdir",
        ),
        (
            ["--checkpoint=", "--output={tmp}/seg.png"],
            "--checkpoint is empty; expected the path of a convert_torch_weights.py output (or a "
            "workdir)",
        ),
        (
            ["--workdir={tmp}", "--output="],
            "--output is empty; expected the path of the PNG to write",
        ),
        (
            ["--workdir={tmp}", "--output={tmp}/photo.jpg/seg.png"],
            "--output {tmp}/photo.jpg/seg.png: {tmp}/photo.jpg is a file; expected a directory for "
            "the PNG",
        ),
        (
            ["--workdir={tmp}", "--output={tmp}/folder.png"],
            "--output {tmp}/folder.png is a directory; expected the path of a PNG file",
        ),
        (
            ["--workdir={tmp}/classifier", "--output={tmp}/seg.png"],
            "--workdir {tmp}/classifier holds a classification run; visualize_seg.py draws a "
            "segmenter's predictions (visualize.py: a classifier's clusters)",
        ),
        (
            ["--workdir={tmp}/moved", "--output={tmp}/seg.png"],
            "config.data.root {tmp}/ADEChallengeData2016 (the run's, from "
            "{tmp}/moved/config.json) is not a directory; if the data moved, give "
            "--config.data.root=WHERE_IT_IS_NOW",
        ),
        (
            ["--workdir={tmp}", "--output={tmp}/seg.png", "--alpha=1.5"],
            "--alpha is an opacity between 0 and 1, got 1.5",
        ),
        (
            ["--workdir={tmp}", "--output={tmp}/seg.png", "--image", "{tmp}/nope.jpg"],
            "--image {tmp}/nope.jpg does not exist",
        ),
        (
            ["--workdir={tmp}", "--output={tmp}/seg.png", "--image", "{tmp}/photo.jpg"],
            "--image {tmp}/photo.jpg is not a readable image (UnidentifiedImageError: cannot "
            "identify image file '{tmp}/photo.jpg')",
        ),
        (
            ["--workdir={tmp}", "--output={tmp}/seg.png", "--image={tmp}/a.png", "--num=2"],
            "--num draws the first validation images; --image draws the images given: give one",
        ),
        (
            ["--workdir={tmp}", "--output={tmp}/seg.png", "{tmp}/a.png"],
            "unexpected argument {tmp}/a.png: image files follow --image (see --help)",
        ),
        (
            [
                "--workdir={tmp}",
                "--output={tmp}/seg.png",
                "--image=a.png",
                "--image=b.png",
                "c.png",
            ],
            "give the image files after one --image (--image a.jpg b.jpg), or each after its own "
            "--image",
        ),
    ],
    ids=[
        "empty workdir",
        "empty checkpoint",
        "empty output",
        "file as folder",
        "folder as output",
        "classifier run",
        "moved data",
        "alpha",
        "missing image",
        "not an image",
        "image and num",
        "image without --image",
        "images in two orders",
    ],
)
def test_visualize_seg_path_mistakes(tmp_path, args, message):
  """Empty paths, an --output whose folder is a file or which is a folder, a workdir whose
  config.json (the default config) is a classification run's or names a data folder that is
  gone, an --alpha outside [0, 1], an
  --image that is no image or given with --num or without --image: one error line, before the
  checkpoint is read (the workdir has none)."""
  (tmp_path / "photo.jpg").write_bytes(b"a file")
  (tmp_path / "folder.png").mkdir()
  reporting.write_config(str(tmp_path / "classifier"), demo.get_config())
  moved = demo_seg.get_config()
  moved.data.source, moved.data.root = "ade20k", str(tmp_path / "ADEChallengeData2016")
  reporting.write_config(str(tmp_path / "moved"), moved)
  code, out, err = visualize_seg(*(a.format(tmp=tmp_path) for a in args))
  assert (code, out, err) == (2, "", f"error: {message.format(tmp=tmp_path)}\n")


def test_visualize_seg_of_another_class_count_is_eval_pys_error(files, tmp_path):
  """A config of other classes than the checkpoint's: the error of eval.py (the task's check),
  with what to give, before the weights are restored."""
  code, out, err = visualize_seg(
      "--config=configs/fpn_fec_small_ade20k.py",
      "--config.data.num_classes=3",
      f"--checkpoint={files}/fpn",
      f"--output={tmp_path}/seg.png",
      f"--image={files}/photo.jpg",
  )
  assert (code, out, err) == (
      2,
      "",
      "error: the model has 150 classes but config.data.num_classes is 3: give the config of the "
      "checkpoint's run, or --config.data.num_classes=150 for data of its classes\n",
  )
  assert not os.path.exists(tmp_path / "seg.png")


def test_visualize_seg_of_an_image_too_thin_for_the_test_resize_is_one_line(files, tmp_path):
  """An image 1 pixel high and 4097 wide is 2048x0 after ADE20K's keep-ratio resize, which cv2
  cannot make (a traceback): one line before the weights are restored, with what fits."""
  Image.fromarray(np.full((1, 4097, 3), 128, np.uint8)).save(tmp_path / "strip.png")
  code, out, err = visualize_seg(
      "--config=configs/fpn_fec_small_ade20k.py",
      f"--checkpoint={files}/fpn",
      f"--output={tmp_path}/seg.png",
      f"--image={tmp_path}/strip.png",
  )
  assert (code, out, err) == (
      2,
      "",
      f"error: --image {tmp_path}/strip.png: 4097x1 pixels, 2048x0 after the keep-ratio resize to "
      "img_scale (2048, 512): a side of 0 pixels, which cv2 cannot make (an image at most 4096 "
      "times as wide as high, or as high as wide, can be resized so)\n",
  )


def test_visualize_seg_output_in_a_checkpoint_is_one_line(files, tmp_path):
  """An --output in a step's directory, or in a numbered folder beside the steps (which the run
  would take for a step of its own): one line, before the weights are restored."""
  run = tmp_path / "run"
  shutil.copytree(files / "fpn", run)
  (run / "metrics.jsonl").write_text("")  # a train.py workdir: more than its steps
  code, out, err = visualize_seg(
      "--config=configs/fpn_fec_small_ade20k.py",
      f"--checkpoint={run}",
      f"--output={run}/7/seg.png",
      f"--image={files}/photo.jpg",
  )
  assert (code, out, err) == (
      2,
      "",
      f"error: --output {run}/7/seg.png is inside the checkpoint {run}: write it outside the "
      "checkpoint's directories (a run deletes an old step's directory with what it holds; a "
      "converter output's directory holds only its steps)\n",
  )
  assert sorted(os.listdir(run)) == ["0", "metrics.jsonl"]


@pytest.mark.parametrize("bad", ["corrupt", "rgb_annotation"])
def test_visualize_seg_without_a_readable_image_says_so(bad, files, tmp_path):
  """Every validation file is corrupt, or every annotation an RGB picture: one error line names
  the folder (after the loader's warnings naming the files), before the weights are restored; no
  picture is written. As with eval.py, absl's info lines (the loader's counts) show only with
  --verbosity, warnings always."""
  for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
    (tmp_path / kind / "validation").mkdir(parents=True)
    (tmp_path / kind / "validation" / f"ADE_val_00000001{suffix}").write_bytes(b"not an image")
  if bad == "rgb_annotation":
    (tmp_path / "images" / "validation" / "ADE_val_00000001.jpg").write_bytes(
        (files / "photo.jpg").read_bytes()
    )
    rgb = np.zeros((40, 48, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png")
  args = [
      "--config=configs/fpn_fec_small_ade20k.py",
      f"--config.data.root={tmp_path}",
      "--config.data.num_workers=0",
      f"--checkpoint={files}/fpn",
      f"--output={tmp_path}/seg.png",
  ]
  code, out, err = visualize_seg(*args)
  assert (code, out) == (2, ""), err
  assert "Traceback" not in err, err
  assert err.splitlines()[-1] == (
      f"error: no readable validation image in {tmp_path}/images/validation (annotations in "
      f"{tmp_path}/annotations/validation): all 1 failed to load (unreadable or corrupt files, "
      "or annotations that are not single-channel PNGs of class ids or not the image's size; "
      "the warnings above name them)"
  ), err
  assert not (tmp_path / "seg.png").exists()
  logged = err.splitlines()[:-1]
  assert [line[0] for line in logged] == ["W"], err  # absl's W1206 ..., no I1206 ...
  assert "bad file images/validation/ADE_val_00000001.jpg masked out" in logged[0], err
  code, _, err = visualize_seg(*args, "--verbosity=0")
  assert code == 2 and re.search(r"^I\d{4} .* val: 1 bad image masked out", err, re.M), err


def test_visualize_seg_ema_without_ema_weights_fails_before_reading_data(files, tmp_path):
  """--ema on weights without EMA: eval.py's error, before the val images are read (here
  unreadable ones, whose warnings and error would come first)."""
  for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
    (tmp_path / kind / "validation").mkdir(parents=True)
    (tmp_path / kind / "validation" / f"ADE_val_00000001{suffix}").write_bytes(b"not an image")
  code, out, err = visualize_seg(
      "--config=configs/fpn_fec_small_ade20k.py",
      f"--config.data.root={tmp_path}",
      "--config.data.num_workers=0",
      f"--checkpoint={files}/fpn",
      f"--output={tmp_path}/seg.png",
      "--ema",
  )
  assert (code, out, err) == (
      2,
      "",
      f"error: {files}/fpn step 0 holds no EMA weights (a converter output, or a train.py run "
      "with ema_decay 0); leave out the EMA option (--ema; for init_from, init_from_ema)\n",
  )


def test_the_config_flag_is_the_scripts_own(monkeypatch):
  """--config belongs to the module that calls define_config_file, so its --help lists it."""
  monkeypatch.setattr("sys.argv", ["prog"])
  values = flags.FlagValues()
  cli.define_config_file("config", None, "", flag_values=values)
  assert [f.name for f in values.get_key_flags_for_module(__name__)] == ["config"]


def test_a_missing_required_flag_is_one_line_with_its_help(capsys):
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The run's directory (required).", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)
  assert outcome(capsys, cli.parse_flags, ["prog"], values) == (
      2,
      "",
      "error: --workdir is missing: The run's directory (required).\n",
  )


def test_a_runs_compilation_cache_is_used_where_there_is_one(tmp_path):
  """train.py makes WORKDIR/compilation_cache (not where a file is in the way); eval.py
  (create=False) uses it only where a run left one (not in a converter output); a cache the user
  chose stays."""
  chosen = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    cli.use_compilation_cache(str(tmp_path / "converted"), create=False)
    assert jax.config.jax_compilation_cache_dir is None
    cli.use_compilation_cache(str(tmp_path / "run"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "run" / "compilation_cache")
    jax.config.update("jax_compilation_cache_dir", None)
    os.makedirs(tmp_path / "converted" / "compilation_cache")
    cli.use_compilation_cache(str(tmp_path / "converted"), create=False)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "converted" / "compilation_cache")
    cli.use_compilation_cache(str(tmp_path / "run"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "converted" / "compilation_cache")
    jax.config.update("jax_compilation_cache_dir", None)
    (tmp_path / "file").write_text("")  # --workdir=a file (or under one): no cache, no warning
    for path in (tmp_path / "file", tmp_path / "file" / "run"):
      cli.use_compilation_cache(str(path))
      assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", chosen)


def test_help_shows_no_path_of_this_checkout(monkeypatch):
  """The default config is this checkout's file; the help text names it instead."""
  monkeypatch.setattr("sys.argv", ["prog"])
  monkeypatch.chdir(ROOT)
  values = flags.FlagValues()
  default = os.path.join(ROOT, "configs", "demo.py")
  cli.define_config_file("config", default, "Default: configs/demo.py.", values)
  help_text = values.module_help(__name__)
  assert "Default: configs/demo.py." in help_text and ROOT not in help_text, help_text


def test_a_config_that_evaluates_otherwise_than_the_run_is_noted(tmp_path, capsys, monkeypatch):
  """eval.py and visualize_seg.py on a workdir: --config against the run's config.json (whose
  paths are absolute: the same folder given relative is no difference)."""
  saved = demo.get_config()
  saved.data.root = str(tmp_path / "data")
  reporting.write_config(str(tmp_path), saved)
  config = demo.get_config()
  config.eval_batch_size, config.seed = 8, 3  # not what an evaluation means
  monkeypatch.chdir(tmp_path)
  config.data.root = "data"
  cli.note_config_differences(config, str(tmp_path), given=True)
  cli.note_config_differences(config, str(tmp_path / "no_config_json"), given=False)
  assert capsys.readouterr().err == ""
  config.data.image_size, config.data.num_classes, config.data.std = 64, 4, (0.5, 0.5, 0.5)
  cli.note_config_differences(config, str(tmp_path), given=True)
  listed = (
      "data.num_classes 4 (the run's: 10), data.image_size 64 (the run's: 32), data.std (0.5, "
      f"0.5, 0.5) (the run's: {demo.get_config().data.std!r})\n"
  )
  assert (
      capsys.readouterr().err == f"note: --config differs from {tmp_path}'s config.json in {listed}"
  )
  cli.note_config_differences(config, str(tmp_path), given=False)  # the run's, with overrides
  assert capsys.readouterr().err == (
      f"note: the --config.* overrides differ from {tmp_path}'s config.json in {listed}"
  )
  (tmp_path / reporting.CONFIG_FILE).write_text("{")  # a note, not an error: the command goes on
  cli.note_config_differences(config, str(tmp_path), given=True)
  assert capsys.readouterr().err.startswith(
      f"note: not compared with the run's config: {tmp_path}/config.json is not JSON ("
  )


@pytest.mark.parametrize("held", ["fec_base", "fpn_fec_small", "fec_small_seg"])
def test_without_config_a_checkpoint_without_config_json_is_one_line(tmp_path, capsys, held):
  """A converter output (or a run of an earlier fec-jax) to eval.py or visualize_seg.py, or a
  run without config.json to train.py, without --config: the fallback, a demo config, is not its
  config. The line names the model's config where configs/ has one."""
  example = {
      "fec_base": " (e.g. configs/fec_base.py)",
      "fpn_fec_small": " (e.g. configs/fpn_fec_small_ade20k.py)",
      "fec_small_seg": "",  # a dense backbone: no config of its own
  }[held]
  configs = os.path.join(ROOT, "configs")
  check = cli.check_config_found
  code, out, err = outcome(capsys, check, str(tmp_path), "--checkpoint", held, False, configs)
  assert (code, out) == (2, "")
  assert err == (
      f"error: --checkpoint {tmp_path} has no config.json (a convert_torch_weights.py output, or "
      "a run of an earlier fec-jax) to take the config from; give --config, the config of its "
      f"{held}{example}\n"
  )
  check(str(tmp_path), "--checkpoint", held, True, configs)  # --config given
  reporting.write_config(str(tmp_path), demo.get_config())
  check(str(tmp_path), "--checkpoint", held, False, configs)  # the run's own
