"""convert_torch_weights.py: checkpoint formats, strictness, clear errors, exact round trips."""

import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import load_file, save_file

import fec_jax
import torch_reference
import torch_reference_fpn
from configs import demo
from fec_jax import checkpoint, convert, reporting
from fec_jax.model import FAST_COMPILE, param_shapes, variable_shapes
from tests.train_fixture import save_step_3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_state():
  torch.manual_seed(0)
  model = torch_reference.create_torch_model("fec_small")
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.01)
  return model.state_dict()


def run_cli(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "convert_torch_weights.py"), *args],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=600,
  )


def test_cli_roundtrip_is_bit_exact_and_loads_strictly(tmp_path, small_state):
  """torch -> Orbax -> torch gives back every tensor bit for bit; the result loads strict=True."""
  src = tmp_path / "fec_small.pth.tar"
  torch.save({"state_dict": small_state, "epoch": 3, "arch": "fec_small"}, src)
  out = run_cli("--model", "fec_small", "--input", str(src), "--output", str(tmp_path / "orbax"))
  assert out.returncode == 0, out.stderr
  back_path = tmp_path / "back.pth"
  back = run_cli(
      "--model",
      "fec_small",
      "--input",
      str(tmp_path / "orbax"),
      "--output",
      str(back_path),
      "--to-torch",
  )
  assert back.returncode == 0, back.stderr
  assert back.stdout == f"wrote {len(small_state)} tensors of fec_small (step 0) to {back_path}\n"
  # no Orbax "Given directory is read only", no torch "NumPy array is not writable" warning
  assert out.stderr == back.stderr == "", (out.stderr, back.stderr)
  restored = torch.load(tmp_path / "back.pth", weights_only=True)
  assert set(restored) == set(small_state)
  for k, v in small_state.items():
    assert torch.equal(restored[k], v), k
  torch_reference.create_torch_model("fec_small").load_state_dict(restored, strict=True)


def convert_cli(capsys, *args):
  """convert_torch_weights.py in-process: (exit status, stdout, stderr)."""
  try:
    code = convert.main([str(a) for a in args])
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_load_pretrained_gives_reference_logits(tmp_path, small_state, capsys):
  src = tmp_path / "plain.pth"
  torch.save(small_state, src)
  assert convert_cli(capsys, "--input", src, "--output", tmp_path / "out")[0] == 0  # inferred
  model, variables = fec_jax.load_pretrained(tmp_path / "out")
  reference = torch_reference.create_torch_model("fec_small").eval()
  reference.load_state_dict(small_state)
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = reference(x).numpy()
  got = np.asarray(model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_checkpoints_with_one_module_per_block_still_load(tmp_path, small_state):
  """Orbax checkpoints written before a stage's blocks were scanned (network_0_2/..., one module
  per block) load into the stacked layout, every value in place."""
  state = {k: v.numpy() for k, v in small_state.items()}
  params, overrides = convert.torch_to_flax(state, "fec_small")
  legacy = checkpoint.per_block_layout(params)
  assert "network_0_2" in legacy and "network_0" not in legacy
  assert legacy["network_0_2"]["mlp"]["fc1"]["kernel"].shape == (32, 256)
  checkpoint.save_params(tmp_path / "old", legacy, "fec_small", overrides)
  _, variables = fec_jax.load_pretrained(tmp_path / "old")
  jax.tree.map(np.testing.assert_array_equal, variables["params"], params)
  assert convert.flax_to_torch(variables["params"]).keys() == state.keys()
  with pytest.raises(checkpoint.CheckpointError, match="--config.init_from=<this workdir>"):
    with checkpoint.training_manager(tmp_path / "old", keep=1) as mngr:  # resuming a run there
      checkpoint.restore_training(mngr, None, None, 0)


@pytest.mark.parametrize("per_block", [False, True])
def test_load_pretrained_names_the_params_an_override_reshapes(tmp_path, small_state, per_block):
  """An override that changes shapes (num_classes) is one error naming each mis-shaped param,
  in either layout; not Orbax's "Requested shape ... is not compatible"."""
  params, overrides = convert.torch_to_flax(
      {k: v.numpy() for k, v in small_state.items()}, "fec_small"
  )
  if per_block:
    params = checkpoint.per_block_layout(params)
  checkpoint.save_params(tmp_path / "ckpt", params, "fec_small", overrides)
  with pytest.raises(checkpoint.CheckpointError) as error:
    fec_jax.load_pretrained(tmp_path / "ckpt", num_classes=5)
  assert str(error.value) == (
      f"the params of {tmp_path / 'ckpt'} step 0 do not fit this model (2 problems):\n"
      "  mis-shaped head/bias: expected (5,), found (1000,)\n"
      "  mis-shaped head/kernel: expected (320, 5), found (320, 1000)"
  )


def test_save_params_writes_a_new_or_empty_folder_only(tmp_path):
  """A second save_params into the same folder (docs/training.md's snippet run twice) is one
  CheckpointError, not Orbax's StepAlreadyExistsError, and the first checkpoint stays."""
  ones = lambda s: np.ones(s.shape, s.dtype)
  params = jax.tree.map(ones, variable_shapes(fec_jax.create_model("fec_small"))["params"])
  checkpoint.save_params(tmp_path, params, "fec_small", {})  # empty: written
  for target in (tmp_path, tmp_path / "0"):  # the checkpoint, a folder with files
    with pytest.raises(checkpoint.CheckpointError) as error:
      checkpoint.save_params(target, {"w": np.zeros(2)}, "fec_small", {})
    assert str(error.value) == (
        f"{target} exists and is not an empty folder: save_params writes a new checkpoint "
        "directory (remove the old one first; convert_torch_weights.py --overwrite replaces one)"
    )
  (tmp_path / "note.txt").write_text("")
  with pytest.raises(checkpoint.CheckpointError, match="note.txt exists and is not an empty"):
    checkpoint.save_params(tmp_path / "note.txt", {"w": np.zeros(2)}, "fec_small", {})
  saved = ocp.StandardCheckpointer().restore(tmp_path / "0" / checkpoint.PARAMS_ITEM)
  jax.tree.map(np.testing.assert_array_equal, saved, params)


def test_save_params_takes_only_params_that_load(tmp_path):
  """The whole variables, params of other classes, another model or an unknown option were
  written, and each load of them failed (a list of 204 problems for the variables)."""
  model = fec_jax.create_model("fec_small", num_classes=10)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variable_shapes(model))
  params = variables["params"]
  cases = [
      (variables, "fec_small", {"num_classes": 10}, "takes the params, variables['params'], not"),
      (params, "fec_small", {}, "save_params('fec_small', {}) do not fit this model (2 problems)"),
      (params, "fec_base", {"num_classes": 10}, "do not fit this model (99 problems)"),
      (
          params,
          "fec_small",
          {"num_class": 10},
          "1 unknown option ['num_class'] for fec_small; accepted: ",
      ),
  ]
  for i, (tree, name, overrides, message) in enumerate(cases):
    with pytest.raises((checkpoint.CheckpointError, ValueError), match=re.escape(message)):
      checkpoint.save_params(tmp_path / f"c{i}", tree, name, overrides)
    assert not (tmp_path / f"c{i}").exists()


def test_save_params_needs_batch_stats_exactly_for_a_segmenter(tmp_path):
  """A segmenter saved without its BatchNorm statistics (docs/training.md's random-init snippet with
  fpn_fec_small) was written, and every load of it failed with Orbax's 'Item "batch_stats" was
  not found'; a classifier with batch_stats was written too. Both are one CheckpointError now,
  before anything is written."""
  cases = (
      ("fpn_fec_small", None, "fpn_fec_small has BatchNorm statistics: pass batch_stats="),
      ("fec_small", {"bn": np.ones(2)}, "fec_small has no BatchNorm statistics: leave out"),
  )
  for name, batch_stats, message in cases:
    with pytest.raises(checkpoint.CheckpointError, match=message):
      checkpoint.save_params(tmp_path / name, {"w": np.ones(2)}, name, {}, batch_stats)
    assert not (tmp_path / name).exists()


