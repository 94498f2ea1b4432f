"""bench.py runs end to end and prints one JSON line per measurement (numbers are not judged here);
bad arguments stop it with one `error:` line and exit code 2 before any compile; --help shows the
defaults; a line on stderr announces each timed configuration. The loader benchmarks
(fec_jax.data.bench, fec_jax.data.seg_bench) report bad arguments and folders alike, before
writing or timing anything."""

import json
import os
import sys
import tempfile

import pytest

import bench
from fec_jax import throughput
from fec_jax.data import bench as data_bench
from fec_jax.data import seg_bench, seg_sources


def _not_run(*args, **kwargs):
  raise AssertionError("the benchmark ran before its arguments were checked")


def _one_error_line(capsys, main, argv) -> str:
  """The `error:` line of main(argv), which must exit with status 2 and print nothing else."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), captured.err
  assert captured.out == ""
  return err[0]


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
        (["--models", "fec_tiny"], "1 unknown model: ['fec_tiny']; bench.py times fec_base,"),
        (
            ["--models", "fec_smal", "fec_lrge"],
            "2 unknown models: ['fec_smal', 'fec_lrge']; bench.py times fec_base, fec_large, "
            "fec_small; did you mean fec_small, fec_large?",
        ),
        (["--models", "fec_small_seg"], "not classifiers: ['fec_small_seg']; bench.py times"),
        (["--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--iters", "-1"], "--iters must be a positive integer"),
        (["--tpu", "v5e:2x2"], '--tpu needs libtpu: pip install -e ".[tpu]"'),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--tpu", ""], "--tpu is empty; expected a TPU topology such as v5e:2x2"),
        # an abbreviation of --models is not taken for it
        (
            ["--model", "fec_small"],
            "unrecognized option --model; did you mean --models? (see bench.py --help)",
        ),
        (
            ["--modes", "infr"],
            "argument --modes: invalid choice: 'infr' (choose from 'infer', 'train'); did you mean "
            "infer? (see bench.py --help)",
        ),
        (["--batch", "two"], "argument --batch: invalid int value: 'two'"),
        (["--torch", "eager"], "--torch eager times the PyTorch reference, but torch is not"),
    ],
)
def test_bad_arguments_give_one_error_line(argv, message, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as in CI: the [tpu] extra not installed
  monkeypatch.setitem(sys.modules, "torch", None)  # an install without the [torch] extra
  monkeypatch.setattr(bench, "run_jax", _not_run)
  monkeypatch.setattr(bench, "tpu_compile", _not_run)
  assert message in _one_error_line(capsys, bench.main, argv)


def test_help_shows_the_defaults(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--help"])
  assert exit_info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())  # the same at any terminal width
  assert text.startswith("usage: bench.py ")
  for default in [
      "--models MODEL [MODEL ...] classification variants to time, of: fec_base, fec_large, "
      "fec_small (default: fec_small fec_base fec_large)",
      "(default: 256)",
      "compute dtypes (default: float32 bfloat16)",
      "training step (default: infer train)",
      "before the timing (default: 20)",
      "whose mean is reported (default: 100)",
      "fp32 torch.compile); eager: the same without torch.compile (minutes less on a CPU) "
      "(default: auto)",
  ]:
    assert default in text


def test_a_progress_line_on_stderr_before_each_timing(capsys, monkeypatch):
  """JAX and the PyTorch reference: each configuration is announced on stderr (flushed) before it
  runs; stdout keeps the JSON lines only. The timings themselves are replaced by fakes."""
  pytest.importorskip("torch")
  announced, out = [], []

  def read():
    captured = capsys.readouterr()
    announced.append(captured.err)
    out.extend(captured.out.splitlines())

  def fake_run_jax(mode, name, batch, dtype, aggregation, warmup, iters):
    read()
    return 0.5, {}

  def fake_measure(step, carry, warmup, iters, sync=None):
    read()
    return 0.25

  monkeypatch.setattr(bench, "run_jax", fake_run_jax)
  monkeypatch.setattr(bench.throughput, "measure", fake_measure)
  common = ["--models", "fec_small", "--batch", "2", "--warmup", "1", "--iters", "3"]
  bench.main([*common, "--dtypes", "float32", "--modes", "infer", "--torch", "auto"])
  assert announced == [
      "timing fec_small float32 infer (jax, batch 2, 1 warm-up + 3 timed iterations) ...\n",
      "timing the PyTorch reference fec_small eager float32 infer (cpu, batch 2, 1 warm-up + 3 "
      "timed iterations) ...\n",
      "timing the PyTorch reference fec_small torch.compile float32 infer (cpu, batch 2, 1 "
      "warm-up + 3 timed iterations) ...\n",
  ]
  read()
  assert announced.pop() == ""  # nothing after the last timing
  assert [json.loads(line)["impl"] for line in out] == [
      "jax",
      "torch eager",
      "torch torch.compile",
  ]
  announced.clear()
  out.clear()
  bench.main([*common, "--dtypes", "float32", "--modes", "infer", "--torch", "eager"])
  read()
  assert [json.loads(line)["impl"] for line in out] == ["jax", "torch eager"]


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


# --- python -m fec_jax.data.bench and python -m fec_jax.data.seg_bench ------------------------


@pytest.fixture
def nothing_slow(monkeypatch):
  """The loader benchmarks with their folder writers and timings replaced: a test that reaches
  them fails (an argument was not checked first)."""
  for name in ("make_jpeg_folder", "time_transform", "time_loader"):
    monkeypatch.setattr(data_bench, name, _not_run)
  for name in ("make_ade20k_like", "time_examples"):
    monkeypatch.setattr(seg_bench, name, _not_run)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--images", "0"], "--images must be at least 1, got 0"),
        (["--images", "-5"], "--images must be at least 1, got -5"),
        (["--loader-workers", "-2"], "--loader-workers must be 0 (no loader timing) or more"),
        (["--batch-size", "0", "--loader-workers", "1"], "--batch-size must be at least 1, got 0"),
        (
            ["--images", "20", "--loader-workers", "1"],
            "--images 20: the grain loader needs at least one batch of them (--batch-size 32); "
            "give more images or a smaller --batch-size",
        ),
        (["--dir="], "--dir is empty"),
        (
            ["--image", "3"],
            "unrecognized option --image; did you mean --images? (see python -m fec_jax.data.bench",
        ),
    ],
)
def test_data_bench_bad_arguments(argv, message, capsys, nothing_slow):
  assert message in _one_error_line(capsys, data_bench.main, argv)


@pytest.mark.parametrize("main", [data_bench.main, seg_bench.main])
def test_loader_benchmarks_want_a_folder_for_dir(main, tmp_path, capsys, nothing_slow):
  file = tmp_path / "file"
  file.write_text("")
  for path in (file, file / "sub"):
    assert _one_error_line(capsys, main, ["--dir", str(path)]) == (
        f"error: --dir {path}: {file} is a file; expected a folder to create or reuse"
    )


@pytest.mark.parametrize("images, held", [(2, "2 images"), (1, "1 image")])
def test_data_bench_removes_its_temporary_folder(tmp_path, capsys, monkeypatch, images, held):
  """Without --dir the JPEGs go to a temporary folder, timed, then removed (43 MB at 200)."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  timed = []
  monkeypatch.setattr(
      data_bench,
      "time_transform",
      lambda files, cfg, train: timed.append(sum(map(os.path.isfile, files))) or (50, 0.5),
  )
  data_bench.main(["--images", str(images)])
  out = capsys.readouterr().out
  assert out.startswith(f"{held} per split in {tmp_path / 'fec_bench_'}"), out
  assert timed == [images, images]  # the files were there while timed
  assert os.listdir(tmp_path) == []


