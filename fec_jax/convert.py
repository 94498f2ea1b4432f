"""Strict conversion between the official PyTorch state dicts and Flax params.

The Flax modules carry the official names (see fec_jax.model), so a key maps by renaming and each
weight by a layout change. A stage's blocks are stacked on a leading axis (flax
`network_0/mlp/fc1/kernel` [depth, ...]); block j of it is torch `network.0.{j}.mlp.fc1.weight`.
  Conv2d k x k   torch [O, I, kh, kw]  <->  flax Conv kernel [kh, kw, I, O]
  Conv2d 1x1     torch [O, I, 1, 1]    <->  flax Dense kernel [I, O]
  nn.Linear      torch [O, I]          <->  flax Dense kernel [I, O]
  GroupNorm      weight                <->  scale
  BatchNorm      weight, running_mean, running_var  <->  params scale, batch_stats mean, var
Every other parameter (biases, sim_alpha/beta, layer scales) is copied as is. Conversion is strict:
a missing, unexpected or mis-shaped key is an error listing each one. The Semantic FPN segmenters
(fpn_*) convert whole mmseg checkpoints (backbone.*, neck.*, decode_head.*); BatchNorm's
num_batches_tracked is not kept (unused with mmseg's momentum 0.1) and written back as 0.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import pickle
import re
import shutil
import uuid
import warnings
from typing import Any, Callable, Iterable

import flax
import jax
import numpy as np

from fec_jax import cli, reporting
from fec_jax.checkpoint import (
    CheckpointError,
    load_model,
    load_pretrained,
    output_in_a_checkpoint,
    replaceable_checkpoint,
    save_params,
)
from fec_jax.model import (
    SEGMENTERS,
    VARIANTS,
    block_axis,
    classifiers,
    count_params,
    create_model,
    list_models,
    model_name,
    torch_module_path,
    variable_shapes,
)

LINEAR_MODULES = {"fc1", "fc2", "head"}  # nn.Linear in the official code; other Dense are 1x1 convs
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
NUM_BATCHES_TRACKED = "num_batches_tracked"


class ConversionError(ValueError):
  """A checkpoint that cannot be read or does not match the requested FEC variant."""


# --- key and layout mapping ------------------------------------------------------------------


def torch_key(flax_path: tuple[str, ...], block: int | None = None) -> str:
  """('network_1', 'conv_f', 'kernel') -> 'network.1.conv_f.weight'; a stage's variable takes the
  block: ('network_0', 'mlp', 'fc1', 'kernel'), 2 -> 'network.0.2.mlp.fc1.weight'; a batch_stats
  path ('decode_head', 'scale_heads_0_0', 'bn', 'mean') ->
  'decode_head.scale_heads.0.0.bn.running_mean'.
  """
  *modules, leaf = flax_path
  return ".".join(torch_module_path(modules, block) + [TORCH_LEAF.get(leaf, leaf)])


def flax_to_torch_array(flax_path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """One block's (or layer's) flax array -> its torch layout."""
  if flax_path[-1] != "kernel":
    return value
  if value.ndim == 4:  # Conv: [kh, kw, I, O] -> [O, I, kh, kw]
    return value.transpose(3, 2, 0, 1)
  # Dense [I, O] -> nn.Linear [O, I], or a 1x1 Conv2d [O, I, 1, 1]
  return value.T if flax_path[-2] in LINEAR_MODULES else value.T[:, :, None, None]


def torch_to_flax_array(flax_path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """One block's (or layer's) torch array -> its flax layout (inverse of flax_to_torch_array)."""
  if flax_path[-1] != "kernel":
    return value
  if flax_path[-2] in LINEAR_MODULES:  # [O, I] -> [I, O]
    return value.T
  # Conv2d [O, I, kh, kw] -> Conv [kh, kw, I, O], or a 1x1 one -> Dense [I, O]
  return value.transpose(2, 3, 1, 0) if value.shape[2:] != (1, 1) else value[:, :, 0, 0].T


def torch_entries(flax_path: tuple[str, ...], value: np.ndarray) -> dict[str, np.ndarray]:
  """One flax variable -> its official state-dict entries: one per block for a stage's variable."""
  if not block_axis(flax_path):
    return {torch_key(flax_path): flax_to_torch_array(flax_path, value)}
  return {
      torch_key(flax_path, j): flax_to_torch_array(flax_path, value[j])
      for j in range(value.shape[0])
  }