def test_save_params_takes_only_batch_stats_that_load(tmp_path):
  """BatchNorm statistics of other shapes or names were written unchecked, and every load then
  failed: Orbax's 'Requested shape: (128,) is not compatible with the stored shape: (256,)' called
  the step 'not an FEC checkpoint', and a tree without statistics ended the save with Orbax's
  'Found empty item' (a tmp folder left). Each is a ParamsMismatch now, before anything is
  written; the params are checked as before. One problem is counted as '1 problem' (it was
  '1 problems')."""
  variables = variable_shapes(fec_jax.create_model("fpn_fec_small", num_classes=3))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables["params"])
  stats = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables["batch_stats"])
  cases = [
      (
          jax.tree.map(lambda a: np.zeros(2 * a.shape[0], a.dtype), stats),
          "(14 problems):\n  mis-shaped batch_stats/decode_head/scale_heads_0_0/bn/mean: "
          "expected (128,), found (256,)",
      ),
      ({}, "(14 problems):\n  missing    batch_stats/decode_head/scale_heads_0_0/bn/mean"),
      (
          {**stats, "extra": {"mean": np.zeros(3)}},
          "do not fit this model (1 problem):\n  unexpected batch_stats/extra/mean: expected "
          "nothing, found (3,)",
      ),
  ]
  for i, (batch_stats, message) in enumerate(cases):
    with pytest.raises(checkpoint.ParamsMismatch, match=re.escape(message)):
      checkpoint.save_params(
          tmp_path / f"c{i}", params, "fpn_fec_small", {"num_classes": 3}, batch_stats
      )
    assert not (tmp_path / f"c{i}").exists()
  checkpoint.save_params(tmp_path / "fits", params, "fpn_fec_small", {"num_classes": 3}, stats)
  _, restored = checkpoint.load_pretrained(tmp_path / "fits")
  jax.tree.map(np.testing.assert_array_equal, restored["batch_stats"], stats)


@pytest.mark.parametrize("wrap", ["model", "module", "ema", "mmdet", "safetensors"])
def test_checkpoint_layouts(tmp_path, small_state, wrap):
  path = tmp_path / ("ckpt.safetensors" if wrap == "safetensors" else "ckpt.pth")
  ema = {k: v + 1 for k, v in small_state.items()}
  if wrap == "model":
    torch.save({"model": small_state}, path)
  elif wrap == "module":
    torch.save({f"module.{k}": v for k, v in small_state.items()}, path)
  elif wrap == "ema":
    torch.save({"state_dict": small_state, "state_dict_ema": ema}, path)
  elif wrap == "mmdet":
    state = {f"backbone.{k}": v for k, v in small_state.items()}
    state.update({"neck.lateral.weight": torch.zeros(3), "rpn_head.conv.weight": torch.zeros(2)})
    torch.save({"state_dict": state, "meta": {}}, path)
  else:
    save_file({k: v.contiguous() for k, v in small_state.items()}, path)
  state, _, notes = convert.read_state_dict(str(path), ema=wrap == "ema")
  want = ema if wrap == "ema" else small_state
  assert set(state) == set(want)
  for k in want:
    np.testing.assert_array_equal(state[k], want[k].numpy())
  if wrap == "mmdet":
    assert any("dropped 2 other keys" in n for n in notes)
  if wrap == "ema":
    assert convert.read_state_dict(str(path))[2] == [
        "using the weights under 'state_dict' (it has EMA weights too: --ema)"
    ]
  if wrap in ("module", "safetensors"):
    with pytest.raises(convert.ConversionError, match="is a plain state dict, one set of weights"):
      convert.read_state_dict(str(path), ema=True)


def test_a_checkpoint_of_ema_weights_alone_asks_for_ema(tmp_path, small_state):
  """{'state_dict_ema': ...} without --ema: one line asking for --ema (it said that
  ['state_dict_ema'] are not tensors); with --ema it converts."""
  path = tmp_path / "ema.pth"
  torch.save({"state_dict_ema": small_state, "epoch": 3}, path)
  with pytest.raises(convert.ConversionError) as error:
    convert.read_state_dict(str(path))
  assert str(error.value) == (
      f"{path}: the checkpoint's weights are EMA weights ('state_dict_ema', and no 'state_dict' or "
      "'model'): pass --ema"
  )
  assert set(convert.read_state_dict(str(path), ema=True)[0]) == set(small_state)


@pytest.mark.parametrize("saved", [{}, {"state_dict": {}, "epoch": 3}, {"model": {}}])
def test_an_empty_state_dict_says_it_holds_no_weights(tmp_path, saved):
  """Not "the closest variant, fec_base, differs in 244 keys": there is nothing to compare."""
  path = tmp_path / "empty.pth"
  torch.save(saved, path)
  with pytest.raises(convert.ConversionError) as error:
    convert.read_state_dict(str(path))
  assert str(error.value) == f"{path}: the checkpoint's state dict is empty: it holds no weights"


@pytest.mark.parametrize(
    "dtype, how",
    [(torch.float16, "exactly"), (torch.bfloat16, "exactly"), (torch.float64, "rounded")],
)
def test_weights_stored_in_another_precision_are_named(tmp_path, small_state, dtype, how, capsys):
  """A checkpoint saved in half (or double) precision converts to float32 values, and says so."""
  stored = {k: v.to(dtype) if v.is_floating_point() else v for k, v in small_state.items()}
  src = tmp_path / "half.pth"
  torch.save(stored, src)
  code, out, err = convert_cli(capsys, "--input", src, "--output", tmp_path / "o")
  assert (code, err) == (0, ""), err
  name = str(dtype).removeprefix("torch.")
  floats = sum(v.is_floating_point() for v in small_state.values())
  assert (
      out.splitlines()[0]
      == f"{src}: {floats} tensors stored as {name}, converted to float32 ({how})"
  )
  _, variables = fec_jax.load_pretrained(tmp_path / "o")
  back = convert.variables_to_torch(variables)
  for k, v in stored.items():
    np.testing.assert_array_equal(back[k], v.float().numpy(), err_msg=k)


def test_strict_errors_list_every_bad_key(tmp_path, small_state, capsys):
  state = dict(small_state)
  del state["network.0.1.norm1.weight"]
  state["network.9.foo"] = torch.zeros(3)
  state["head.bias"] = torch.zeros(7)
  path = tmp_path / "bad.pth"
  torch.save(state, path)
  code, _, err = convert_cli(
      capsys, "--model", "fec_small", "--input", path, "--output", tmp_path / "o"
  )
  assert code == 2
  assert "missing     network.0.1.norm1.weight  expected shape [32]" in err
  assert "unexpected  network.9.foo  found shape [3]" in err
  assert "mis-shaped  head.bias  expected shape [1000], found [7]" in err
  assert not os.path.exists(tmp_path / "o")


def test_another_network_with_model_shows_its_own_keys(tmp_path, capsys):
  """A ResNet-like state dict with --model fec_small: the listing takes missing and unexpected
  keys in turn, so the foreign keys show, not only 8 missing FEC keys."""
  state = {f"layer{i}.conv.weight": torch.zeros(4, 4, 3, 3) for i in range(300)}
  path = tmp_path / "resnet.pth"
  torch.save(state, path)
  code, _, err = convert_cli(
      capsys, "--model", "fec_small", "--input", path, "--output", tmp_path / "o"
  )
  assert code == 2 and "does not match fec_small" in err
  listed = [line.split()[0] for line in err.splitlines()[1:] if not line.startswith("  ...")]
  assert listed == ["missing", "unexpected"] * 4, err


