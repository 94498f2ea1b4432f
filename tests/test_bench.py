"""bench.py runs end to end and prints one JSON line per measurement (numbers are not judged here)."""

import json

import bench


def test_bench_prints_one_json_line_per_measurement(capsys):
  bench.main(["--models", "fec_small", "--batch", "2", "--warmup", "1", "--iters", "1",
              "--dtypes", "float32", "--modes", "infer", "--torch", "off"])
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert len(records) == 1
  record = records[0]
  assert record["model"] == "fec_small" and record["mode"] == "infer" and record["batch"] == 2
  assert record["img_per_s"] > 0 and record["ms_per_iter"] > 0