def flax_value(flax_path: tuple[str, ...], shape: tuple[int, ...], state: dict) -> np.ndarray:
  """The flax variable of `shape` at flax_path from an official state dict (inverse of
  torch_entries): a stage's blocks are stacked."""
  if not block_axis(flax_path):
    return torch_to_flax_array(flax_path, state[torch_key(flax_path)])
  return np.stack(
      [torch_to_flax_array(flax_path, state[torch_key(flax_path, j)]) for j in range(shape[0])]
  )


def expected_torch_shapes(name: str, **overrides) -> dict[str, tuple[int, ...]]:
  """{torch key: torch shape} of a model's official state dict (num_batches_tracked aside)."""
  return _torch_shapes(variable_shapes(create_model(name, **overrides)))


def _torch_shapes(variables) -> dict[str, tuple[int, ...]]:
  """{torch key: torch shape} of abstract variables, every collection."""
  shapes = {}
  for (_, *path), leaf in flax.traverse_util.flatten_dict(variables).items():
    zeros = np.broadcast_to(np.float32(0), leaf.shape)
    shapes.update({k: v.shape for k, v in torch_entries(tuple(path), zeros).items()})
  return shapes


# --- reading checkpoint files ----------------------------------------------------------------


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ConversionError(
        "reading or writing .pth files needs PyTorch: pip install 'fec-jax[torch]'"
        " (or save the state dict as .safetensors, which needs no torch)"
    ) from e
  return torch


def _load_file(path: str) -> Any:
  if not os.path.isfile(path):
    raise ConversionError(
        f"checkpoint file {path} " + ("is a directory" if os.path.isdir(path) else "does not exist")
    )
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    try:
      return load_file(path)
    except Exception as e:  # safetensors raises its own error types for a bad header or size
      raise ConversionError(
          f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})"
      ) from e
  torch = _torch()
  try:  # timm checkpoints pickle their command-line args: an argparse.Namespace
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
      # "Detected pickle protocol N": torch's note on a pickle that torch.save did not write
      warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:  # its text is advice on weights_only=False: not repeated
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if refused:  # a pickled object that a weights-only load does not rebuild
      raise ConversionError(
          f"{path} holds a pickled {refused.group(1)}, which fec-jax does not unpickle (it loads "
          ".pth files with torch.load(weights_only=True), which runs no code from the file); "
          "expected a state dict of tensors: save model.state_dict() with torch.save, or as "
          ".safetensors"
      ) from e
    raise ConversionError(
        f"{path} is not a readable PyTorch checkpoint: the file is truncated or corrupt, or was "
        "not written by torch.save; expected a state dict saved with torch.save (.pth / "
        ".pth.tar) or a .safetensors file"
    ) from e
  except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for other bad files
    # The first sentence of torch's text: the rest of a truncated file's is advice we give below.
    reason = re.split(r"(?<=\.)\s|\n", str(e).strip())[0].rstrip(".")
    raise ConversionError(
        f"{path} is not a readable PyTorch checkpoint "
        f"({type(e).__name__}{': ' + reason if reason else ''}); "
        "expected a state dict saved with torch.save (.pth / .pth.tar) or a .safetensors file; "
        "the file may be truncated or corrupt"
    ) from e


def _to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value.astype(np.float32, copy=False)
  return value.detach().cpu().float().numpy()