def test_truncated_file_and_other_architecture(tmp_path, small_state, capsys):
  full = tmp_path / "full.pth"
  torch.save(small_state, full)
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(full.read_bytes()[:100_000])
  code, _, err = convert_cli(capsys, "--input", truncated, "--output", tmp_path / "o1")
  assert code == 2 and "truncated or corrupt" in err
  assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback

  other = tmp_path / "resnet.pth"
  torch.save(
      {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, other
  )
  code, _, err = convert_cli(capsys, "--input", other, "--output", tmp_path / "o2")
  assert code == 2 and "not an FEC state dict: the closest variant, fec_base, differs in 246" in err
  assert err.splitlines()[-1] == "  ... and 238 more"  # 8 of the 246 problems listed
  assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_unreadable_files_are_one_line_without_torch_advice(tmp_path, small_state, capsys):
  """Random bytes, a pickle torch.save did not write, an empty file, a truncated file: not a
  readable checkpoint (torch's "Re-running torch.load with weights_only set to False will likely
  succeed" and its advice on a corrupt file are not passed on); a checkpoint pickling another
  object names it; a saved list names the file."""
  saved = io.BytesIO()
  torch.save({"head.weight": torch.zeros(1000, 100)}, saved)
  not_readable = (
      "is not a readable PyTorch checkpoint: the file is truncated or corrupt, or was not written "
      "by torch.save; expected a state dict saved with torch.save (.pth / .pth.tar) or a "
      ".safetensors file"
  )
  files = {
      "random.pth": (np.random.default_rng(0).bytes(5000), not_readable),
      "pickle.pth": (pickle.dumps({"x": 1}, protocol=4), not_readable),
      "empty.pth": (
          b"",
          "is not a readable PyTorch checkpoint (EOFError); expected a state dict saved with "
          "torch.save (.pth / .pth.tar) or a .safetensors file; the file may be truncated or "
          "corrupt",
      ),
      "truncated.pth": (
          saved.getvalue()[: len(saved.getvalue()) // 2],
          "is not a readable PyTorch checkpoint (RuntimeError: PytorchStreamReader failed "
          "reading zip archive: failed finding central directory); expected a state dict saved "
          "with torch.save (.pth / .pth.tar) or a .safetensors file; the file may be truncated "
          "or corrupt",
      ),
  }
  for name, (content, message) in files.items():
    (tmp_path / name).write_bytes(content)
  torch.save({**small_state, "best_metric": np.float64(80.0)}, tmp_path / "numpy.pth")
  scalar = np.float64(80.0).__reduce__()[0]  # numpy._core.multiarray.scalar in numpy 2
  files["numpy.pth"] = (
      None,
      f"holds a pickled {scalar.__module__}.{scalar.__name__}, which fec-jax does not unpickle "
      "(it loads .pth files with torch.load(weights_only=True), which runs no code from the "
      "file); "
      "expected a state dict of tensors: save model.state_dict() with torch.save, or as "
      ".safetensors",
  )
  for name, (_, message) in files.items():
    code, out, err = convert_cli(capsys, "--input", tmp_path / name, "--output", tmp_path / "o")
    assert (code, out, err) == (2, "", f"error: {tmp_path / name} {message}\n"), name
  torch.save([1, 2, 3], tmp_path / "list.pth")
  code, out, err = convert_cli(capsys, "--input", tmp_path / "list.pth", "--output", tmp_path / "o")
  assert err == f"error: {tmp_path / 'list.pth'}: expected a dict of tensors, found list\n"
  assert not os.path.exists(tmp_path / "o")


def test_wrong_variant_names_the_one_it_holds():
  """fec_base weights with --model fec_small: one line naming fec_base, 3 keys and a count."""
  state = {
      k: np.zeros(shape, np.float32)
      for k, shape in convert.expected_torch_shapes("fec_base").items()
  }
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_flax(state, "fec_small")
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("the checkpoint holds fec_base, not fec_small (277 keys differ, e.g. ")
  assert [message.count(k) for k in ("missing", "mis-shaped", "unexpected")] == [1, 1, 1]
  assert message.endswith("; and 274 more): pass --model fec_base or leave out --model")


def test_one_key_or_param_amiss_is_counted_in_the_singular():
  """A state dict that lacks one key, and params with one of another shape: '1 key', '1 problem'
  (they said '1 keys', '1 problems')."""
  state = {
      k: np.zeros(shape, np.float32)
      for k, shape in convert.expected_torch_shapes("fec_small").items()
      if k != "norm.bias"
  }
  with pytest.raises(convert.ConversionError) as e:
    convert.infer_model_name(state)
  assert str(e.value) == (
      "the checkpoint is not an FEC state dict: the closest variant, fec_small, differs in 1 key, "
      "e.g.\n  missing     norm.bias  expected shape [320]"
  )
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_variables(state, "fec_small")
  assert str(e.value) == (
      "the checkpoint does not match fec_small (1 problem):\n"
      "  missing     norm.bias  expected shape [320]"
  )
  with pytest.raises(checkpoint.ParamsMismatch) as e:
    checkpoint.raise_for_mismatch({}, {}, {"head/bias": ((10,), (5,))}, "mine")
  assert str(e.value) == (
      "the params of mine do not fit this model (1 problem):\n"
      "  mis-shaped head/bias: expected (10,), found (5,)"
  )


@pytest.mark.parametrize("name", ["fpn_fec_small", "fec_small_seg"])
def test_classifier_weights_for_a_segmenter_point_to_init_from(small_state, name):
  """ImageNet weights with --model of a segmenter (or its backbone): the error names the
  classifier they hold and how a segmentation run starts from them."""
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_variables({k: v.numpy() for k, v in small_state.items()}, name)
  assert str(e.value).startswith(f"the checkpoint holds fec_small, not {name} (")
  assert str(e.value).endswith(
      ": pass --model fec_small or leave out --model (a segmentation run starts from its "
      "conversion: --config.init_from)"
  )


@pytest.fixture(scope="module")
def orbax_small(tmp_path_factory, small_state):
  """A converter output of fec_small, and its params."""
  path = tmp_path_factory.mktemp("orbax") / "fec_small"
  params, overrides = convert.torch_to_flax(
      {k: v.numpy() for k, v in small_state.items()}, "fec_small"
  )
  fec_jax.checkpoint.save_params(str(path), params, "fec_small", overrides)
  return path


def test_a_numbered_folder_that_no_run_saved_is_named_as_the_cause(orbax_small, tmp_path):
  """A numbered folder in a checkpoint that is no saved step (another command's output, made
  before such outputs were refused) is the latest step to Orbax: the error says to move it."""
  run = shutil.copytree(orbax_small, tmp_path / "run")
  (run / "7").mkdir()
  (run / "7" / "picture.png").write_bytes(b"a picture")
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(run))
  assert str(e.value) == (
      f"{run} step 7 is not an FEC checkpoint: {run / '7'} has no item 'model', so no run saved "
      f"it, but Orbax takes every numbered folder there for a step: move it out of {run}"
  )


def test_a_truncated_checkpoint_file_is_one_error_naming_the_step(orbax_small, tmp_path):
  """An array file cut short (an interrupted copy, a full disk) was a traceback of Orbax's bare
  Exception ("Encountered error while reading array index") from eval.py, a resume and
  init_from."""
  run = shutil.copytree(orbax_small, tmp_path / "run")
  arrays = max((run / "0" / "params").glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
  arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(run))
  assert re.fullmatch(
      rf"{run / '0'} cannot be read \(.*Error reading .* in OCDBT database .*\): a file of this "
      rf"step is truncated or corrupt; saved steps: \[0\] \(another is read with --step=N or "
      rf"--config.init_from_step=N; to resume from an earlier one, move {run / '0'} out of the "
      rf"workdir\)",
      str(e.value),
  ), str(e.value)


@pytest.mark.parametrize("cut", ["ocdbt.process_0/d/*", "manifest.ocdbt"])
def test_a_truncated_checkpoint_prints_no_traceback_after_its_error(
    orbax_small, tmp_path, monkeypatch, cut
):
  """After the error, the reads still in flight when Orbax closed its event loop printed
  "RuntimeError: Event loop is closed" tracebacks (sys.unraisablehook) from TensorStore's
  threads: a truncated array file fails the restore, a truncated manifest the metadata read."""
  run = shutil.copytree(orbax_small, tmp_path / "run")
  cut = max((run / "0" / "params").glob(cut), key=lambda p: p.stat().st_size)
  cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
  with pytest.raises(checkpoint.CheckpointError):
    fec_jax.load_pretrained(str(run))
  time.sleep(0.5)  # they came from reads that finished after the error
  assert unraisable == []


@pytest.mark.parametrize(
    "cut", ["params/_METADATA", "params/manifest.ocdbt", "params/d/*", "model/metadata"]
)
def test_truncated_metadata_is_a_truncated_step_not_another_checkpoint(orbax_small, tmp_path, cut):
  """A file that Orbax reads before the arrays cut short was "... is not an FEC checkpoint with
  items 'model' and ['params']: ..." and, from TensorStore, a line of about 1,200 characters
  ending in its spec; now it is the error of a truncated array file, with the cause's first
  line."""
  run = shutil.copytree(orbax_small, tmp_path / "run")
  (cut,) = (run / "0").glob(cut)
  cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(run))
  message = str(e.value)
  assert re.fullmatch(
      rf"{run / '0'} cannot be read \([^\n]+\): a file of this step is truncated or corrupt; "
      rf"saved steps: \[0\] \(another is read with --step=N or --config.init_from_step=N; to "
      rf"resume from an earlier one, move {run / '0'} out of the workdir\)",
      message,
  ), message
  assert "tensorstore_spec" not in message, message
  assert len(message.replace(str(run), "RUN")) < 600, message  # it names the file, not the spec


