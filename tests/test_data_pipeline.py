"""Sources, loader determinism/resume/sharding, bad input, eval transform, mixup properties."""

import collections
import functools
import io
import json
import logging
import multiprocessing
from multiprocessing import shared_memory
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import psutil
import pytest
from grain.multiprocessing import SharedMemoryArray
from PIL import Image

import fec_jax.data as fd
from fec_jax.data import classes, device_transforms, mixup, sources, transforms
from imagenet_fixture import WNIDS, make_imagenet_folder


def _cfg(root, **kw):
  cfg = fd.default_config()
  cfg.root, cfg.num_classes, cfg.image_size, cfg.num_workers = str(root), 3, 32, 0
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_imagenet_folder(
      tmp_path_factory.mktemp("imagenet"), num_classes=3, per_class=6, val_per_class=3
  )


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_folder_source_layout(folder):
  src = sources.FolderSource(folder, "val", 3)
  assert src.classes == WNIDS[:3] and len(src) == 9
  assert [src[i]["label"] for i in range(len(src))] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert fd.num_examples(_cfg(folder), "train") == 18
  assert fd.steps_per_epoch(_cfg(folder), 4) == 4
  with pytest.raises(ValueError, match="num_classes"):
    sources.FolderSource(folder, "val", 5)


def test_train_batches_deterministic_and_per_epoch_shuffled(folder):
  cfg = _cfg(folder)
  a = list(fd.create_loader(cfg, "train", 4, seed=3, num_epochs=2))
  b = list(fd.create_loader(cfg, "train", 4, seed=3, num_epochs=2))
  c = list(fd.create_loader(cfg, "train", 4, seed=4, num_epochs=2))
  assert len(a) == 8 and a[0]["image"].shape == (4, 32, 32, 3)
  assert a[0]["image"].dtype == np.uint8 and a[0]["label"].dtype == np.int32
  assert set(a[0]) == {"image", "label", "erase"}
  assert a[0]["erase"].shape == (4, 4) and a[0]["erase"].dtype == np.int32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  with pytest.raises(ValueError, match="num_epochs must be None"):
    fd.create_loader(cfg, "train", 4, seed=3, num_epochs=0)
  epoch0 = np.concatenate([x["label"] for x in a[:4]])
  epoch1 = np.concatenate([x["label"] for x in a[4:]])
  assert sorted(np.bincount(epoch0, minlength=3)) == sorted(
      np.bincount(epoch1, minlength=3)
  ) or not np.array_equal(epoch0, epoch1)


def test_resume_from_state_continues_exactly(folder, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  cfg = _cfg(folder)
  ref = _take(fd.create_loader(cfg, "train", 4, seed=0), 7)
  it = fd.create_loader(cfg, "train", 4, seed=0)
  _take(it, 5)  # into the second epoch
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    fresh = fd.create_loader(cfg, "train", 4, seed=0)
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for want, got in zip(ref[5:], _take(fresh, 2)):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_a_state_of_an_earlier_fec_jax_resumes_at_its_step(folder):
  """Before batches were made ahead of the workers, the state held grain's per-worker state
  ('parent') and the number of workers; its step is what a restore now reads."""
  cfg = _cfg(folder)
  ref = _take(fd.create_loader(cfg, "train", 4, seed=0), 7)
  old = {"parent": {"workers_state": {}}, "step": 5, "bad": 0, "converted": 0, "workers": 2}
  fresh = fd.create_loader(cfg, "train", 4, seed=0)
  fresh.set_state({**old, "epoch_start": [0, 0]})
  for want, got in zip(ref[5:], _take(fresh, 2), strict=True):
    np.testing.assert_array_equal(got["image"], want["image"])
  assert fresh.get_state()["step"] == 7


def test_shards_are_disjoint_and_augmentation_independent_of_sharding(folder):
  cfg = _cfg(folder, rand_augment="", reprob=0.0)
  one = fd.create_loader(cfg, "train", 4, seed=1, num_epochs=1)
  whole = np.concatenate([b["image"] for b in one])
  parts = [
      np.concatenate(
          [
              b["image"]
              for b in fd.create_loader(
                  cfg, "train", 4, seed=1, shard_index=h, shard_count=2, num_epochs=1
              )
          ]
      )
      for h in range(2)
  ]
  # host h holds global positions h, h + 2, ...: same images, same augmentation
  np.testing.assert_array_equal(parts[0], whole[0::2])
  np.testing.assert_array_equal(parts[1], whole[1::2])


def test_val_in_order_padded_and_masked(folder):
  cfg = _cfg(folder)
  batches = list(fd.create_loader(cfg, "val", 4, seed=0))
  assert len(batches) == fd.num_eval_batches(cfg, 4) == 3
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.tolist() == [True] * 9 + [False] * 3
  assert labels[:9].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  two = [
      list(fd.create_loader(cfg, "val", 4, seed=0, shard_index=h, shard_count=2)) for h in range(2)
  ]
  assert all(len(t) == 3 for t in two)
  assert sum(int(b["mask"].sum()) for t in two for b in t) == 9


def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for x, y in zip(got, want):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_val_batches_do_not_depend_on_worker_processes(folder):
  """9 val images at batch 8 are 2 batches, the same ones, with 0 or 3 worker processes (more
  workers than batches)."""
  cfg = _cfg(folder)
  want = list(fd.create_loader(cfg, "val", 8, seed=0))
  cfg.num_workers = 3
  assert fd.num_eval_batches(cfg, 8) == 2
  it = fd.create_loader(cfg, "val", 8, seed=0)
  got = list(it)
  it.close()
  assert len(want) == 2 and int(sum(b["mask"].sum() for b in want)) == 9
  _assert_same_batches(got, want)


def test_train_batches_and_resume_do_not_depend_on_worker_processes(tmp_path):
  """Batches are made before the workers: 0 and 3 worker processes give the same batches (bad
  files replaced alike, the same counts), and a state saved with 0 workers resumes with 2."""
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=4, val_per_class=1)
  _write_bad_files(root)
  cfg = _cfg(root, num_classes=2)
  it = fd.create_loader(cfg, "train", 3, seed=0, num_epochs=2)
  want, counts = list(it), it.stats()
  assert len(want) == 2 * fd.steps_per_epoch(cfg, 3) == 10 and counts["bad"] > 0
  it = fd.create_loader(cfg, "train", 3, seed=0)
  _take(it, 3)
  state = it.get_state()
  for workers in (3, 2):
    cfg.num_workers = workers
    it = fd.create_loader(cfg, "train", 3, seed=0, num_epochs=2)
    if workers == 2:
      it.set_state(state)
    got = list(it)
    it.close()
    _assert_same_batches(got, want[3:] if workers == 2 else want)
    assert it.stats() == counts