def unwrap_state_dict(
    obj: Any, ema: bool = False, model: str | None = None
) -> tuple[dict[str, Any], list[str]]:
  """The model state dict inside a checkpoint object, and notes on what was unwrapped or dropped.

  Handles plain state dicts, timm training checkpoints (`state_dict` / `state_dict_ema`), dicts
  under `model`, DDP `module.` prefixes, and mmdet/mmseg checkpoints: for a segmenter `model`
  (fpn_*) the whole state dict is kept, for another model only `backbone.*`; without `model`, the
  whole one when it has neck.* and decode_head.* keys (a Semantic FPN), else `backbone.*`.
  """
  if not isinstance(obj, dict):
    raise ConversionError(f"expected a dict of tensors, found {type(obj).__name__}")
  notes = []
  if ema:
    if "state_dict_ema" not in obj:
      if all(hasattr(v, "shape") for v in obj.values()):
        raise ConversionError(
            "--ema was given but the checkpoint is a plain state dict, one set of weights "
            "(EMA weights come as 'state_dict_ema' in a timm training checkpoint): leave out --ema"
        )
      raise ConversionError(
          f"--ema was given but the checkpoint has no 'state_dict_ema' "
          f"(top-level keys: {sorted(obj)[:10]})"
      )
    obj, notes = obj["state_dict_ema"], ["using the EMA weights (state_dict_ema)"]
  else:
    for wrapper in ("state_dict", "model"):
      if isinstance(obj.get(wrapper), dict):
        ema_too = " (it has EMA weights too: --ema)" if "state_dict_ema" in obj else ""
        obj, notes = obj[wrapper], [f"using the weights under '{wrapper}'{ema_too}"]
        break
    else:
      if isinstance(obj.get("state_dict_ema"), dict):
        raise ConversionError(
            "the checkpoint's weights are EMA weights ('state_dict_ema', and no 'state_dict' or "
            "'model'): pass --ema"
        )
  if any(k.startswith("module.") for k in obj):
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
  fpn = any(k.startswith("neck.") for k in obj) and any(k.startswith("decode_head.") for k in obj)
  if fpn and model in classifiers():  # every classifier has its dense backbone, {model}_seg
    raise ConversionError(
        f"the checkpoint is a Semantic FPN segmenter (backbone.*, neck.*, decode_head.*), and "
        f"--model {model} is a classifier: leave out --model to convert the segmenter, or pass "
        f"--model {model}_seg for its backbone alone"
    )
  whole = model in SEGMENTERS if model else fpn
  if any(k.startswith("backbone.") for k in obj) and not whole:
    kept = {k.removeprefix("backbone."): v for k, v in obj.items() if k.startswith("backbone.")}
    notes.append(
        f"kept {len(kept)} backbone.* keys, dropped {len(obj) - len(kept)} other keys "
        "(detection/segmentation heads)"
    )
    obj = kept
  if not obj:  # not "differs in 244 keys" from the closest variant
    raise ConversionError("the checkpoint's state dict is empty: it holds no weights")
  bad = [k for k, v in obj.items() if not hasattr(v, "shape")]
  if bad:
    raise ConversionError(f"expected a state dict of tensors, but {bad[:5]} are not tensors")
  return obj, notes


def read_state_dict(
    path: str, ema: bool = False, model: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
  """Reads .pth / .pth.tar / .safetensors into ({key: float32 array}, checkpoint info, notes).

  model: the target model when known (decides what an mmdet/mmseg checkpoint keeps).
  """
  obj = _load_file(os.fspath(path))
  info = (
      {"arch": obj.get("arch")}
      if isinstance(obj, dict) and isinstance(obj.get("arch"), str)
      else {}
  )
  try:
    state, notes = unwrap_state_dict(obj, ema, model)
  except ConversionError as e:  # the message names the file it is about
    raise ConversionError(f"{path}: {e}") from e
  stored = collections.Counter(str(v.dtype).removeprefix("torch.") for v in state.values())
  for dtype, count in sorted(stored.items()):
    if dtype in ("float16", "bfloat16", "float64"):
      exactly = "rounded" if dtype == "float64" else "exactly"
      stored_as = f"{reporting.counted(count, 'tensor')} stored as {dtype}"
      notes.append(f"{stored_as}, converted to float32 ({exactly})")
  return {k: _to_numpy(v) for k, v in state.items()}, info, notes


# --- identifying the variant and converting --------------------------------------------------

SHOWN_PROBLEMS = 8  # mismatched keys listed in an error; the rest are counted
CLASSIFIERS = (  # the class layers' keys: their shapes depend on num_classes
    "head.weight",
    "head.bias",
    "decode_head.conv_seg.weight",
    "decode_head.conv_seg.bias",
)


def _shape_mismatches(
    state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], ignore: Iterable[str] = ()
) -> list[str]:
  problems = []
  for key, shape in expected.items():
    if key in ignore:
      continue
    if key not in state:
      problems.append(f"missing     {key}  expected shape {list(shape)}")
    elif tuple(state[key].shape) != tuple(shape):
      problems.append(
          f"mis-shaped  {key}  expected shape {list(shape)}, found {list(state[key].shape)}"
      )
  problems += [
      f"unexpected  {key}  found shape {list(state[key].shape)}"
      for key in state
      if key not in expected and key not in ignore
  ]
  return problems