def test_data_bench_reuses_a_folder_as_it_is(tmp_path, capsys, monkeypatch):
  """A folder written earlier with 3 images per split, given --images 2: a note on stderr (that
  names --images where given), the 3 timed; the loader's batch is --batch-size, and a folder
  smaller than one batch is an error."""
  root = str(tmp_path / "jpegs")
  data_bench.make_jpeg_folder(root, 3)
  timed, loaded = [], []
  monkeypatch.setattr(data_bench, "make_jpeg_folder", _not_run)
  monkeypatch.setattr(
      data_bench, "time_transform", lambda files, cfg, train: timed.append(len(files)) or (50, 0.5)
  )
  monkeypatch.setattr(
      data_bench,
      "time_loader",
      lambda cfg, split, batch, n: loaded.append((cfg.num_classes, batch, n)) or 40.0,
  )
  data_bench.main(["--images", "2", "--dir", root, "--loader-workers", "1", "--batch-size", "2"])
  captured = capsys.readouterr()
  assert captured.err == (
      f"note: --dir {root} holds 3 train and 3 val images: timing those "
      "(--images 2 is for a new folder)\n"
  )
  assert captured.out.startswith(f"3 images per split in {root}")
  # The decoding share, not "JPEG decoding": a user's folder may hold PNGs, TIFFs, ...
  assert "train transform:    50.0 images/s/core (20.00 ms/image, 50% of it decoding)" in (
      captured.out
  )
  assert timed == [3, 3] and loaded == [(3, 2, 1)]  # 3 images: 3 class folders
  data_bench.main(["--dir", root])  # without --images: nothing said of it
  assert (
      capsys.readouterr().err
      == f"note: --dir {root} holds 3 train and 3 val images: timing those\n"
  )
  assert _one_error_line(capsys, data_bench.main, ["--dir", root, "--loader-workers", "1"]) == (
      f"error: --dir {root} holds 3 train images: the grain loader needs at least one batch of "
      "them (--batch-size 32); give more images or a smaller --batch-size"
  )
  os.makedirs(tmp_path / "other" / "train")  # no class folder
  assert _one_error_line(capsys, data_bench.main, ["--dir", str(tmp_path / "other")]) == (
      f"error: --dir {tmp_path / 'other'}: no images found under {tmp_path / 'other' / 'train'}; "
      "expected a class folder (train/<class>/*, val/<class>/*), or give a new or empty --dir"
  )
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("a folder of the user's")
  assert _one_error_line(capsys, data_bench.main, ["--dir", str(tmp_path / "mine")]) == (
      f"error: --dir {tmp_path / 'mine'} holds 'notes.txt' but no train/ folder; expected a "
      "class folder (train/<class>/*, val/<class>/*) to time, or a new or empty folder to write "
      "JPEGs to"
  )
  assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # nothing written into it
  split = tmp_path / "train"  # a split's class folders given as --dir
  for name in ("cat", "dog", "eel", "fox", "gnu"):
    (split / name).mkdir(parents=True)
  assert _one_error_line(capsys, data_bench.main, ["--dir", str(split)]).startswith(
      f"error: --dir {split} holds 'cat', 'dog', 'eel' and 2 more but no train/ folder; "
  )
  dataset = tmp_path / "pets"  # a split, or a class folder, of a dataset: the dataset to give
  for name in ("train/cat", "train/dog", "val/cat", "val/dog"):
    (dataset / name).mkdir(parents=True)
  (dataset / "val" / "cat" / "1.jpg").write_bytes(b"a photo")
  for given, what in (
      (dataset / "val", "the val split"),
      (dataset / "val" / "cat", "a class folder of the val split"),
      (dataset / "train" / "cat", "a class folder of the train split"),  # empty: JPEGs went there
      (dataset / "train" / "eel", "a class folder of the train split"),  # new: a class of JPEGs
  ):
    assert _one_error_line(capsys, data_bench.main, ["--dir", str(given)]) == (
        f"error: --dir {given} is {what} of the class-folder dataset {dataset}; give --dir "
        f"{dataset}, the folder that holds train/ and val/"
    )
  assert sorted(map(str, dataset.rglob("*"))) == sorted(
      str(dataset / name)
      for name in ("train", "train/cat", "train/dog", "val", "val/cat", "val/cat/1.jpg", "val/dog")
  )  # nothing written into the dataset