def test_worker_processes_ignore_sigint_and_sigterm(folder):
  """Ctrl-C and SIGTERM reach the loader's workers too (the whole process group); the training
  loop then finishes its step and saves a checkpoint, so the loader must go on; close() ends
  the workers."""
  before = set(multiprocessing.active_children())
  it = fd.create_loader(_cfg(folder, num_workers=2), "train", 4, seed=0)
  _take(it, 2)  # one batch from each worker: both have started
  workers = [p for p in multiprocessing.active_children() if p not in before]
  assert len(workers) == 2
  for worker, sig in zip(workers, (signal.SIGINT, signal.SIGTERM)):
    os.kill(worker.pid, sig)
  batches = _take(it, 12)  # 3 epochs: past what the workers had buffered
  assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
  assert all(w.is_alive() for w in workers)
  it.close()
  assert not any(w.is_alive() for w in workers)


def test_a_pass_starts_no_more_workers_than_it_has_batches(folder):
  """With num_workers=3, a val pass of one batch (9 images at 9) is made in this process, one of
  two batches (at 8) in two workers: a worker takes seconds to start."""
  for batch, workers in ((9, 0), (8, 2)):
    before = set(multiprocessing.active_children())
    it = fd.create_loader(_cfg(folder, num_workers=3), "val", batch, seed=0)
    try:
      next(it)
      assert len([p for p in multiprocessing.active_children() if p not in before]) == workers
      assert len(list(it)) == -(-9 // batch) - 1  # the rest of the pass
    finally:
      it.close()


def test_a_signal_while_the_workers_start_kills_none(folder):
  """SIGTERM or Ctrl-C reach the whole process group, also while an evaluation starts its
  workers. A worker that died of it failed the evaluation, or hung it (multiprocessing blocks
  writing to a child that is gone). Each worker here gets a signal as soon as it runs Python;
  spawn's executable is the launcher while the loader is open, and restored after."""
  want = list(fd.create_loader(_cfg(folder), "val", 4, seed=0))
  signals, signaled, done = [signal.SIGTERM, signal.SIGINT], set(), threading.Event()

  def signal_new_workers():
    while signals and not done.is_set():
      for child in psutil.Process().children():
        try:
          command = child.cmdline()  # Python's, not the launcher's /bin/sh (its first millisecond)
          worker = "spawn_main" in " ".join(command) and "python" in os.path.basename(command[0])
        except psutil.Error:  # ended meanwhile
          continue
        if worker and child.pid not in signaled and signals:
          os.kill(child.pid, signals.pop())
          signaled.add(child.pid)
      time.sleep(0.001)

  python = multiprocessing.spawn.get_executable()
  watcher = threading.Thread(target=signal_new_workers, daemon=True)
  watcher.start()
  it = fd.create_loader(_cfg(folder, num_workers=2), "val", 4, seed=0)
  try:
    got = [next(it)]
    assert multiprocessing.spawn.get_executable() != python  # the launcher
    got += list(it)
  finally:
    done.set()
    it.close()
  assert not signals and len(signaled) == 2  # each worker got one
  _assert_same_batches(got, want)
  assert multiprocessing.spawn.get_executable() == python


def test_worker_processes_end_with_the_main_process(folder, tmp_path):
  """Workers that ignore SIGINT/SIGTERM must still end when the main process exits without
  closing the loader (a second Ctrl-C exits at once with os._exit)."""
  pids = tmp_path / "pids"
  script = f"""
import multiprocessing, os
import fec_jax.data as fd
cfg = fd.default_config()
cfg.root, cfg.num_classes, cfg.image_size, cfg.num_workers = {folder!r}, 3, 32, 1
it = fd.create_loader(cfg, "train", 4, seed=0)
next(it)
with open({str(pids)!r}, "w") as f:
  f.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
os._exit(1)
"""
  # output to a file, not a pipe: a worker that outlived the script would hold a pipe open
  with open(tmp_path / "log", "w") as log:
    done = subprocess.run([sys.executable, "-c", script], stdout=log, stderr=log, timeout=120)
  assert done.returncode == 1, (tmp_path / "log").read_text()
  workers = [psutil.Process(int(pid)) for pid in pids.read_text().split()]
  assert len(workers) == 1
  deadline = time.monotonic() + 20
  try:
    while any(map(_running, workers)) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not any(map(_running, workers))
  finally:
    for w in filter(_running, workers):
      w.kill()


def _run_script(script) -> subprocess.CompletedProcess:
  """`python script` with this checkout's fec_jax (a script's own folder comes first on its
  path, before the checkout's: PYTHONPATH names it)."""
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  run = [sys.executable, str(script)]
  return subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)