@pytest.mark.parametrize("cut", ["_METADATA", "manifest.ocdbt"])
def test_a_restore_of_truncated_metadata_is_the_truncated_step_error(orbax_small, tmp_path, cut):
  """A resume (restore_training) reads no metadata before its restore: it passed on Orbax's
  ValueError (TensorStore's DATA_LOSS and its spec) or a bare JSONDecodeError, which named no
  file or step."""
  run = shutil.copytree(orbax_small, tmp_path / "run")
  cut = run / "0" / "params" / cut
  cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
  model, _ = checkpoint.load_model(str(run))
  target = checkpoint._local_target(variable_shapes(model)["params"])
  args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
  with checkpoint._read_manager(str(run)) as mngr:
    with pytest.raises(checkpoint.CheckpointError, match="a file of this step is truncated"):
      checkpoint._restore_arrays(mngr, 0, args)


def _tiny_run(workdir):
  """A train.py checkpoint (save_training) of step 3 with small random params and AdamW state
  (random: its chunks do not compress into the b-tree nodes, as a model's do not); returns
  (state, abstract state, a fresh data iterator)."""
  import grain
  import optax

  params = {
      "conv": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 16, 32))},
      "head": {"bias": jnp.arange(10.0), "kernel": jax.random.normal(jax.random.key(2), (32, 10))},
  }
  tx = optax.adamw(1e-3)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  state = save_step_3(workdir, params, opt_state, "fec_small")
  return state, jax.eval_shape(lambda: state), iter(grain.MapDataset.range(8).to_iter_dataset())


@pytest.mark.parametrize(
    "cut",
    [
        "params/_METADATA",
        "params/manifest.ocdbt",
        "params/d/*",
        "opt_state/_METADATA",
        "opt_state/manifest.ocdbt",
        "opt_state/d/*",
        "opt_state/_sharding",
    ],
)
def test_a_resume_of_a_step_with_truncated_metadata_is_the_truncated_step_error(tmp_path, cut):
  """restore_training reads the params' and opt_state's metadata before its restore, outside
  _restore_arrays: such a file cut short was a bare JSONDecodeError, or Orbax's ValueError with
  TensorStore's spec (a _sharding cut short was that too, in the restore)."""
  _, abstract, data_iter = _tiny_run(tmp_path)
  (cut,) = (tmp_path / "3").glob(cut)
  cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
  with checkpoint.training_manager(tmp_path, keep=1) as mngr:
    with pytest.raises(checkpoint.CheckpointError) as e:
      checkpoint.restore_training(mngr, abstract, data_iter, 3)
  assert re.fullmatch(
      rf"{tmp_path / '3'} cannot be read \([^\n]+\): a file of this step is truncated or "
      rf"corrupt; saved steps: \[3\] \(another is read with --step=N or "
      rf"--config.init_from_step=N; to resume from an earlier one, move {tmp_path / '3'} out of "
      rf"the workdir\)",
      str(e.value),
  ), str(e.value)
  assert "tensorstore_spec" not in str(e.value)


def _flip_a_byte(path):
  """Changes the middle byte of `path` (one bit of it), as a disk or a copy might."""
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 1
  path.write_bytes(bytes(data))


def _corrupt_step_error(step_dir, array: str) -> str:
  return (
      rf"{step_dir} cannot be read \({array} differs from the array saved \(its CRC-32\)\): a "
      rf"file of this step is truncated or corrupt; saved steps: \[\d+\] \(another is read "
      rf"with --step=N or --config.init_from_step=N; to resume from an earlier one, move "
      rf"{step_dir} out of the workdir\)"
  )


def test_a_changed_byte_in_the_weights_is_the_corrupt_step_error(orbax_small, tmp_path):
  """A byte changed in the data file of the params (the chunks are zstd frames without a
  checksum, and OCDBT checks only its manifest and b-tree nodes) loaded without an error, with
  one value wrong: eval.py, init_from and the converter's --to-torch read wrong weights."""
  run = shutil.copytree(orbax_small, tmp_path / "run")
  arrays = max((run / "0" / "params").glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
  _flip_a_byte(arrays)
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(run))
  assert re.fullmatch(_corrupt_step_error(run / "0", r"params\[[^\n]+\]"), str(e.value)), str(
      e.value
  )


def test_a_changed_byte_in_the_optimizer_state_is_the_corrupt_step_error(tmp_path):
  """A resume read the optimizer state of a data file with a byte changed without an error."""
  _, abstract, data_iter = _tiny_run(tmp_path)
  files = (tmp_path / "3" / "opt_state").glob("ocdbt.process_0/d/*")
  _flip_a_byte(max(files, key=lambda p: p.stat().st_size))
  with checkpoint.training_manager(tmp_path, keep=1) as mngr:
    with pytest.raises(checkpoint.CheckpointError) as e:
      checkpoint.restore_training(mngr, abstract, data_iter, 3)
  assert re.fullmatch(_corrupt_step_error(tmp_path / "3", r"opt_state\[[^\n]+\]"), str(e.value))


def _replace_once(path, old: str | None, new: str):
  """Replaces the first `old` in the text of `path` (which must hold it) by `new`; the whole text
  where `old` is None."""
  text = path.read_text()
  if old is None:
    return path.write_text(new)
  assert old in text, text[:300]
  path.write_text(text.replace(old, new, 1))


TRUNCATED = "a file of this step is truncated or corrupt"
# A file that parses but holds what this Orbax or grain does not read: another version wrote it,
# or a changed byte
OTHER_ORBAX = (
    r"that file was written by another version of Orbax \(this is orbax-checkpoint "
    rf"{re.escape(ocp.__version__)}\), or is damaged"
)
OTHER_GRAIN = (
    r"that file was written by another version of grain \(this is grain "
    rf"{re.escape(grain.__version__)}\) or of the train data pipeline, or is damaged"
)


def _truncated_step_error(step_dir, cause: str, problem: str = TRUNCATED) -> str:
  return (
      rf"{step_dir} cannot be read \({cause}\): {problem}; saved "
      rf"steps: \[\d+\] \(another is read with --step=N or --config.init_from_step=N; to resume "
      rf"from an earlier one, move {step_dir} out of the workdir\)"
  )


PARSING_DAMAGE = {  # a JSON file that still parses, as a changed byte may leave it
    "model key renamed": ("model/metadata", '"overrides"', '"overridez"', r"model/metadata .*"),
    "model name a number": ("model/metadata", '"fec_small"', "7", r"model/metadata .*"),
    "checksums key renamed": ("checksums/metadata", '"params"', '"paramz"', r"checksums/.*"),
    "checksums a number": ("checksums/metadata", None, "5", r"checksums/.*"),
    "_METADATA key renamed": (
        "params/_METADATA",
        '"key"',
        '"kez"',
        r"KeyError 'key' .*_METADATA.*",
        OTHER_ORBAX,
    ),
    "_METADATA value of another type": (
        "params/_METADATA",
        '"value_metadata": {',
        '"value_metadata": 5, "x": {',
        r"TypeError .*_METADATA.*",
        OTHER_ORBAX,
    ),
    "_METADATA key_type outside its enum": (
        "params/_METADATA",
        '"key_type": 2',
        '"key_type": 7',
        r"ValueError 7 is not a valid KeyType reading Orbax's metadata of an item, its _METADATA.*",
        OTHER_ORBAX,
    ),
    "_METADATA skip_deserialize true": (
        "params/_METADATA",
        '"skip_deserialize": false',
        '"skip_deserialize": true',
        r"params/_METADATA marks [\w/]+ as no array",
    ),
}  # a converter output (numpy params) has no array_metadatas/ or _sharding


@pytest.mark.parametrize("damage", PARSING_DAMAGE)
def test_json_metadata_that_parses_but_is_corrupt_is_the_corrupt_step_error(
    orbax_small, tmp_path, damage
):
  """A key renamed or a value of another type in a JSON file of the step (still JSON) was a
  KeyError or TypeError traceback from eval.py and init_from (or, for the checksums, no check),
  or "not an FEC checkpoint" for Orbax's metadata (a key_type outside its enum too), or an
  AttributeError traceback for a leaf marked skip_deserialize; now it is the truncated-step
  error, or where Orbax's reader refuses a file that parses, the error of a file that another
  Orbax wrote or a damaged one (it was the truncated-step error too)."""
  file, old, new, cause, *problem = PARSING_DAMAGE[damage]
  run = shutil.copytree(orbax_small, tmp_path / "run")
  _replace_once(run / "0" / file, old, new)
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(run))
  assert re.fullmatch(_truncated_step_error(run / "0", cause, *problem), str(e.value)), str(e.value)