def test_data_bench_times_and_counts_the_images_of_a_folder_only(tmp_path, capsys, monkeypatch):
  """A class folder that also holds other files (notes, annotations) is timed and counted by its
  images, as the loader lists them: every file was, a text file counted as an image and
  reported as an unreadable one."""
  root = tmp_path / "jpegs"
  data_bench.make_jpeg_folder(str(root), 3)
  (root / "train" / "n00000000" / "notes.txt").write_text("not an image")
  timed = []
  monkeypatch.setattr(
      data_bench, "time_transform", lambda files, cfg, train: timed.append(files) or (50, 0.5)
  )
  data_bench.main(["--images", "3", "--dir", str(root)])
  captured = capsys.readouterr()
  assert captured.err == "" and captured.out.startswith(f"3 images per split in {root}")
  assert [len(files) for files in timed] == [3, 3]
  assert all(f.endswith(".JPEG") for files in timed for f in files)


def test_data_bench_skips_an_unreadable_image(tmp_path, capsys):
  root = tmp_path / "jpegs"
  data_bench.make_jpeg_folder(str(root), 2)
  bad = root / "train" / "n00000000" / "img_0.JPEG"
  bad.write_bytes(bad.read_bytes()[:300])  # truncated
  cfg = data_bench.config_lib.default_config()
  files = data_bench._files(str(root / "train"))
  rate, _ = data_bench.time_transform(files, cfg, train=True, repeats=1)
  assert rate > 0
  assert capsys.readouterr().err == f"note: 1 unreadable image skipped, e.g. {bad}\n"


