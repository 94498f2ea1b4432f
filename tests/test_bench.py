"""bench.py runs end to end and prints one JSON line per measurement (numbers are not judged here);
bad arguments stop it with one `error:` line and exit code 2 before any compile."""

import json
import sys

import pytest

import bench
from fec_jax import throughput


def test_bench_prints_one_json_line_per_measurement(capsys):
  bench.main(
      [
          "--models",
          "fec_small",
          "--batch",
          "2",
          "--warmup",
          "1",
          "--iters",
          "1",
          "--dtypes",
          "float32",
          "--modes",
          "infer",
          "--torch",
          "off",
      ]
  )
  out = capsys.readouterr().out.splitlines()
  records = [json.loads(line) for line in out if line.startswith("{")]
  assert len(records) == 1
  record = records[0]
  assert record["model"] == "fec_small" and record["mode"] == "infer" and record["batch"] == 2
  assert record["img_per_s"] > 0 and record["ms_per_iter"] > 0
  assert record["aggregation"] == "auto"
  assert record["compile_s"] > 0 and record["trace_lower_s"] > 0 and record["stablehlo_lines"] > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "fec_tiny"], "unknown model(s) ['fec_tiny']"),
        (["--models", "fec_small_seg"], "unknown model(s) ['fec_small_seg']"),
        (["--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--iters", "-1"], "--iters must be a positive integer"),
        (["--tpu", "v5e:2x2"], '--tpu needs libtpu: pip install -e ".[tpu]"'),
    ],
)
def test_bad_arguments_give_one_error_line(argv, message, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as in CI: the [tpu] extra not installed
  with pytest.raises(SystemExit) as exit_info:
    bench.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_batch_must_split_evenly_over_the_devices(capsys, monkeypatch):
  """--batch 3 on 2 devices: one error line before any model is built (not an IndivisibleError
  after the state's init); with --tpu, --batch is per chip and any size splits."""

  def slow(*args, **kwargs):
    raise AssertionError("a model was built before --batch was checked")

  monkeypatch.setattr(bench.jax, "device_count", lambda: 2)
  monkeypatch.setattr(bench, "run_jax", slow)
  argv = ["--models", "fec_small", "--modes", "infer", "--dtypes", "float32", "--torch", "off"]
  with pytest.raises(SystemExit) as exit_info:
    bench.main([*argv, "--batch", "3"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
      "error: --batch 3 must be a multiple of the 2 devices (each step's images are split evenly "
      "over them)\n"
  )
  assert bench.parse_args([*argv, "--batch", "4"]).batch == 4
  assert bench.parse_args([*argv, "--batch", "3", "--tpu", "v5e:2x2"]).batch == 3


def test_fusion_bytes_pads_to_the_tpu_tile():
  big = "f32[4096,24]{1,0:T(8,128)}"  # 24 lanes padded to 128 on a TPU
  hlo = f"""HloModule m

%fused_computation.1 (p: f32[4096,24]) -> f32[4096,24] {{
  %p = {big} parameter(0)
  ROOT %inner = {big} fusion(%p), kind=kLoop, calls=%nested
}}

ENTRY %main (a: f32[4096,24], b: bf16[10]) -> ({big}, bf16[10]) {{
  %a = {big} parameter(0)
  %b = bf16[10]{{0}} parameter(1)
  %small = bf16[10]{{0}} fusion(%b), kind=kLoop, calls=%fused_computation.2
  %big = {big} fusion(%a), kind=kLoop, calls=%fused_computation.1, metadata={{op_name="x"}}
  ROOT %out = ({big}, bf16[10]{{0}}) tuple(%big, %small)
}}
"""
  fusions = throughput.fusion_bytes(hlo)
  assert [f["name"] for f in fusions] == ["big", "small"]  # the nested %inner is not counted
  assert fusions[0]["bytes"] == 2 * 4096 * 128 * 4  # operand + output
  assert fusions[0]["unpadded_bytes"] == 2 * 4096 * 24 * 4
  assert fusions[1]["bytes"] == 2 * 10 * 2


@pytest.mark.parametrize(
    "fixed,per_image,expected",
    [
        (2e9, 3e8, 48),  # 2 x 32 does not fit: the prediction is checked upwards
        (1e8, 5e7, 336),  # both fit: the line predicts the batch exactly
        (1.5e10, 1e8, 16),  # 32 does not fit: the search starts lower
    ],
)
def test_largest_tpu_batch_on_a_linear_memory_model(monkeypatch, fixed, per_image, expected):
  """The search over per-chip batches, with compiles replaced by memory = fixed + per_image * b."""
  hbm = throughput.TPU_HBM_BYTES["TPU v5 lite"]
  compiled = []

  def fake_fits(name, batch, dtype, aggregation, devices):
    compiled.append(batch)
    total = fixed + per_image * batch
    return total <= hbm, int(total)

  monkeypatch.setattr(bench, "tpu_fits", fake_fits)
  device = type("Device", (), {"device_kind": "TPU v5 lite"})()
  assert bench.largest_tpu_batch("fec_small", "bfloat16", "auto", [device]) == expected
  assert len(compiled) <= 6
