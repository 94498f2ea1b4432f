"""Throughput of FEC inference and training steps, JAX side by side with the PyTorch reference.

  python bench.py [--models fec_small fec_base fec_large] [--batch 256] [--dtypes float32 bfloat16]
                  [--modes infer train] [--warmup 20] [--iters 100] [--aggregation segment_sum]
                  [--torch auto|off] [--max-train-batch fec_large]

The paper's protocol: `--warmup` iterations, a synchronizing wait, then the mean over `--iters`.
One JSON line per measurement (model, mode, dtype, batch, img/s, ms/iter, peak device memory).
The training step is train.py's (AdamW, schedule, Mixup/CutMix, EMA) on a mesh of all devices.
When a CUDA build of torch is importable, the same run times tests/torch_reference.py (eager,
bf16 autocast, torch.compile) and prints the JAX/torch ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fec_jax import training
from fec_jax.throughput import measure
from fec_jax.model import create_model, init_variables

ROOT = os.path.dirname(os.path.abspath(__file__))


def peak_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def train_config(name: str, batch: int, dtype: str):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.global_batch_size = batch
  config.model.dtype = dtype
  return config


def jax_infer(name: str, batch: int, dtype: str, aggregation: str, warmup: int, iters: int) -> float:
  model = create_model(name, dtype=jnp.dtype(dtype), aggregation=aggregation)
  params = init_variables(model, jax.random.PRNGKey(0), (1, 224, 224, 3))["params"]
  images = jax.random.normal(jax.random.PRNGKey(1), (batch, 224, 224, 3))
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return measure(lambda _: forward(params, images), forward(params, images), warmup, iters)


def jax_train(name: str, batch: int, dtype: str, aggregation: str, warmup: int, iters: int) -> float:
  config = train_config(name, batch, dtype)
  mesh = training.create_mesh()
  model = create_model(name, dtype=jnp.dtype(dtype), aggregation=aggregation,
                       drop_path_rate=config.model.drop_path_rate)
  schedule = training.lr_schedule(config, steps_per_epoch=1000)
  tx = training.create_optimizer(config, schedule)
  sharding = jax.tree.map(lambda a: a.sharding, training.abstract_state(model, tx, config, mesh))
  state = training.create_state(model, tx, config, sharding)
  step = training.make_train_step(model, tx, schedule, config, mesh, sharding)
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()  # the train loader's batch on this host
  batch_data = training.global_batch({
      "image": rng.integers(0, 256, (local, 224, 224, 3), dtype=np.uint8),
      "erase": np.tile(np.array([[40, 60, 50, 30]], np.int32), (local, 1)),  # timm's recipe
      "label": rng.integers(0, 1000, local).astype(np.int32)}, mesh)
  return measure(lambda s: step(s, batch_data)[0], state, warmup, iters)


def torch_runs(name: str, batch: int, modes: list[str], warmup: int, iters: int):
  """Yields (label, seconds per iteration) of the PyTorch reference on CUDA."""
  import torch
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import torch_reference

  def timed(fn):
    return measure(lambda _: fn(), None, warmup, iters, sync=lambda _: torch.cuda.synchronize())

  model = torch_reference.create_torch_model(name).cuda()
  x = torch.randn(batch, 3, 224, 224, device="cuda")
  y = torch.randint(0, 1000, (batch,), device="cuda")
  autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
  compiled = torch.compile(model)
  if "infer" in modes:
    model.eval()
    with torch.no_grad():
      yield "torch infer float32", timed(lambda: model(x))
      with autocast():
        yield "torch infer bf16 autocast", timed(lambda: model(x))
        yield "torch infer bf16 torch.compile", timed(lambda: compiled(x))
  if "train" in modes:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def train_step(net):
      with autocast():
        loss = torch.nn.functional.cross_entropy(net(x), y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()

    yield "torch train bf16 autocast", timed(lambda: train_step(model))
    yield "torch train bf16 torch.compile", timed(lambda: train_step(compiled))


def largest_train_batch(name: str, dtype: str, aggregation: str, start: int = 256) -> int:
  """Largest power-of-two-then-bisected training batch that fits in device memory."""
  fits = lambda b: _try(lambda: jax_train(name, b, dtype, aggregation, 1, 1))
  lo, hi = 0, start
  while fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > max(8, lo // 16):
    mid = (lo + hi) // 2 // 8 * 8
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def _try(fn) -> bool:
  try:
    fn()
    return True
  except Exception as e:  # XLA reports out-of-memory as XlaRuntimeError / RESOURCE_EXHAUSTED
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return False
    raise


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", default=["fec_small", "fec_base", "fec_large"])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
  p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--iters", type=int, default=100)
  p.add_argument("--aggregation", default="segment_sum", choices=["segment_sum", "onehot"])
  p.add_argument("--torch", default="auto", choices=["auto", "off"],
                 help="time the PyTorch reference too when a CUDA torch is importable")
  p.add_argument("--max-train-batch", nargs="*", default=[], metavar="MODEL",
                 help="also search the largest bf16 training batch that fits, for these models")
  args = p.parse_args(argv)
  device = jax.devices()[0].device_kind
  common = {"device": device, "devices": jax.device_count(), "jax": jax.__version__,
            "aggregation": args.aggregation, "batch": args.batch}
  runners = {"infer": jax_infer, "train": jax_train}
  for name in args.models:
    jax_times = {}
    for mode in args.modes:
      for dtype in args.dtypes:
        seconds = runners[mode](name, args.batch, dtype, args.aggregation, args.warmup, args.iters)
        jax_times[(mode, dtype)] = seconds
        emit({**common, "impl": "jax", "model": name, "mode": mode, "dtype": dtype,
              "img_per_s": round(args.batch / seconds, 1), "ms_per_iter": round(1e3 * seconds, 3),
              "peak_memory_bytes": peak_memory()})
    if args.torch == "auto" and _cuda_torch():
      for label, seconds in torch_runs(name, args.batch, args.modes, args.warmup, args.iters):
        mode = label.split()[1]
        ours = jax_times.get((mode, "bfloat16"))
        emit({**common, "impl": label, "model": name, "mode": mode,
              "img_per_s": round(args.batch / seconds, 1), "ms_per_iter": round(1e3 * seconds, 3),
              "jax_bf16_speedup": round(seconds / ours, 2) if ours else None})
  for name in args.max_train_batch:
    emit({**common, "model": name, "mode": "train", "dtype": "bfloat16",
          "largest_train_batch": largest_train_batch(name, "bfloat16", args.aggregation)})


def _cuda_torch() -> bool:
  try:
    import torch
  except ImportError:
    return False
  return torch.cuda.is_available()


if __name__ == "__main__":
  main()