def _examples(problems: list[str], count: int) -> list[str]:
  """`count` of `problems`, each kind (missing, mis-shaped, unexpected) in turn, so that the keys
  of another network's checkpoint show among the missing FEC keys."""
  kinds = {}
  for problem in problems:
    kinds.setdefault(problem.split()[0], []).append(problem)
  turns = itertools.zip_longest(*kinds.values())
  return [problem for turn in turns for problem in turn if problem][:count]


def _problem_lines(problems: list[str]) -> str:
  """The first SHOWN_PROBLEMS of `problems` (_examples), each on an indented line of its own, and
  a line with how many more."""
  rest = len(problems) - SHOWN_PROBLEMS
  more = f"\n  ... and {rest} more" if rest > 0 else ""
  return "".join(f"\n  {problem}" for problem in _examples(problems, SHOWN_PROBLEMS)) + more


def _matching_models(state: dict[str, np.ndarray]) -> tuple[list[str], str, list[str]]:
  """(the models whose state dict has exactly these keys and shapes, the class count aside; the
  closest model and its mismatches)."""
  state = _without_num_batches_tracked(state)
  segmenter = any(k.startswith("decode_head.") for k in state)
  candidates = [name for name in list_models() if (name in SEGMENTERS) == segmenter]
  problems = {}  # weight layout -> mismatches; centers and folds have no weights
  for name in candidates:
    layout = _layout(name)
    if layout not in problems:
      problems[layout] = _shape_mismatches(state, expected_torch_shapes(name), ignore=CLASSIFIERS)
  matches = sorted(name for name in candidates if not problems[_layout(name)])
  closest = min(candidates, key=lambda name: len(problems[_layout(name)]))
  return matches, closest, problems[_layout(closest)]


def infer_model_name(state: dict[str, np.ndarray], arch: str | None = None) -> str:
  """The model whose state dict has exactly these keys and shapes (the class count aside); an
  `arch` that names a model (a timm checkpoint's args.model) is taken as it is, and
  torch_to_variables then checks the keys and shapes against it."""
  if arch in VARIANTS:
    return arch
  matches, closest, problems = _matching_models(state)
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise ConversionError(
        f"the checkpoint fits {', '.join(matches)} equally (they differ only in "
        "centers/fold, which have no weights): pass --model"
    )
  raise ConversionError(
      f"the checkpoint is not an FEC state dict: the closest variant, {closest}, differs in "
      f"{reporting.counted(len(problems), 'key')}, e.g.{_problem_lines(problems)}"
  )


def _mismatch_message(state: dict[str, np.ndarray], name: str, problems: list[str]) -> str:
  """Why `state` does not convert to `name`: the variant it holds instead (one line, a few keys),
  else the list of bad keys (the first SHOWN_PROBLEMS, and how many more)."""
  matches = _matching_models(state)[0]
  if matches and name not in matches:
    keys = "; ".join(" ".join(p.split()) for p in _examples(problems, 3))  # spacing collapsed
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    classifier = matches[0] in classifiers()
    init_from = (  # ImageNet weights for a segmenter
        " (a segmentation run starts from its conversion: --config.init_from)"
        if classifier and (name in SEGMENTERS or name.endswith("_seg"))
        else ""
    )
    return (
        f"the checkpoint holds {' or '.join(matches)}, not {name} ({len(problems)} keys "
        f"differ, e.g. {keys}{more}): pass --model {matches[0]} or leave out --model{init_from}"
    )
  return (
      f"the checkpoint does not match {name} ({reporting.counted(len(problems), 'problem')}):"
      f"{_problem_lines(problems)}"
  )