def test_a_script_that_reads_at_its_top_level_runs_once(folder, tmp_path):
  """spawn runs the main script again in each worker, so that what it defines unpickles there;
  grain sends its workers everything cloudpickled, which needs none of it. A script that read
  batches at its top level, without `if __name__ == "__main__":`, had each worker read in turn
  until starting workers of its own failed, and the val pass hung."""
  script = tmp_path / "unguarded.py"
  script.write_text(f"""
import os
import fec_jax.data as fd
print("top level", flush=True)
cfg = fd.default_config()
cfg.root, cfg.num_classes, cfg.image_size, cfg.num_workers = {str(folder)!r}, 3, 32, 2
it = fd.create_loader(cfg, "val", 4, seed=0)
print("val batches", len(list(it)), flush=True)
it.close()
""")
  done = _run_script(script)
  assert done.returncode == 0, done.stderr
  assert done.stdout == "top level\nval batches 3\n"


def test_another_process_spawned_while_a_loader_is_open_runs_the_main_script(folder, tmp_path):
  """Only grain's workers start without the main script: a process of the program's own that
  spawn starts while a loader with workers is open may need what the script defines (its target
  here), which failed to unpickle in it (AttributeError: Can't get attribute 'child')."""
  script = tmp_path / "guarded.py"
  script.write_text(f"""
import multiprocessing
import fec_jax.data as fd

def child(queue):
  queue.put("child ran")

if __name__ == "__main__":
  cfg = fd.default_config()
  cfg.root, cfg.num_classes, cfg.image_size, cfg.num_workers = {str(folder)!r}, 3, 32, 2
  it = iter(fd.create_loader(cfg, "val", 4, seed=0))
  next(it)  # its workers have started
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  process = ctx.Process(target=child, args=(queue,))
  process.start()
  process.join(30)
  print(process.exitcode, queue.get(timeout=5) if process.exitcode == 0 else "", flush=True)
  it.close()
""")
  done = _run_script(script)
  assert done.returncode == 0, done.stderr
  assert done.stdout == "0 child ran\n", done.stderr


def test_a_batch_from_workers_is_unlinked_from_shared_memory_when_it_arrives(folder):
  """Workers hand batches over in shared memory. Each array's memory is unlinked as it arrives
  (its name is gone, its values stay), not when grain frees it: the last batches of a pass were
  freed late and, now and then, not before the program's exit (a leaked shared_memory object)."""
  want = _take(fd.create_loader(_cfg(folder), "val", 4, seed=0), 3)
  it = fd.create_loader(_cfg(folder, num_workers=2), "val", 4, seed=0)
  got = _take(it, 3)
  shared = [a for b in got for a in b.values() if isinstance(a, SharedMemoryArray)]
  assert len(shared) == 9  # image, label and mask of 3 batches
  for a in shared:
    with pytest.raises(FileNotFoundError):
      shared_memory.SharedMemory(a.shm.name)
  it.close()
  _assert_same_batches(got, want)


def test_a_run_with_workers_ends_without_leaked_shared_memory_and_logs_as_absl(tmp_path):
  """No shared memory outlives a program that read batches from workers, whether a pass ran to
  its end or was closed early, and Python's resource_tracker does not warn at exit of "leaked
  shared_memory objects" (10 for one val pass on 2 workers at first, then 1 in about 20 runs
  under load). A worker's log line (a bad file) has absl's format, as the main process's (it
  was 'WARNING:fec_jax.data.pipeline:...')."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=2, val_per_class=3)
  (tmp_path / "data" / "val" / WNIDS[0] / "bad.JPEG").write_bytes(b"not a JPEG")
  script = f"""
import fec_jax.data as fd
cfg = fd.default_config()
cfg.root, cfg.num_classes, cfg.image_size, cfg.num_workers = {root!r}, 3, 32, 2
def main():
  for _ in range(2):
    it = fd.create_loader(cfg, "val", 2, seed=0)
    for batch in it:
      pass
    it.close()
  it = fd.create_loader(cfg, "val", 2, seed=0)
  next(it)  # the workers' other batches stay in grain's buffers
  it.close()
if __name__ == "__main__":
  main()
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "leaked" not in done.stderr, done.stderr
  bad = r"^W\d{4} [\d:.]+ +\d+ loader\.py:\d+\] bad file n01440764/bad\.JPEG masked out"
  assert re.search(bad, done.stderr, re.MULTILINE), done.stderr