RESUME_PARSING_DAMAGE = {
    "data_iterator key renamed": (
        "data_iterator/process_0-of-1.json",
        '"next_index"',
        '"next_indez"',
        r"KeyError 'next_index' reading the train iterator's state, data_iterator/process_\*\.json",
        OTHER_GRAIN,
    ),
    "data_iterator value a string": (
        "data_iterator/process_0-of-1.json",
        '"next_index": 1',
        '"next_index": "x"',
        r"TypeError .* reading the train iterator's state, data_iterator/process_\*\.json",
        OTHER_GRAIN,
    ),
    "params _METADATA key renamed": (
        "params/_METADATA",
        '"key"',
        '"kez"',
        r"KeyError 'key' .*",
        OTHER_ORBAX,
    ),
    "opt_state _METADATA key_type outside its enum": (
        "opt_state/_METADATA",
        '"key_type": 1',
        '"key_type": 0',
        r"ValueError 0 is not a valid KeyType reading Orbax's metadata .*",
        OTHER_ORBAX,
    ),
    "opt_state _METADATA skip_deserialize a string": (
        "opt_state/_METADATA",
        '"skip_deserialize": false',
        '"skip_deserialize": "no"',
        r"opt_state/_METADATA marks [\w/]+ as no array",
    ),
    "progress _METADATA key renamed": (
        "progress/_METADATA",
        '"key"',
        '"kez"',
        r"KeyError 'key' .*",
        OTHER_ORBAX,
    ),
    "progress _METADATA skip_deserialize true": (  # an item whose metadata is not read first
        "progress/_METADATA",
        '"skip_deserialize": false',
        '"skip_deserialize": true',
        r"ValueError Unrecognized typestr: jax.Array .* reading Orbax's metadata .*",
        OTHER_ORBAX,
    ),
    "opt_state array_metadatas key renamed": (
        "opt_state/array_metadatas/process_0",
        '"param_name"',
        '"param_namz"',
        r"KeyError 'param_name' .*",
        OTHER_ORBAX,
    ),
    "_sharding key renamed": (
        "params/_sharding",
        '"Y29udi5rZXJuZWw="',  # conv.kernel
        '"Y29udi5rZXJuZWx="',
        r"NOT_FOUND: .*JSON Pointer .*",
    ),
    "checksums a list": ("checksums/metadata", None, "[]", r"checksums/.*"),
}


@pytest.mark.parametrize("damage", RESUME_PARSING_DAMAGE)
def test_a_resume_of_json_metadata_that_parses_but_is_corrupt_is_the_corrupt_step_error(
    tmp_path, damage
):
  """The same on a resume (restore_training), which reads the train iterator's state too: a
  KeyError or TypeError traceback, TensorStore's NOT_FOUND with its spec, or Orbax's ValueError
  for a leaf marked skip_deserialize; Orbax's or grain's readers refusing a file that parses
  name another version of them (or damage) as the cause."""
  file, old, new, cause, *problem = RESUME_PARSING_DAMAGE[damage]
  _, abstract, data_iter = _tiny_run(tmp_path)
  _replace_once(tmp_path / "3" / file, old, new)
  with checkpoint.training_manager(tmp_path, keep=1) as mngr:
    with pytest.raises(checkpoint.CheckpointError) as e:
      checkpoint.restore_training(mngr, abstract, data_iter, 3)
  error = _truncated_step_error(tmp_path / "3", cause, *problem)
  assert re.fullmatch(error, str(e.value)), str(e.value)
  assert "tensorstore_spec" not in str(e.value)


def test_a_resume_of_an_iterator_state_of_another_pipeline_names_the_versions(tmp_path):
  """A train iterator's state that this pipeline's set_state does not read (here fec-jax's
  loader's, given to grain's own iterator: a KeyError 'next_index') was 'a file of this step is
  truncated or corrupt', though another version of grain or of the pipeline writes such a state
  whole: the error says so, with this run's grain version (the step records none)."""
  _, abstract, data_iter = _tiny_run(tmp_path)
  loader_state = '{"step": 1, "bad": 0, "converted": 0, "epoch_start": [0, 0]}'
  _replace_once(
      tmp_path / "3" / checkpoint.DATA_ITER_ITEM / "process_0-of-1.json", None, loader_state
  )
  with checkpoint.training_manager(tmp_path, keep=1) as mngr:
    with pytest.raises(checkpoint.CheckpointError) as e:
      checkpoint.restore_training(mngr, abstract, data_iter, 3)
  cause = (
      r"KeyError 'next_index' reading the train iterator's state, data_iterator/process_\*\.json"
  )
  error = _truncated_step_error(tmp_path / "3", cause, OTHER_GRAIN)
  assert re.fullmatch(error, str(e.value)), str(e.value)
  assert f"(this is grain {grain.__version__})" in str(e.value)


def test_a_resume_of_a_step_with_a_model_key_renamed_is_the_corrupt_step_error(tmp_path):
  """train.py reads the model item of the step it resumes (resumable_step) first: a key renamed
  there was a KeyError traceback from the message of a run of another model."""
  _tiny_run(tmp_path)
  _replace_once(tmp_path / "3" / "model" / "metadata", '"overrides"', '"overridez"')
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.resumable_step(str(tmp_path), "fec_small", {}, ema=False)
  assert re.fullmatch(_truncated_step_error(tmp_path / "3", "model/metadata .*"), str(e.value))


def test_a_step_saved_without_checksums_restores(orbax_small, tmp_path):
  """A step saved before fec-jax wrote the item checksums restores as before, unchecked."""
  run = shutil.copytree(orbax_small, tmp_path / "run")
  shutil.rmtree(run / "0" / checkpoint.CHECKSUMS_ITEM)
  _, variables = fec_jax.load_pretrained(str(run))
  _, expected = fec_jax.load_pretrained(str(orbax_small))
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, expected))
  state, abstract, data_iter = _tiny_run(tmp_path / "train")
  shutil.rmtree(tmp_path / "train" / "3" / checkpoint.CHECKSUMS_ITEM)
  with checkpoint.training_manager(tmp_path / "train", keep=1) as mngr:
    restored = checkpoint.restore_training(mngr, abstract, data_iter, 3)
  assert jax.tree.all(jax.tree.map(np.array_equal, restored, state))


def test_weights_saved_in_bfloat16_restore_as_float32_with_their_checksums(tmp_path):
  """save_params stores bfloat16 params as given and load_pretrained reads them as the model's
  float32: the checksums of the bfloat16 bytes flagged every such array as changed."""
  shapes = param_shapes(fec_jax.create_model("fec_small"))
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5 + 2**-8, jnp.bfloat16), shapes)
  checkpoint.save_params(str(tmp_path / "ckpt"), params, "fec_small", {})
  _, variables = fec_jax.load_pretrained(str(tmp_path / "ckpt"))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  assert jax.tree.all(jax.tree.map(lambda a: bool((a == 0.5 + 2**-8).all()), variables))


def test_a_step_directory_given_as_the_checkpoint_names_its_parent(orbax_small, tmp_path):
  """`ckpt/fec_small/0` (or its item `0/params`, or `ckpt`) for `ckpt/fec_small`: the message
  names the directory to give."""
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(orbax_small / "0"))
  assert str(e.value) == (
      f"{orbax_small / '0'} is step 0 of the checkpoint {orbax_small}: give that directory "
      "(and step 0 where the command takes a step, e.g. --step=0 or --config.init_from_step=0)"
  )
  with pytest.raises(checkpoint.CheckpointError) as e:  # one of a step's items
    fec_jax.load_pretrained(str(orbax_small / "0" / "params"))
  assert str(e.value) == (
      f"{orbax_small / '0' / 'params'} is the item 'params' of step 0 of the checkpoint "
      f"{orbax_small}: give that directory"
  )
  with pytest.raises(checkpoint.CheckpointError) as e:  # the folder that holds the checkpoint
    fec_jax.load_pretrained(str(orbax_small.parent))
  assert str(e.value) == (
      f"{orbax_small.parent} holds no checkpoint steps (it holds the checkpoint fec_small: give "
      "that); expected the --output of convert_torch_weights.py or a train.py --workdir with a "
      "saved step"
  )
  for run in ("a", "b", "c", "d"):  # a folder of runs
    (tmp_path / run / "4" / checkpoint.MODEL_ITEM).mkdir(parents=True)
  expected = r"steps \(it holds the checkpoints a, b, c and 1 more: give one\);"
  with pytest.raises(checkpoint.CheckpointError, match=expected):
    fec_jax.load_pretrained(str(tmp_path))
  reporting.write_config(str(tmp_path / "early"), demo.get_config())  # killed before its first save
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(tmp_path / "early"))
  assert str(e.value) == (
      f"{tmp_path / 'early'} holds no checkpoint steps (its config.json is a train.py run's, "
      "which saved no step yet: a run saves every config.checkpoint_every_steps steps and at its "
      "end); expected the --output of convert_torch_weights.py or a train.py --workdir with a "
      "saved step"
  )
  (tmp_path / "hf").mkdir()  # a Hugging Face model's folder: a config.json of no run
  (tmp_path / "hf" / "config.json").write_text('{"architectures": ["ViTModel"]}')
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained(str(tmp_path / "hf"))
  assert str(e.value).startswith(f"{tmp_path / 'hf'} holds no checkpoint steps; expected the")