def _layout(name: str):
  """What fixes a model's state-dict keys and shapes: centers and folds have no weights."""
  variant = VARIANTS[SEGMENTERS.get(name, name)]
  return name in SEGMENTERS, dataclasses.replace(variant, centers=(), folds=())


def _without_num_batches_tracked(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops BatchNorm counters (those next to a running_mean): unused with a set momentum."""
  suffix = "." + NUM_BATCHES_TRACKED
  return {
      k: v
      for k, v in state.items()
      if not (k.endswith(suffix) and k.removesuffix(suffix) + ".running_mean" in state)
  }


def torch_to_variables(state: dict[str, np.ndarray], name: str, **overrides) -> tuple[dict, dict]:
  """Strictly converts an official (or mmseg) state dict to (variables, overrides) for
  `create_model(name, ...)`: {"params"}, plus "batch_stats" for the fpn_* segmenters.

  num_classes is read from the checkpoint's classifier (head / decode_head.conv_seg) when not given.
  """
  if name not in VARIANTS and name not in SEGMENTERS:
    raise ConversionError(
        f"unknown model {name!r}; available: {', '.join(list_models())}"
        + reporting.did_you_mean([name], list_models())
    )
  classifier = "decode_head.conv_seg.weight" if name in SEGMENTERS else "head.weight"
  if classifier in state and "num_classes" not in overrides:
    overrides = {**overrides, "num_classes": int(state[classifier].shape[0])}
  state = _without_num_batches_tracked(state)
  abstract = variable_shapes(create_model(name, **overrides))
  problems = _shape_mismatches(state, _torch_shapes(abstract))
  if problems:
    raise ConversionError(_mismatch_message(state, name, problems))
  variables = {
      path: np.ascontiguousarray(flax_value(path[1:], leaf.shape, state))
      for path, leaf in flax.traverse_util.flatten_dict(abstract).items()
  }
  return flax.traverse_util.unflatten_dict(variables), overrides


def torch_to_flax(state: dict[str, np.ndarray], name: str, **overrides) -> tuple[dict, dict]:
  """(params, overrides) of an FEC variant (which has only params), see `torch_to_variables`."""
  if name in SEGMENTERS:
    raise ConversionError(f"{name} has batch_stats too: use torch_to_variables")
  variables, overrides = torch_to_variables(state, name, **overrides)
  return variables["params"], overrides


def flax_to_torch(params) -> dict[str, np.ndarray]:
  """Flax params -> official state dict as writable numpy arrays (exact: layout changes only)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  return {
      key: np.array(value, order="C")
      for path, v in flat.items()
      for key, value in torch_entries(path, np.asarray(v)).items()
  }


def variables_to_torch(variables) -> dict[str, np.ndarray]:
  """Flax variables -> official (mmseg for fpn_*) state dict; every BatchNorm also gets torch's
  num_batches_tracked, as 0 (int64 scalar)."""
  state = flax_to_torch(variables["params"])
  for key, value in flax_to_torch(variables.get("batch_stats", {})).items():
    state[key] = value
    if key.endswith(".running_mean"):
      state[key.removesuffix("running_mean") + NUM_BATCHES_TRACKED] = np.zeros((), np.int64)
  return state


# --- command line ----------------------------------------------------------------------------

CHECKPOINT_FILE = "a .pth / .pth.tar / .safetensors checkpoint file"
# What --to-torch writes: torch.save's file under a checkpoint's usual suffixes, or safetensors.
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")
TORCH_OUTPUT = ".pth, .pth.tar, .pt, .bin or .ckpt (torch.save) or .safetensors"
ORBAX_DIRECTORY = (
    "an Orbax checkpoint directory (the --output of a conversion, or a train.py --workdir)"
)


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
      prog="convert_torch_weights.py",
      description=(
          "Convert official FEC PyTorch checkpoints to Orbax (default) or back (--to-torch)."
      ),
  )
  p.add_argument(
      "--model",
      choices=list_models(),
      help="variant; may be omitted when the checkpoint identifies it",
  )
  p.add_argument(
      "--input", required=True, help=f"{CHECKPOINT_FILE}, or with --to-torch {ORBAX_DIRECTORY}"
  )
  p.add_argument(
      "--output",
      required=True,
      help="Orbax directory to create, or with --to-torch the file to write: "
      f"{TORCH_OUTPUT} (missing parent directories are made)",
  )
  p.add_argument(
      "--overwrite",
      action="store_true",
      help="replace an existing --output (a .pth file, or a directory holding only an "
      "Orbax checkpoint); without it an existing output is an error",
  )
  p.add_argument(
      "--ema",
      action="store_true",
      help="convert the EMA weights (state_dict_ema; with --to-torch: a train.py run's)",
  )
  p.add_argument(
      "--to-torch", action="store_true", help="write an official state dict from an Orbax directory"
  )
  p.add_argument(
      "--step",
      type=int,
      help="with --to-torch: the saved step of a train.py workdir to write (default: the latest)",
  )
  return p