def _running(process: psutil.Process) -> bool:
  """Not ended (a zombie counts as ended: whether an orphan is reaped is up to the init process)."""
  try:
    return process.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def _write_bad_files(root):
  """Adds bad and odd files to class 0 (n01440764) of train and val, and a broken link to val's."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    d = os.path.join(root, split, WNIDS[0])
    good = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(good).convert("CMYK").save(os.path.join(d, "cmyk.jpg"))
    Image.fromarray(good[..., 0]).save(os.path.join(d, "gray.JPEG"))
    Image.fromarray(good).convert("RGBA").save(os.path.join(d, "rgba.png"))
    Image.fromarray(good[..., 0].astype(np.uint16) * 257).save(os.path.join(d, "deep16.png"))
    Image.fromarray(good).convert("P").save(os.path.join(d, "palette.png"))
    with open(os.path.join(d, "empty.JPEG"), "wb"):
      pass
    with open(os.path.join(d, "garbage.JPEG"), "wb") as f:
      f.write(rng.bytes(3000))
    buf = open(os.path.join(d, f"{WNIDS[0]}_0.JPEG"), "rb").read()
    with open(os.path.join(d, "truncated.JPEG"), "wb") as f:
      f.write(buf[: len(buf) // 2])
    if split == "val":  # a broken link
      os.symlink(os.path.join(d, "moved.JPEG"), os.path.join(d, "gone.JPEG"))


def test_bad_and_odd_images_are_converted_or_replaced(tmp_path, caplog, monkeypatch):
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=4, val_per_class=2)
  _write_bad_files(root)
  cfg = _cfg(root, num_classes=2)
  val = sources.FolderSource(root, "val", 2)
  bad_keys = {"empty.JPEG", "garbage.JPEG", "truncated.JPEG"}  # and val's gone.JPEG
  with caplog.at_level(logging.WARNING, logger="fec_jax.data.loader"):
    it = fd.create_loader(cfg, "val", 4, seed=0)
    batches = list(it)
  gone = f"bad file {WNIDS[0]}/gone.JPEG masked out (val): cannot be read (No such file or dire"
  assert any(r.getMessage().startswith(gone) for r in caplog.records), caplog.records
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  keys = [val[i]["key"] for i in range(len(val))]
  for i, key in enumerate(keys):  # bad files are masked, every other label is its own
    assert mask[i] == (os.path.basename(key) not in bad_keys | {"gone.JPEG"}), key
    if mask[i]:
      assert labels[i] == val[i]["label"]
  assert it.stats() == {"bad": 4, "converted": 5}
  assert all(np.isfinite(b["image"]).all() for b in batches)
  # train: a bad record's place goes to the next readable one in source order, with its label
  train = sources.FolderSource(root, "train", 2)
  readable = [os.path.basename(train[i]["key"]) not in bad_keys for i in range(len(train))]
  takes = [next(j % 16 for j in range(i, i + 16) if readable[j % 16]) for i in range(16)]
  assert takes != list(range(16))  # some bad record is replaced
  caplog.clear()
  cfg.read_threads = 1  # two threads may both read a bad file before either has logged it
  reads = collections.Counter()
  read = sources.FolderSource.__getitem__
  monkeypatch.setattr(
      sources.FolderSource,
      "__getitem__",
      lambda self, i: reads.update([os.path.basename(self._paths[i].decode())]) or read(self, i),
  )
  with caplog.at_level(logging.WARNING, logger="fec_jax.data.loader"):
    it = fd.create_loader(cfg, "train", 2, seed=0, num_epochs=2)
    got = list(it)
  assert fd.num_examples(cfg, "train") == 16 and fd.steps_per_epoch(cfg, 2) == 8
  odd = {"cmyk.jpg", "gray.JPEG", "rgba.png", "deep16.png", "palette.png"}
  converted = sum(os.path.basename(train[j]["key"]) in odd for j in takes)
  assert len(got) == 16 and it.stats() == {"bad": 6, "converted": 2 * converted}  # 2 epochs
  labels = np.concatenate([b["label"] for b in got[:8]])
  assert sorted(labels.tolist()) == sorted(train[j]["label"] for j in takes)
  warned = [r.getMessage() for r in caplog.records]
  assert len(warned) == 3  # each bad file once, though its place comes in both epochs
  assert all(reads[key] == 1 for key in bad_keys), reads  # and read once
  assert all("replaced by the next readable record (train)" in m for m in warned)


def test_train_with_no_readable_image_raises(tmp_path):
  """A bad record is replaced by the next readable one; with none in the whole split, an error
  that names the data root and why the first bad file failed, in the main process or a worker."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for wnid in WNIDS[:3]:
      os.makedirs(tmp_path / split / wnid)
      for i in range(2):
        (tmp_path / split / wnid / f"{i}.JPEG").write_bytes(rng.bytes(100))
  for workers in (0, 1):
    it = fd.create_loader(_cfg(tmp_path, num_workers=workers), "train", 2, seed=0)
    with pytest.raises(
        fd.DataNotFoundError,
        match=re.escape(f"no readable image in the 6 train records of {tmp_path}; expected image ")
        + r"files that decode \(the first bad file, n\d+/\d\.JPEG: not an image file PIL can read; "
        + r"the warnings above name every one\)",
    ):
      next(it)
    it.close()


def _encode(img, fmt):
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def test_decode_modes():
  rgb = np.random.default_rng(0).integers(0, 255, (8, 9, 3), dtype=np.uint8)
  odd = [
      (Image.fromarray(rgb).convert("CMYK"), "JPEG"),
      (Image.fromarray(rgb[..., 0]), "PNG"),
      (Image.fromarray(rgb).convert("RGBA"), "PNG"),
      (Image.fromarray(np.full((8, 9), 40000, np.uint16)), "PNG"),
  ]
  for img, fmt in odd:
    out, converted = transforms.decode(_encode(img, fmt))
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8 and converted, img.mode
  assert out[0, 0, 0] == round(40000 / 257)  # 16-bit scaled, not clipped
  out, converted = transforms.decode(_encode(Image.fromarray(rgb), "PNG"))
  assert not converted and np.array_equal(out, rgb)
  with pytest.raises(transforms.BadImageError, match="^not an image file PIL can read$"):
    transforms.decode(b"not an image")  # not PIL's text, which names a BytesIO's address
  with pytest.raises(transforms.BadImageError, match="^empty file$"):
    transforms.decode(b"")
  with pytest.raises(transforms.BadImageError, match=r"^cannot be read \(Permission denied\)$"):
    transforms.decode(PermissionError(13, "Permission denied"))


