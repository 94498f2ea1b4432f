"""convert_torch_weights.py: checkpoint formats, strictness, clear errors, exact round trips."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fec_jax
import torch_reference
from fec_jax import convert

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
  return subprocess.run([sys.executable, os.path.join(ROOT, "convert_torch_weights.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_cli_roundtrip_is_bit_exact_and_loads_strictly(tmp_path, small_state):
  """torch -> Orbax -> torch gives back every tensor bit for bit; the result loads strict=True."""
  src = tmp_path / "fec_small.pth.tar"
  torch.save({"state_dict": small_state, "epoch": 3, "arch": "fec_small"}, src)
  out = run_cli("--model", "fec_small", "--input", str(src), "--output", str(tmp_path / "orbax"))
  assert out.returncode == 0, out.stderr
  back = run_cli("--model", "fec_small", "--input", str(tmp_path / "orbax"),
                 "--output", str(tmp_path / "back.pth"), "--to-torch")
  assert back.returncode == 0, back.stderr
  restored = torch.load(tmp_path / "back.pth", weights_only=True)
  assert set(restored) == set(small_state)
  for k, v in small_state.items():
    assert torch.equal(restored[k], v), k
  torch_reference.create_torch_model("fec_small").load_state_dict(restored, strict=True)


def test_load_pretrained_gives_reference_logits(tmp_path, small_state):
  src = tmp_path / "plain.pth"
  torch.save(small_state, src)
  assert run_cli("--input", str(src), "--output", str(tmp_path / "out")).returncode == 0  # inferred
  model, variables = fec_jax.load_pretrained(tmp_path / "out")
  reference = torch_reference.create_torch_model("fec_small").eval()
  reference.load_state_dict(small_state)
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = reference(x).numpy()
  got = np.asarray(model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


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


def test_strict_errors_list_every_bad_key(tmp_path, small_state):
  state = dict(small_state)
  del state["network.0.1.norm1.weight"]
  state["network.9.foo"] = torch.zeros(3)
  state["head.bias"] = torch.zeros(7)
  path = tmp_path / "bad.pth"
  torch.save(state, path)
  out = run_cli("--model", "fec_small", "--input", str(path), "--output", str(tmp_path / "o"))
  assert out.returncode != 0
  assert "missing     network.0.1.norm1.weight  expected shape [32]" in out.stderr
  assert "unexpected  network.9.foo  found shape [3]" in out.stderr
  assert "mis-shaped  head.bias  expected shape [1000], found [7]" in out.stderr
  assert not os.path.exists(tmp_path / "o")


def test_truncated_file_and_other_architecture(tmp_path, small_state):
  full = tmp_path / "full.pth"
  torch.save(small_state, full)
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(full.read_bytes()[:100_000])
  out = run_cli("--input", str(truncated), "--output", str(tmp_path / "o1"))
  assert out.returncode != 0 and "truncated or corrupt" in out.stderr
  assert out.stderr.count("\n") <= 2, out.stderr  # one clear message, no traceback

  other = tmp_path / "resnet.pth"
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, other)
  out = run_cli("--input", str(other), "--output", str(tmp_path / "o2"))
  assert out.returncode != 0 and "not an FEC state dict" in out.stderr

  missing = run_cli("--input", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "o3"))
  assert missing.returncode != 0 and "does not exist" in missing.stderr


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
      convert.abstract_params("fec_small", num_classes=10))