def _file_above(path: str) -> str | None:
  """The file among `path`'s parents (nothing can be made under it), or None."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  return None if os.path.isdir(parent) else parent


def _refuse_in_a_checkpoint(output: str, read: str | None = None) -> None:
  """A ConversionError where `output` lies in the checkpoint `read` (--to-torch's --input) or in
  another checkpoint, or would be taken for a checkpoint's step (output_in_a_checkpoint)."""
  problem = output_in_a_checkpoint(output, "--output", read)
  if problem:
    raise ConversionError(problem)


def check_paths(args: argparse.Namespace) -> None:
  """Every mistake in --input / --output, found before any slow work (ConversionError)."""
  src, dst = args.input, args.output
  expected = ORBAX_DIRECTORY if args.to_torch else CHECKPOINT_FILE
  written = "the .pth file to write" if args.to_torch else "the checkpoint directory to write"
  # An empty path (`--output "$UNSET"`) is the current directory to os.path.abspath: the Orbax
  # output would replace it, files and all.
  for flag, value, what in (("--input", src, expected), ("--output", dst, written)):
    problem = cli.path_problem(flag, value, what)
    if problem:
      raise ConversionError(problem)
  if not os.path.exists(src):
    raise ConversionError(f"--input {src} does not exist; expected {expected}")
  if args.to_torch and not os.path.isdir(src):
    raise ConversionError(
        f"--input {src} is a file; with --to-torch it must be {expected} "
        "(to convert a PyTorch file to Orbax, leave out --to-torch)"
    )
  if not args.to_torch and os.path.isdir(src):
    raise ConversionError(
        f"--input {src} is a directory; expected {expected} (to convert an "
        "Orbax directory to PyTorch, add --to-torch)"
    )
  if args.step is not None and not args.to_torch:
    raise ConversionError(
        "--step chooses a saved step of an Orbax --input, with --to-torch; a PyTorch "
        "checkpoint holds one set of weights"
    )
  if args.to_torch:
    if os.path.isdir(dst) or dst.endswith(os.sep):
      raise ConversionError(
          f"--output {dst} is a directory; with --to-torch it must be the path "
          "of the .pth file to write"
      )
    if not dst.lower().endswith((*TORCH_SUFFIXES, ".safetensors")):
      raise ConversionError(
          f"--output {dst}: expected the name of a checkpoint file to write, ending in "
          f"{TORCH_OUTPUT}"
      )
    above = _file_above(dst)
    if above:
      raise ConversionError(f"--output {dst}: {above} is a file, not a directory")
    _refuse_in_a_checkpoint(dst, read=src)
    if os.path.exists(dst) and not args.overwrite:
      raise ConversionError(f"--output {dst} exists; pass --overwrite to replace it")
    return
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise ConversionError(
        f"--output {dst} is a file; expected a directory for the Orbax checkpoint"
    )
  above = _file_above(dst)
  if above:
    raise ConversionError(
        f"--output {dst}: {above} is a file; expected a directory for the Orbax checkpoint"
    )
  _refuse_in_a_checkpoint(dst)
  if os.path.isdir(dst) and os.listdir(dst):
    if not replaceable_checkpoint(dst):
      raise ConversionError(
          f"--output directory {dst} holds more than an FEC checkpoint; "
          "--overwrite replaces only a conversion's output: choose another "
          "--output"
      )
    if not args.overwrite:
      raise ConversionError(
          f"--output directory {dst} exists and is not empty; pass --overwrite "
          "to replace the checkpoint in it"
      )


def _write_in_place(output: str, write: Callable[[str], None], directory: bool) -> None:
  """`write(path)` on a new name beside `output` (a directory made for it, or a file), then that
  renamed to `output`: a failed (or interrupted) write leaves the old output (--overwrite) or
  nothing, never half a checkpoint. Missing parents of `output` are made (and removed again
  where the write fails)."""
  output = os.path.abspath(output)
  parent = path = os.path.dirname(output)
  made = None  # the topmost of the parents made here
  while not os.path.exists(path):
    made, path = path, os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".converting-{uuid.uuid4().hex}")
  if directory:
    os.mkdir(staging)  # the mode of a fresh output: 0o777 less the umask (mkdtemp's is 0o700)
  try:
    write(staging)
  except BaseException:
    if made:  # with the staging name in it
      shutil.rmtree(made, ignore_errors=True)
    elif directory:
      shutil.rmtree(staging, ignore_errors=True)
    elif os.path.exists(staging):
      os.remove(staging)
    raise
  if directory and os.path.isdir(output):  # --overwrite (check_paths allows it), an empty folder
    shutil.rmtree(output)
  os.replace(staging, output)