def test_jpeg_decode_matches_pil():
  """The simplejpeg fast path gives PIL's pixels for the JPEG kinds of real datasets; CMYK and
  damaged files go through PIL (converted, or BadImageError for a truncated file)."""
  rng = np.random.default_rng(1)
  base = Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).resize(
      (101, 77), Image.Resampling.BICUBIC
  )
  kinds = {
      "4:2:0": dict(quality=90),
      "4:4:4": dict(subsampling=0),
      "4:2:2": dict(subsampling=1),
      "progressive": dict(progressive=True),
      "optimized": dict(optimize=True),
  }
  for name, options in kinds.items():
    buf = io.BytesIO()
    base.save(buf, "JPEG", **options)
    out, converted = transforms.decode(buf.getvalue())
    want = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    np.testing.assert_array_equal(out, np.asarray(want), err_msg=name)
    assert not converted, name
  for img in (base.convert("L"), base.convert("CMYK")):
    encoded = _encode(img, "JPEG")
    out, converted = transforms.decode(encoded)
    want = Image.open(io.BytesIO(encoded)).convert("RGB")
    np.testing.assert_array_equal(out, np.asarray(want), err_msg=img.mode)
    assert converted, img.mode
  encoded = _encode(base, "JPEG")
  with pytest.raises(transforms.BadImageError, match="truncated"):
    transforms.decode(encoded[: len(encoded) // 2])


def test_device_normalize_and_erase_modes():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
  mean, std = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
  x = np.asarray(device_transforms.normalize(images, mean, std))
  want = (images.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
  np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)  # torchvision's formula, float32
  boxes = np.array([[1, 2, 3, 4], [0, 0, 0, 0]], np.int32)  # image 1: no box
  inside = np.zeros((2, 6, 7, 1), bool)
  inside[0, 1:4, 2:6] = True
  for mode in ("pixel", "rand", "const"):
    out = np.asarray(device_transforms.erase(jax.random.key(0), x, boxes, mode))
    np.testing.assert_array_equal(np.where(inside, 0, out), np.where(inside, 0, x))
    fill = out[0, 1:4, 2:6]  # [3, 4, 3]
    assert (fill != x[0, 1:4, 2:6]).all(), mode
    if mode == "rand":  # one value per channel
      np.testing.assert_array_equal(fill, np.broadcast_to(fill[:1, :1], fill.shape))
    if mode == "const":
      assert not fill.any()
  with pytest.raises(ValueError, match="'pixel', 'rand' or 'const'"):
    device_transforms.erase(jax.random.key(0), x, boxes, "noise")


def test_missing_data_errors(tmp_path):
  with pytest.raises(fd.DataNotFoundError, match="train/<class>"):
    fd.create_loader(_cfg(tmp_path / "nowhere"), "train", 4, seed=0)
  os.makedirs(tmp_path / "empty" / "train" / "n0")
  with pytest.raises(FileNotFoundError, match="no images"):
    fd.num_examples(_cfg(tmp_path / "empty"), "train")
  pytest.importorskip("tensorflow_datasets")
  cfg = _cfg("", source="tfds", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(fd.DataNotFoundError, match="tfds build imagenet2012"):
    fd.num_examples(cfg, "train")


def test_a_missing_split_names_the_folders_of_its_root(tmp_path):
  """A root whose val split has another name (`valid/`), or the train split given as the root,
  names the folders it holds and the fields to give, for a split and for the train split that an
  evaluation needs; a root that is missing too names none, a root that is a file says so."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=2, per_class=1, val_per_class=1)
  os.rename(tmp_path / "data" / "val", tmp_path / "data" / "valid")
  fields = (
      "config.data.root is the folder of the splits, and --config.data.train_split / "
      "--config.data.val_split name them where they are not train / val);"
  )
  with pytest.raises(fd.DataNotFoundError) as e:
    fd.num_examples(_cfg(root), "val")
  assert str(e.value).startswith(
      f"{root}/val is not a directory ({root} holds train, valid: {fields}"
  )
  train = f"{root}/train"
  with pytest.raises(fd.DataNotFoundError) as e:
    sources.FolderSource(train, "val", 2)
  said = f"{train}/train is not a directory ({train} holds {WNIDS[0]}, {WNIDS[1]}: {fields} the val"
  assert str(e.value).startswith(said)
  with pytest.raises(fd.DataNotFoundError) as e:
    fd.num_examples(_cfg(tmp_path / "nowhere"), "train")
  assert str(e.value).startswith(f"{tmp_path}/nowhere/train is not a directory; expected")
  image = next((tmp_path / "data" / "valid").glob("*/*"))
  with pytest.raises(fd.DataNotFoundError) as e:  # one of its images given as the root
    fd.num_examples(_cfg(image), "train")
  assert str(e.value).startswith(
      f"{image}/train is not a directory ({image} is a file: config.data.root is the folder of "
      "the splits); expected"
  )


def test_unknown_config_fields_fail(folder):
  cfg = _cfg(folder)
  with pytest.raises(AttributeError, match="mixup_alhpa"):
    cfg.mixup_alhpa = 0.5  # the config is locked
  with cfg.unlocked():
    cfg.mixup_alhpa = 0.5  # a config built by hand is checked too
  with pytest.raises(ValueError, match="mixup_alhpa"):
    fd.create_loader(cfg, "train", 4, seed=0)
  cfg = _cfg(folder, std=())
  with pytest.raises(ValueError, match="mean and std need 3 values"):
    fd.validate(cfg)
  cfg = _cfg(folder, rand_augment="rand-m9-bogus1")
  with pytest.raises(ValueError, match="bogus"):
    fd.validate(cfg)


def test_eval_transform_resize_and_center_crop():
  """Shorter side to floor(224 / 0.9) = 248 bicubic, center crop with torchvision's rounding."""
  cfg = fd.default_config()
  rng = np.random.default_rng(0)
  src = Image.fromarray(rng.integers(0, 255, (333, 500, 3), dtype=np.uint8))
  x = transforms.eval_transform(np.asarray(src), cfg)
  resized = src.resize((372, 248), Image.Resampling.BICUBIC)  # int(248 * 500 / 333) = 372
  want = resized.crop((74, 12, 298, 236))  # round(148 / 2), round(24 / 2)
  np.testing.assert_array_equal(x, np.asarray(want))
  assert x.shape == (224, 224, 3) and x.dtype == np.uint8


def test_demo_source_split_and_loader():
  cfg = fd.demo_config()
  assert fd.num_examples(cfg, "train") + fd.num_examples(cfg, "val") == 1797
  tr = sources.DemoSource("train", 32, 0.2)
  va = sources.DemoSource("val", 32, 0.2)
  counts = np.bincount([va[i]["label"] for i in range(len(va))], minlength=10)
  assert counts.min() >= 35 and len(va) == 359
  assert tr[0]["encoded"].shape == (32, 32, 3)
  batch = next(fd.create_loader(cfg, "train", 64, seed=0))
  assert batch["image"].shape == (64, 32, 32, 3) and batch["label"].max() < 10


def test_the_demo_image_size_sets_the_image_size():
  """The digits demo's image_size follows demo_image_size (an override of the size alone drew
  64x64 digits and cropped them back to 32x32); one given itself stays as given."""
  import pickle

  cfg = fd.demo_config()
  cfg.demo_image_size = 64
  assert cfg.image_size == 64 and json.loads(cfg.to_json())["image_size"] == 64
  fd.validate(cfg)
  for split in ("train", "val"):
    assert next(fd.create_loader(cfg, split, 8, seed=0))["image"].shape == (8, 64, 64, 3)
  copy = pickle.loads(pickle.dumps(cfg))  # as worker processes get it: still linked
  copy.demo_image_size = 48
  assert copy.image_size == 48 and cfg.image_size == 64
  cfg.image_size = 32  # given: stays
  cfg.demo_image_size = 40
  assert cfg.image_size == 32
  assert next(fd.create_loader(cfg, "train", 8, seed=0))["image"].shape == (8, 32, 32, 3)


@pytest.mark.parametrize("fraction, split", [(0.001, "val"), (0.999, "train")])
def test_a_demo_val_fraction_that_empties_a_split_is_named(fraction, split):
  """It failed in numpy with "need at least one array to stack"."""
  cfg = fd.demo_config()
  cfg.demo_val_fraction = fraction
  expected = f"config.data: demo_val_fraction {fraction} leaves the demo's {split} split empty"
  with pytest.raises(ValueError, match=re.escape(expected)):
    fd.num_examples(cfg, split)


def test_mixup_cutmix_properties():
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
  labels = jax.numpy.arange(8) % 5
  mix = lambda prob: jax.jit(
      functools.partial(
          mixup.mixup_cutmix,
          num_classes=5,
          mixup_alpha=0.8,
          cutmix_alpha=1.0,
          prob=prob,
          switch_prob=0.5,
          label_smoothing=0.1,
      )
  )
  fn = mix(1.0)
  for seed in range(6):
    mixed, targets = fn(jax.random.PRNGKey(seed), images, labels)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, atol=1e-5)
    assert not np.allclose(mixed, images)
  same, targets = mix(0.0)(jax.random.PRNGKey(0), images, labels)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_allclose(np.asarray(targets).max(-1), 0.9 + 0.02, atol=1e-6)


@pytest.mark.parametrize("case", ["loose_val", "renamed_val_class", "num_classes", "one_class"])
def test_a_folder_that_does_not_fit_is_named_with_what_is_wrong(tmp_path, case):
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=1, val_per_class=1)
  val = tmp_path / "val"
  if case == "loose_val":  # the val images not yet sorted into class folders
    for image in sorted(val.rglob("*.JPEG")):
      image.rename(val / image.name)
      image.parent.rmdir()
  if case == "renamed_val_class":
    (val / WNIDS[1]).rename(val / WNIDS[1].upper())
  if case == "one_class":  # a train split of one class folder
    shutil.rmtree(tmp_path / "train" / WNIDS[1])
  expected = {
      "loose_val": f"{val} holds 2 images (e.g. {WNIDS[0]}_0.JPEG) outside class folders; sort",
      "renamed_val_class": f"{val} has class folders that {tmp_path / 'train'} lacks: "
      f"['{WNIDS[1].upper()}']; expected the train split's class names (case included)",
      "num_classes": f"{tmp_path / 'train'} has 2 class folders ({WNIDS[0]}, {WNIDS[1]}) but "
      "config.data.num_classes is 3",
      "one_class": f"{tmp_path / 'train'} has 1 class folder ({WNIDS[0]}) but "
      "config.data.num_classes is 2",
  }[case]
  with pytest.raises((ValueError, fd.DataNotFoundError), match=re.escape(expected)):
    sources.FolderSource(root, "val", 3 if case == "num_classes" else 2)


def test_a_val_split_without_its_train_split_and_an_empty_class(tmp_path, caplog):
  """The labels index the train split's class folders: evaluating needs them, not their images;
  an empty class folder is a class all the same, with a warning."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=2, per_class=2, val_per_class=1)
  (tmp_path / "data" / "train" / "n99999999").mkdir()  # an empty class, sorted last
  with caplog.at_level(logging.WARNING, logger=sources.__name__):
    source = sources.FolderSource(root, "train", 3)
    sources.FolderSource(root, "train", 3)  # a run opens the split more than once
  assert source.classes[-1] == "n99999999"
  warning = "1 class folder without an image, e.g. n99999999; each is a class all the same"
  assert caplog.text.count(warning) == 1
  for image in (tmp_path / "data" / "train").rglob("*.JPEG"):
    image.unlink()  # an evaluation-only copy: class folders without images
  sources.scan_folder.cache_clear()  # a new process's view of the folders
  assert len(sources.FolderSource(root, "val", 3)) == 2
  shutil.rmtree(tmp_path / "data" / "train")
  with pytest.raises(fd.DataNotFoundError, match="the val labels index the train split's class"):
    sources.FolderSource(root, "val", 3)


def test_images_outside_the_class_folders_are_skipped_with_a_warning(tmp_path, caplog):
  """An image left directly in train/ or val/ beside the class folders was skipped silently (as
  torchvision's ImageFolder skips it): the split lost it without a word. A warning per split
  names it now, once per process."""
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=2, val_per_class=1)
  for split in ("train", "val"):
    shutil.copy(next((tmp_path / split / WNIDS[0]).glob("*.JPEG")), tmp_path / split / "a.jpg")
  with caplog.at_level(logging.WARNING, logger=sources.__name__):
    for split, images in (("train", 4), ("val", 2), ("val", 2)):  # val: once per process
      assert len(sources.FolderSource(root, split, 2)) == images
  for split in ("train", "val"):
    warning = (
        f"{tmp_path / split}: 1 image outside class folders skipped, e.g. a.jpg; an image belongs "
        f"in {tmp_path / split}/<class>/"
    )
    assert caplog.text.count(warning) == 1


def test_files_of_other_extensions_in_class_folders_are_skipped_with_a_warning(tmp_path, caplog):
  """A file in a class folder without one of torchvision's image extensions (a .heic or .jfif
  photo, a .gif, notes) was skipped without a word, as ImageFolder skips it: the split lost those
  photos silently. A warning per split counts them now, once per process; hidden files
  (.DS_Store) are skipped without one."""
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=2, val_per_class=1)
  image = next((tmp_path / "train" / WNIDS[1]).glob("*.JPEG"))
  for name in ("photo.heic", "nested/b.gif", ".DS_Store"):
    (image.parent / name).parent.mkdir(exist_ok=True)
    shutil.copy(image, image.parent / name)
  with caplog.at_level(logging.WARNING, logger=sources.__name__):
    for _ in range(2):  # once per process
      assert len(sources.FolderSource(root, "train", 2)) == 4
    assert len(sources.FolderSource(root, "val", 2)) == 2
  train = tmp_path / "train"
  assert caplog.text.count(f"{train}: 2 files in class folders without an image extension") == 1
  assert f"skipped, e.g. {WNIDS[1]}/photo.heic\n" in caplog.text
  assert "/val: " not in caplog.text and ".DS_Store" not in caplog.text


def test_a_file_name_with_a_newline_is_one_log_line(tmp_path, caplog):
  """A file name is written as repr escapes it where it holds a character that does not print:
  a newline in it split the bad-file warning (and the skipped-files one) into two lines."""
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=2, val_per_class=1)
  (tmp_path / "val" / WNIDS[0] / "bad\nname.JPEG").write_bytes(b"not a JPEG")
  (tmp_path / "val" / WNIDS[1] / "notes\tb\x1b.txt").write_text("x")
  (tmp_path / "val" / "loose\r.jpg").write_bytes(b"not a JPEG")
  with caplog.at_level(logging.WARNING):
    list(fd.create_loader(_cfg(root, num_classes=2), "val", 2, seed=0))
  warned = [r.getMessage() for r in caplog.records]
  assert all("\n" not in m and "\r" not in m and "\t" not in m for m in warned), warned
  bad = f"bad file '{WNIDS[0]}/bad\\nname.JPEG' masked out (val): not an image file PIL can read"
  assert bad in warned, warned
  assert any(m.endswith(f"skipped, e.g. '{WNIDS[1]}/notes\\tb\\x1b.txt'") for m in warned)
  assert any("1 image outside class folders skipped, e.g. 'loose\\r.jpg'; " in m for m in warned)
  assert sources.one_line(f"{WNIDS[0]}/café photo.JPEG") == f"{WNIDS[0]}/café photo.JPEG"


def _listed(root, split, classes):
  """A FolderSource's (path, label) pairs."""
  source = sources.FolderSource(root, split, classes)
  return [(source[i]["key"], source[i]["label"]) for i in range(len(source))]


@pytest.mark.parametrize(
    "link, target", [("sub/self", "."), ("loop", ".."), ("up", os.path.join("..", ".."))]
)
def test_a_symbolic_link_loop_in_a_class_folder_lists_its_images_once_with_a_warning(
    tmp_path, caplog, link, target
):
  """os.walk(followlinks=True) followed a link to the folder it lies in (`-> .`), to its parent
  (`-> ..`) or to the dataset (`-> ../..`) until the path was too long: each image of the class
  was listed about 40 times, without a word. Each real folder is walked once per class now, with
  a warning per split that counts the links left out."""
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=2, val_per_class=1)
  train = tmp_path / "train"
  (train / WNIDS[1] / "sub").mkdir()
  shutil.copy(next((train / WNIDS[1]).glob("*.JPEG")), train / WNIDS[1] / "sub" / "c.jpg")
  os.symlink(target, train / WNIDS[1] / link)
  with caplog.at_level(logging.WARNING, logger=sources.__name__):
    for _ in range(2):  # once per process
      listed = _listed(root, "train", 2)
  first, second = (sorted(p.name for p in (train / c).glob("*.JPEG")) for c in WNIDS[:2])
  assert listed == [(f"{WNIDS[0]}/{name}", 0) for name in first] + [
      (f"{WNIDS[1]}/{name}", 1) for name in second
  ] + [(f"{WNIDS[1]}/sub/c.jpg", 1)]
  assert caplog.text.count(f"{train}: 1 symbolic link in class folders to a folder already") == 1
  assert f"e.g. {WNIDS[1]}/{link} is skipped\n" in caplog.text