def no_slow_work(monkeypatch):
  """Path mistakes are found before any checkpoint is read."""

  def slow(*args, **kwargs):
    raise AssertionError("a checkpoint was read before the paths were checked")

  for name in ("read_state_dict", "load_pretrained"):
    monkeypatch.setattr(convert, name, slow)


PATH_MISTAKES = [
    (
        "missing input",
        "--input {tmp}/nope.pth does not exist; expected a .pth / .pth.tar / "
        ".safetensors checkpoint file",
    ),
    (
        "directory as input",
        "--input {orbax} is a directory; expected a .pth / "
        ".pth.tar / .safetensors checkpoint file (to convert an Orbax "
        "directory to PyTorch, add --to-torch)",
    ),
    (
        "file as output",
        "--output {tmp}/w.pth is a file; expected a directory for the Orbax checkpoint",
    ),
    (
        "non-empty output",
        "--output directory {orbax} exists and is not empty; pass "
        "--overwrite to replace the checkpoint in it",
    ),
    (
        "missing orbax input",
        "--input {tmp}/nodir does not exist; expected an Orbax checkpoint "
        "directory (the --output of a conversion, or a train.py --workdir)",
    ),
    (
        "file as orbax input",
        "--input {tmp}/w.pth is a file; with --to-torch it must be an Orbax "
        "checkpoint directory",
    ),
    (
        "directory as .pth output",
        "--output {tmp} is a directory; with --to-torch it must be the "
        "path of the .pth file to write",
    ),
    (
        "empty output",  # the current directory to os.path.abspath: it would be replaced
        "--output is empty; expected the checkpoint directory to write",
    ),
    ("empty .pth output", "--output is empty; expected the .pth file to write"),
    ("empty input", "--input is empty; expected a .pth / .pth.tar / .safetensors checkpoint"),
    (
        "output with a tilde no shell expanded",  # --output=~/ckpt: a folder '~' here
        "--output ~/ckpt/fec_small: the shell expands '~' only at a word's start, not after "
        "--output=, so this names a folder '~' in the current directory",
    ),
    (
        "directory path as .pth output",
        "--output {tmp}/new/ is a directory; with --to-torch it must be the path of the .pth",
    ),
    ("existing .pth output", "--output {tmp}/w.pth exists; pass --overwrite to replace it"),
    (
        "non-checkpoint output",  # no advice to --overwrite, which would refuse it
        "--output directory {tmp} holds more than an FEC checkpoint;"
        " --overwrite replaces only a conversion's output",
    ),
    (
        "not a checkpoint's name",  # the file would be a pickle named like a photo
        "--output {tmp}/photo.jpg: expected the name of a checkpoint file to write, ending in "
        ".pth, .pth.tar, .pt, .bin or .ckpt (torch.save) or .safetensors",
    ),
    (
        "step without to-torch",
        "--step chooses a saved step of an Orbax --input, with --to-torch; a PyTorch checkpoint"
        " holds one set of weights",
    ),
    (
        "output under a file",  # read the checkpoint, then failed making the directory
        "--output {tmp}/w.pth/sub/o: {tmp}/w.pth is a file; expected a directory for the Orbax "
        "checkpoint",
    ),
    (".pth output under a file", "--output {tmp}/w.pth/b.pth: {tmp}/w.pth is a file, not a dir"),
    (
        ".pth output in the converter output",  # --overwrite would then refuse to replace it
        "--output {orbax}/b.pth is inside the checkpoint --input {orbax}: write it outside",
    ),
    (
        ".pth output in a step directory",  # deleted with the step
        "--output {orbax}/0/b.pth is inside the checkpoint --input {orbax}: write it outside",
    ),
    (
        "output in a converter output",  # a later --overwrite of it would delete this one
        "--output {orbax}/o is inside the checkpoint {orbax}: write it outside",
    ),
    (
        "output in a step directory",  # deleted with the step
        "--output {orbax}/0/o is inside the checkpoint {orbax}: write it outside",
    ),
    (
        ".pth output in another checkpoint",
        "--output {orbax}/0/b.pth is inside the checkpoint {orbax}: write it outside",
    ),
    (
        "overwrite of a non-checkpoint",
        "--output directory {tmp} holds more than an FEC checkpoint;"
        " --overwrite replaces only a conversion's output",
    ),
]


@pytest.mark.parametrize("case, expected", PATH_MISTAKES, ids=[c for c, _ in PATH_MISTAKES])
def test_path_mistakes_are_one_line_before_any_work(
    case, expected, orbax_small, tmp_path, monkeypatch, capsys
):
  tmp = tmp_path
  pth = tmp / "w.pth"
  pth.write_bytes(b"weights")
  args = {
      "missing input": ["--input", tmp / "nope.pth", "--output", tmp / "o"],
      "directory as input": ["--input", orbax_small, "--output", tmp / "o"],
      "file as output": ["--input", pth, "--output", pth],
      "non-empty output": ["--input", pth, "--output", orbax_small],
      "missing orbax input": ["--input", tmp / "nodir", "--output", tmp / "b.pth", "--to-torch"],
      "file as orbax input": ["--input", pth, "--output", tmp / "b.pth", "--to-torch"],
      "directory as .pth output": ["--input", orbax_small, "--output", tmp, "--to-torch"],
      "empty output": ["--input", pth, "--output", ""],
      "empty .pth output": ["--input", orbax_small, "--output", "", "--to-torch"],
      "empty input": ["--input", "", "--output", tmp / "o"],
      "output with a tilde no shell expanded": ["--input", pth, "--output=~/ckpt/fec_small"],
      "directory path as .pth output": [
          "--input",
          orbax_small,
          "--output",
          f"{tmp}/new/",
          "--to-torch",
      ],
      "existing .pth output": ["--input", orbax_small, "--output", pth, "--to-torch"],
      "non-checkpoint output": ["--input", pth, "--output", tmp],
      "not a checkpoint's name": [
          "--input",
          orbax_small,
          "--output",
          tmp / "photo.jpg",
          "--to-torch",
      ],
      "overwrite of a non-checkpoint": ["--input", pth, "--output", tmp, "--overwrite"],
      "step without to-torch": ["--input", pth, "--output", tmp / "o", "--step=4"],
      "output under a file": ["--input", pth, "--output", pth / "sub" / "o"],
      ".pth output under a file": ["--input", orbax_small, "--output", pth / "b.pth", "--to-torch"],
      ".pth output in the converter output": [
          "--input",
          orbax_small,
          "--output",
          orbax_small / "b.pth",
          "--to-torch",
      ],
      ".pth output in a step directory": [
          "--input",
          orbax_small,
          "--output",
          orbax_small / "0" / "b.pth",
          "--to-torch",
      ],
      ".pth output in another checkpoint": [
          "--input",
          tmp / "copy",
          "--output",
          orbax_small / "0" / "b.pth",
          "--to-torch",
      ],
      "output in a converter output": ["--input", pth, "--output", orbax_small / "o"],
      "output in a step directory": ["--input", pth, "--output", orbax_small / "0" / "o"],
  }[case]
  if case == ".pth output in another checkpoint":
    shutil.copytree(orbax_small, tmp / "copy")
  no_slow_work(monkeypatch)
  monkeypatch.chdir(tmp)  # an empty --output names the current directory
  before = sorted(os.walk(tmp))
  code, out, err = convert_cli(capsys, *args)
  assert (code, out) == (2, "")
  assert err.startswith("error: " + expected.format(tmp=tmp, orbax=orbax_small)), err
  assert err.count("\n") == 1, err
  assert sorted(os.walk(tmp)) == before and pth.read_bytes() == b"weights"  # nothing written