def to_orbax(args) -> None:
  state, info, notes = read_state_dict(args.input, ema=args.ema, model=args.model)
  for note in notes:
    print(f"{args.input}: {note}")
  name = args.model or infer_model_name(state, info.get("arch"))
  variables, overrides = torch_to_variables(state, name)
  save = lambda directory: save_params(
      directory, variables["params"], name, overrides, batch_stats=variables.get("batch_stats")
  )
  _write_in_place(args.output, save, directory=True)
  count = count_params(variables["params"])
  options = "".join(f", {k}={v}" for k, v in overrides.items())
  print(f"wrote {name} ({count:,} parameters{options}) to {args.output}")


def to_torch(args) -> None:
  safetensors = args.output.lower().endswith(".safetensors")
  torch = None if safetensors else _torch()  # before the restore: a missing torch fails fast
  model, step = load_model(args.input, args.step)
  if args.model and args.model != model_name(model):
    raise ConversionError(
        f"{args.input} holds {model_name(model)}, not {args.model}: "
        f"pass --model {model_name(model)} or leave out --model"
    )
  model, variables = load_pretrained(args.input, step, ema=args.ema)
  state = variables_to_torch(variables)
  if safetensors:
    from safetensors.numpy import save

    # save, not save_file: save_file makes the file readable by its owner only (mode 0600)
    dump = lambda f: f.write(save(state))
  else:
    # np.require: params restored by Orbax are read-only, which torch.from_numpy warns about
    tensors = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in state.items()}
    # To a file object: torch.save names the archive inside after a path, and refuses the
    # staging file's name (it begins with a dot)
    dump = lambda f: torch.save(tensors, f)

  def write(path: str) -> None:
    with open(path, "wb") as f:
      dump(f)

  _write_in_place(args.output, write, directory=False)
  weights = f"the EMA weights of step {step}" if args.ema else f"step {step}"
  print(f"wrote {len(state)} tensors of {model_name(model)} ({weights}) to {args.output}")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  with cli.user_errors(ConversionError, CheckpointError):
    check_paths(args)
    (to_torch if args.to_torch else to_orbax)(args)
  return 0