def test_symbolic_links_that_are_no_loop_are_listed_and_a_nested_folder_in_order(tmp_path, caplog):
  """A link to a folder elsewhere, or to another class's folder (as torchvision's ImageFolder
  lists it), is walked as a folder; the images are listed by folder path, then file name."""
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=1, val_per_class=1)
  train, image = tmp_path / "train", next((tmp_path / "train" / WNIDS[0]).glob("*.JPEG"))
  for name in ("z.jpg", "a/1.jpg", "a-x/2.jpg", "a/b/0.jpg", "b/3.jpg"):
    (train / WNIDS[0] / name).parent.mkdir(exist_ok=True)
    shutil.copy(image, train / WNIDS[0] / name)
  (tmp_path / "elsewhere").mkdir()
  shutil.copy(image, tmp_path / "elsewhere" / "e.jpg")
  os.symlink(tmp_path / "elsewhere", train / WNIDS[1] / "linked")
  os.symlink(os.path.join("..", WNIDS[0], "a"), train / WNIDS[1] / "other")
  with caplog.at_level(logging.WARNING, logger=sources.__name__):
    listed = _listed(root, "train", 2)
  first, second = image.name, next((train / WNIDS[1]).glob("*.JPEG")).name
  assert listed == [
      (f"{WNIDS[0]}/{first}", 0),
      (f"{WNIDS[0]}/z.jpg", 0),
      (f"{WNIDS[0]}/a/1.jpg", 0),
      (f"{WNIDS[0]}/a-x/2.jpg", 0),  # '-' sorts before '/'
      (f"{WNIDS[0]}/a/b/0.jpg", 0),
      (f"{WNIDS[0]}/b/3.jpg", 0),
      (f"{WNIDS[1]}/{second}", 1),
      (f"{WNIDS[1]}/linked/e.jpg", 1),
      (f"{WNIDS[1]}/other/1.jpg", 1),
      (f"{WNIDS[1]}/other/b/0.jpg", 1),
  ]
  assert "symbolic link" not in caplog.text