def test_data_bench_a_folder_without_a_readable_image_is_an_error_line(tmp_path, capsys):
  """It ended in a ZeroDivisionError (1e3 / a rate of 0 images/s)."""
  root = tmp_path / "jpegs"
  data_bench.make_jpeg_folder(str(root), 2)
  for image in (root / "train").rglob("*.JPEG"):
    image.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
  with pytest.raises(SystemExit) as exit_info:
    data_bench.main(["--images", "2", "--dir", str(root)])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.splitlines()[-2:] == [
      f"note: 2 unreadable images skipped, e.g. {root / 'train' / 'n00000000' / 'img_0.JPEG'}",
      f"error: --dir {root}: none of the 2 train images decodes; expected image files that decode",
  ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--images", "0"], "--images must be at least 1, got 0"),
        (["--images", "-3"], "--images must be at least 1, got -3"),
        (["--dir="], "--dir is empty"),
        (
            ["--imag", "2"],
            "unrecognized option --imag; did you mean --images? (see python -m "
            "fec_jax.data.seg_bench",
        ),
    ],
)
def test_seg_bench_bad_arguments(argv, message, capsys, nothing_slow):
  assert message in _one_error_line(capsys, seg_bench.main, argv)


def test_seg_bench_reuses_a_folder_as_it_is(tmp_path, capsys, monkeypatch):
  """A folder written earlier with 2 images, given --images 1: a note on stderr, the 2 timed and
  counted; a folder with an image but no annotations is an error."""
  root = str(tmp_path / "ade")
  seg_bench.make_ade20k_like(root, 2)
  monkeypatch.setattr(seg_bench, "make_ade20k_like", _not_run)
  monkeypatch.setattr(seg_bench, "time_examples", lambda root, train: 10.0)
  seg_bench.main(["--images", "1", "--dir", root])
  captured = capsys.readouterr()
  assert captured.err == (
      f"note: --dir {root} was written earlier and holds 2 images: timing those (--images 1 is "
      "for a new folder)\n"
  )
  assert captured.out.startswith(f"2 ADE20K-like images in {root}")
  os.remove(os.path.join(root, "annotations", "training", "ADE_train_00000002.png"))
  seg_sources.scan_ade20k.cache_clear()  # a new command would list the folder anew
  assert _one_error_line(capsys, seg_bench.main, ["--dir", root]).startswith(
      f"error: --dir {root}: 1 image without annotation, first: "
  )
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("a folder of the user's")
  assert _one_error_line(capsys, seg_bench.main, ["--dir", str(tmp_path / "mine")]) == (
      f"error: --dir {tmp_path / 'mine'} holds files but no images/ or annotations/ folder; "
      "expected an ADE20K-like folder (images/training/*.jpg, annotations/training/*.png) to "
      "time, or a new or empty folder to write one to"
  )
  assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # nothing written into it


def test_seg_bench_rewrites_its_own_incomplete_folder(tmp_path, capsys, monkeypatch):
  """The default folder (named by --images, in the temporary directory) that an interrupted run
  left with fewer images is written again (and timed whole), then reused as it is."""
  monkeypatch.setattr(seg_bench.tempfile, "gettempdir", lambda: str(tmp_path))
  root = str(tmp_path / "fec_jax_seg_bench_2")
  make = seg_bench.make_ade20k_like
  make(root, 1)
  written, timed = [], []
  monkeypatch.setattr(seg_bench, "make_ade20k_like", lambda *a: written.append(a) or make(*a))
  monkeypatch.setattr(  # as the real one, times the examples of a fresh ADE20KSource
      seg_bench,
      "time_examples",
      lambda root, train: timed.append(len(seg_sources.ADE20KSource(root, "training"))) or 10.0,
  )
  for _ in range(2):
    seg_sources.scan_ade20k.cache_clear()
    seg_bench.main(["--images", "2"])
  captured = capsys.readouterr()
  assert written == [(root, 2)] and timed == [2, 2, 2, 2]
  assert captured.err == f"writing 2 ADE20K-like images to {root} ...\n"
  assert captured.out.count(f"2 ADE20K-like images in {root}") == 2