def test_a_conversion_may_write_into_a_workdirs_top_level(tmp_path, orbax_small):
  """The checkpoint's own directories are refused as an Orbax --output (above), not a train.py
  workdir's top level, nor a folder beside a checkpoint; but a numbered one at the top level,
  which the run would take for a step."""
  workdir = shutil.copytree(orbax_small, tmp_path / "run")
  (workdir / "metrics.jsonl").write_text("")
  for output in (workdir / "converted", tmp_path / "converted", tmp_path / "7"):
    convert.check_paths(
        convert._parser().parse_args(["--input", __file__, "--output", str(output)])
    )
  # numbered: the run would take it for a step (a link too); its step 0 is one already
  (workdir / "8").symlink_to(tmp_path / "converted")
  steps = (workdir / "7", "would be taken for"), (workdir / "8", "would be taken for")
  for output, what in (*steps, (workdir / "0", "is")):
    with pytest.raises(convert.ConversionError) as error:
      convert.check_paths(
          convert._parser().parse_args(["--input", __file__, "--output", str(output)])
      )
    assert str(error.value) == (
        f"--output {output} {what} step {output.name} of the checkpoint {workdir} (its steps "
        "are its numbered directories): give the output a name that is not a number"
    )


def test_an_output_through_a_link_into_a_checkpoint_is_refused(tmp_path, orbax_small):
  """A link to a checkpoint's directory does not hide it: the output's real path is inside."""
  (tmp_path / "step").symlink_to(orbax_small / "0")
  (tmp_path / "ckpt").symlink_to(orbax_small)
  for output, args in (
      (tmp_path / "step" / "o", []),
      (tmp_path / "ckpt" / "o", []),
      (tmp_path / "step" / "b.pth", ["--to-torch"]),
  ):
    src = str(tmp_path / "copy") if args else __file__
    if args and not os.path.exists(src):
      shutil.copytree(orbax_small, src)
    with pytest.raises(convert.ConversionError) as error:
      convert.check_paths(
          convert._parser().parse_args(["--input", src, "--output", str(output), *args])
      )
    assert str(error.value).startswith(
        f"--output {output} is inside the checkpoint {orbax_small}: write it outside"
    ), output


def test_to_torch_writes_into_a_workdirs_top_level(tmp_path, orbax_small, capsys):
  """A train.py workdir's top level (its metrics, logs) takes the .pth; only the checkpoint's own
  directories are refused."""
  workdir = shutil.copytree(orbax_small, tmp_path / "run")
  (workdir / "metrics.jsonl").write_text("")
  code, out, err = convert_cli(
      capsys, "--input", workdir, "--output", workdir / "run.pth", "--to-torch"
  )
  assert (code, err) == (0, "") and out.endswith(f"to {workdir / 'run.pth'}\n")


def test_to_torch_writes_safetensors_for_a_safetensors_name(
    tmp_path, small_state, orbax_small, capsys
):
  """--to-torch --output X.safetensors writes safetensors (no pickle under its name): the
  converter and safetensors read it back bit for bit, and it loads strict=True. Its mode is a
  .pth's (the umask's; safetensors' save_file makes it the owner's only)."""
  out, pth = tmp_path / "back.safetensors", tmp_path / "back.pth"
  code, stdout, err = convert_cli(capsys, "--input", orbax_small, "--output", out, "--to-torch")
  assert (code, err) == (0, "") and stdout.endswith(f"to {out}\n")
  assert convert_cli(capsys, "--input", orbax_small, "--output", pth, "--to-torch")[0] == 0
  assert os.stat(out).st_mode == os.stat(pth).st_mode
  restored = load_file(out)
  assert set(restored) == set(small_state)
  for k, v in small_state.items():
    assert torch.equal(restored[k], v), k
  torch_reference.create_torch_model("fec_small").load_state_dict(restored, strict=True)
  code, _, err = convert_cli(capsys, "--input", out, "--output", tmp_path / "again")
  assert (code, err) == (0, ""), err


def test_overwrite_replaces_outputs(tmp_path, small_state, orbax_small, capsys):
  """--overwrite replaces a .pth file and a converter output; a wrong --model for --to-torch
  is refused first."""
  orbax_small = shutil.copytree(orbax_small, tmp_path / "orbax" / "fec_small")
  code, _, err = convert_cli(
      capsys,
      "--model",
      "fec_base",
      "--input",
      orbax_small,
      "--output",
      tmp_path / "x.pth",
      "--to-torch",
  )
  assert code == 2 and err == (
      f"error: {orbax_small} holds fec_small, not fec_base: pass --model "
      "fec_small or leave out --model\n"
  )
  old = tmp_path / "old.pth"
  old.write_bytes(b"old")
  assert (
      convert_cli(capsys, "--input", orbax_small, "--output", old, "--to-torch", "--overwrite")[0]
      == 0
  )
  assert set(torch.load(old, weights_only=True)) == set(small_state)

  changed = {k: v + 1 for k, v in small_state.items()}
  src = tmp_path / "changed.pth"
  torch.save(changed, src)
  code, out, err = convert_cli(capsys, "--input", src, "--output", orbax_small, "--overwrite")
  assert (code, err) == (0, ""), err
  assert out.startswith("wrote fec_small (5,727,528 parameters, num_classes=1000) to ")
  assert os.listdir(orbax_small.parent) == ["fec_small"]  # the staging directory is gone
  _, variables = fec_jax.load_pretrained(orbax_small)
  np.testing.assert_array_equal(variables["params"]["head"]["bias"], changed["head.bias"].numpy())


def test_to_torch_makes_missing_folders_and_a_failed_write_leaves_the_old_file(
    tmp_path, small_state, orbax_small, capsys, monkeypatch
):
  """--to-torch makes the output's missing folders, as the Orbax output does; a write that fails
  (a full disk) leaves the file --overwrite would replace, and no half-written file beside it."""
  out = tmp_path / "new" / "sub" / "back.pth"
  code, stdout, err = convert_cli(capsys, "--input", orbax_small, "--output", out, "--to-torch")
  assert (code, err) == (0, "") and stdout.endswith(f"to {out}\n")
  assert set(torch.load(out, weights_only=True)) == set(small_state)
  before = out.read_bytes()

  def full_disk(obj, f):
    f.write(b"half a checkpoint")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(torch, "save", full_disk)
  for name in ("back.pth", "more.pth"):  # replacing, and a new name
    with pytest.raises(OSError, match="No space left on device"):
      convert.main(
          [
              "--input",
              str(orbax_small),
              "--output",
              str(out.parent / name),
              "--to-torch",
              "--overwrite",
          ]
      )
  assert os.listdir(out.parent) == ["back.pth"] and out.read_bytes() == before


def test_a_failed_write_removes_the_folders_it_made(
    tmp_path, small_state, orbax_small, monkeypatch
):
  """The missing parents of --output made for a write that then fails are removed again, in
  either direction: a failed conversion leaves no output, nor empty folders for one."""
  src = tmp_path / "w.pth"
  torch.save(small_state, src)

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(torch, "save", full_disk)
  monkeypatch.setattr(convert, "save_params", full_disk)
  (tmp_path / "out").mkdir()
  missing = tmp_path / "out" / "new" / "sub"
  for args in (
      ["--input", str(orbax_small), "--output", str(missing / "back.pth"), "--to-torch"],
      ["--input", str(src), "--output", str(missing / "fec_small")],
  ):
    with pytest.raises(OSError, match="No space left on device"):
      convert.main(args)
    assert os.listdir(tmp_path / "out") == []