def test_file_names_that_are_not_ascii_are_read(tmp_path):
  """The paths are kept as bytes: numpy's ASCII encoding of a name like 'café.JPEG' raised
  UnicodeEncodeError while the split was listed; os.fsencode takes any name the folder holds."""
  root = make_imagenet_folder(tmp_path, num_classes=2, per_class=2, val_per_class=1)
  image = next((tmp_path / "train" / WNIDS[1]).glob("*.JPEG"))
  image.rename(image.with_name("café 猫.JPEG"))
  source = sources.FolderSource(root, "train", 2)
  record = source[2]  # class 1's first file: 'c' sorts before 'n01443537_1.JPEG'
  assert record["key"] == os.path.join(WNIDS[1], "café 猫.JPEG") and record["label"] == 1
  assert transforms.decode(record["encoded"])[0].shape == (64, 80, 3)


def test_a_global_batch_larger_than_the_train_split_is_an_error(folder):
  with pytest.raises(ValueError, match=r"^18 train examples, fewer than one global batch \(32\); "):
    fd.create_loader(_cfg(folder), "train", 32, seed=0)


def test_a_batch_or_shard_count_below_one_is_a_value_error(folder):
  """They were a ZeroDivisionError (0) or a loader of negative batches (-8)."""
  cfg, seg_cfg = _cfg(folder), fd.seg_demo_config()
  calls = [
      (
          "the global batch (0) and the shard count (1)",
          lambda: fd.create_loader(cfg, "train", 0, 0),
      ),
      (
          "the global batch (-8) and the shard count (1)",
          lambda: fd.create_loader(cfg, "val", -8, 0),
      ),
      ("the global batch (0) and the shard count (1)", lambda: fd.steps_per_epoch(cfg, 0)),
      ("the batch (0) and the shard count (1)", lambda: fd.num_eval_batches(cfg, 0)),
      ("the batch (1) and the shard count (0)", lambda: fd.seg_num_eval_examples(seg_cfg, 0)),
  ]
  for expected, call in calls:
    with pytest.raises(ValueError, match=re.escape(expected + " must be at least 1")):
      call()


def test_class_names_of_a_classifier_come_from_its_runs_data(tmp_path):
  """classes.classification_names from a run's data config (a ConfigDict) or its config.json
  data section (a dict); visualize.py names the predicted class with it."""
  for name in ("fox", "cat", "dog"):
    (tmp_path / "train" / name).mkdir(parents=True)
  folder = {"source": "folder", "root": str(tmp_path), "train_split": ""}
  assert classes.classification_names(folder, 3) == ("cat", "dog", "fox")
  config = fd.default_config()
  config.source, config.root = "folder", str(tmp_path)
  assert classes.classification_names(config, 3) == ("cat", "dog", "fox")
  assert classes.classification_names(folder, 4) is None  # not the run's folders any more
  assert classes.classification_names({**folder, "root": str(tmp_path / "moved")}, 3) is None
  assert classes.classification_names({"source": "demo"}, 10)[3] == "digit 3"
  assert classes.classification_names({}, 1000)[0] == "tench, Tinca tinca"  # a converter output
  imagenet = tmp_path / "imagenet"
  for wnid in ("n01440764", "n01443537"):
    (imagenet / "train" / wnid).mkdir(parents=True)
  assert classes.classification_names({**folder, "root": str(imagenet)}, 2) == (
      "n01440764",
      "n01443537",
  )
  for i in range(998):  # ImageNet's layout: its names, not the wnids
    (imagenet / "train" / f"n{i:08d}").mkdir()
  assert classes.classification_names({**folder, "root": str(imagenet)}, 1000)[1].startswith(
      "goldfish"
  )
  assert classes.classification_names({"source": "tfds"}, 5) is None


def test_decode_16_bit_does_not_depend_on_the_content_or_the_container():
  """A 16-bit grayscale image is scaled to 8 bits (value / 257) whatever its values: a dark one
  (none above 255 of 65535) too, and read from a 16-bit PGM (Pillow's mode 'I') as from a PNG
  ('I;16'). Before, a mode-'I' image was scaled only where a value exceeded 255, so a dark 16-bit
  PGM came out 257 times brighter than the same pixels in a PNG."""
  for values in ([0, 100, 200, 255], [0, 100, 200, 256], [0, 1000, 40000, 65535]):
    pixels = np.array([values], np.uint16)
    png = _encode(Image.fromarray(pixels), "PNG")
    pgm = b"P5 4 1 65535\n" + pixels.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    want = np.round(pixels / 257).astype(np.uint8)
    for encoded in (png, pgm):
      out, converted = transforms.decode(encoded)
      assert converted and np.array_equal(out[..., 0], want), (values, out[..., 0])