def test_overwrite_gives_a_fresh_outputs_mode_and_a_failed_save_leaves_nothing(
    tmp_path, small_state, orbax_small, capsys, monkeypatch
):
  """The replaced output has the mode a fresh one gets (the umask's, not mkdtemp's 0700); a save
  that fails leaves the old checkpoint, or no output, and no staging directory."""
  src = tmp_path / "w.pth"
  torch.save(small_state, src)
  replaced = shutil.copytree(orbax_small, tmp_path / "out" / "fec_small")
  umask = os.umask(0o027)
  try:
    assert convert_cli(capsys, "--input", src, "--output", tmp_path / "fresh")[0] == 0
    assert convert_cli(capsys, "--input", src, "--output", replaced, "--overwrite")[0] == 0
  finally:
    os.umask(umask)
  mode = lambda path: os.stat(path).st_mode & 0o777
  assert mode(tmp_path / "fresh") == mode(replaced) == 0o750

  def full_disk(directory, *args, **kwargs):
    with open(os.path.join(directory, "partial"), "wb") as f:
      f.write(b"half a checkpoint")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(convert, "save_params", full_disk)
  with pytest.raises(OSError, match="No space left on device"):
    convert.main(["--input", str(src), "--output", str(replaced), "--overwrite"])
  assert os.listdir(replaced.parent) == ["fec_small"]  # no .converting-* left behind
  assert sorted(os.listdir(replaced)) == ["0"]
  assert fec_jax.checkpoint.load_model(replaced)[0].num_classes == 1000
  with pytest.raises(OSError, match="No space left on device"):
    convert.main(["--input", str(src), "--output", str(replaced.parent / "new")])
  assert os.listdir(replaced.parent) == ["fec_small"]  # no half-written "new"


def test_a_torch_file_given_as_a_checkpoint_is_pointed_to_the_converter(tmp_path):
  (tmp_path / "w.pth").write_bytes(b"weights")
  for load in (checkpoint.load_model, fec_jax.load_pretrained):
    with pytest.raises(checkpoint.CheckpointError) as e:
      load(str(tmp_path / "w.pth"))
    assert str(e.value).endswith(f"(convert_torch_weights.py --input {tmp_path}/w.pth makes one)")


def test_variant_inference(small_state):
  state = {k: v.numpy() for k, v in small_state.items()}
  assert convert.infer_model_name(state) == "fec_small"
  dense = torch_reference.create_torch_model("fec_base_seg").state_dict()
  with pytest.raises(convert.ConversionError, match="fec_base_det, fec_base_seg"):
    convert.infer_model_name({k: v.numpy() for k, v in dense.items()})


def test_num_classes_is_taken_from_the_head(small_state):
  head = torch_reference.create_torch_model("fec_small", num_classes=10).state_dict()
  params, overrides = convert.torch_to_flax({k: v.numpy() for k, v in head.items()}, "fec_small")
  assert overrides == {"num_classes": 10}
  assert params["head"]["kernel"].shape == (320, 10)
  assert jax.tree.structure(params) == jax.tree.structure(
      param_shapes(fec_jax.create_model("fec_small", num_classes=10))
  )


# --- Semantic FPN (mmseg checkpoints) ---------------------------------------------------------


@pytest.fixture(scope="module")
def fpn_model():
  return torch_reference_fpn.perturbed_segmenter("fpn_fec_small")


def mmseg_checkpoint(path, model):
  torch.save(
      {
          "meta": {"mmseg_version": "0.24.0", "iter": 80_000},
          "state_dict": model.state_dict(),
          "optimizer": {},
      },
      path,
  )


def test_fpn_roundtrip_is_bit_exact_and_load_pretrained_restores_batch_stats(tmp_path, fpn_model):
  """mmseg checkpoint -> Orbax (model inferred) -> mmseg state dict: the same keys, every tensor
  bit for bit (num_batches_tracked comes back as 0); load_pretrained gives params and batch_stats
  whose logits, in eval and in train mode (running statistics included), are the reference's."""
  src = tmp_path / "fpn_fec_small_ade20k_80k.pth"
  mmseg_checkpoint(src, fpn_model)
  assert convert.main(["--input", str(src), "--output", str(tmp_path / "orbax")]) == 0
  assert (
      convert.main(
          [
              "--model",
              "fpn_fec_small",
              "--input",
              str(tmp_path / "orbax"),
              "--output",
              str(tmp_path / "back.pth"),
              "--to-torch",
          ]
      )
      == 0
  )
  restored = torch.load(tmp_path / "back.pth", weights_only=True)
  original = fpn_model.state_dict()
  assert set(restored) == set(original)
  for k, v in original.items():
    if k.endswith("num_batches_tracked"):
      assert restored[k].dtype == torch.int64 and restored[k].shape == () and restored[k] == 0, k
    else:
      assert torch.equal(restored[k], v), k
  torch_reference_fpn.create_torch_segmenter("fpn_fec_small").load_state_dict(restored, strict=True)

  model, variables = fec_jax.load_pretrained(tmp_path / "orbax", dropout_rate=0.0)
  assert fec_jax.model.model_name(model) == "fpn_fec_small"
  assert set(variables) == {"params", "batch_stats"}
  x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = fpn_model(x).numpy().transpose(0, 2, 3, 1)
    reference = torch_reference_fpn.create_torch_segmenter("fpn_fec_small")
    reference.load_state_dict(original)
    reference.train().decode_head.dropout.p = 0.0
    expected_train = reference(x).numpy().transpose(0, 2, 3, 1)

  def both(v, images):
    return model.apply(v, images), model.apply(v, images, train=True, mutable=["batch_stats"])

  images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  got, (got_train, updated) = (
      jax.jit(both).lower(variables, images).compile(FAST_COMPILE)(variables, images)
  )
  for e, g in ((expected, got), (expected_train, got_train)):
    assert np.abs(np.asarray(g) - e).max() <= 1e-4 * np.abs(e).max()
  state = convert.variables_to_torch({"params": {}, **updated})
  for key, value in state.items():
    if not key.endswith("num_batches_tracked"):
      e = reference.state_dict()[key].numpy()
      np.testing.assert_allclose(value, e, rtol=0, atol=1e-5 * np.abs(e).max(), err_msg=key)


def test_fpn_strict_errors_list_every_bad_key(fpn_model):
  state = {k: v.numpy() for k, v in fpn_model.state_dict().items()}
  del state["decode_head.scale_heads.3.2.bn.running_var"]
  state["neck.lateral_convs.0.conv.weight"] = np.zeros((256, 3, 1, 1), np.float32)
  state["decode_head.conv_seg.foo"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_variables(state, "fpn_fec_small")
  message = str(e.value)
  assert "does not match fpn_fec_small (3 problems)" in message
  assert "missing     decode_head.scale_heads.3.2.bn.running_var  expected shape [128]" in message
  assert (
      "mis-shaped  neck.lateral_convs.0.conv.weight  expected shape [256, 32, 1, 1], "
      "found [256, 3, 1, 1]"
  ) in message
  assert "unexpected  decode_head.conv_seg.foo  found shape [3]" in message
  with pytest.raises(convert.ConversionError, match="use torch_to_variables"):
    convert.torch_to_flax(state, "fpn_fec_small")


def test_mmseg_checkpoint_whole_or_backbone(tmp_path, fpn_model):
  """A Semantic FPN checkpoint is kept whole for fpn_* or when no model is given (the round trip
  above infers fpn_fec_small from it); for a backbone variant only backbone.* is kept. The class
  count is read from conv_seg."""
  path = tmp_path / "seg.pth"
  mmseg_checkpoint(path, fpn_model)
  whole, _, _ = convert.read_state_dict(str(path))
  assert set(whole) == set(fpn_model.state_dict())
  backbone, _, notes = convert.read_state_dict(str(path), model="fec_small_seg")
  assert set(backbone) == {k.removeprefix("backbone.") for k in whole if k.startswith("backbone.")}
  assert any("dropped" in n for n in notes)
  with pytest.raises(convert.ConversionError) as error:
    convert.read_state_dict(str(path), model="fec_small")  # the classifier of its backbone
  assert str(error.value) == (
      f"{path}: the checkpoint is a Semantic FPN segmenter (backbone.*, neck.*, decode_head.*), and "
      "--model fec_small is a classifier: leave out --model to convert the segmenter, or pass "
      "--model fec_small_seg for its backbone alone"
  )
  params, _ = convert.torch_to_flax(backbone, "fec_small_seg")
  assert jax.tree.structure(params) == jax.tree.structure(
      param_shapes(fec_jax.create_model("fec_small_seg"))
  )
  nineteen = torch_reference_fpn.create_torch_segmenter("fpn_fec_small", 19).state_dict()
  variables, overrides = convert.torch_to_variables(
      {k: v.numpy() for k, v in nineteen.items()}, "fpn_fec_small"
  )
  assert overrides == {"num_classes": 19}
  assert variables["params"]["decode_head"]["conv_seg"]["kernel"].shape == (128, 19)
