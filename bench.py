"""Throughput of FEC inference and training steps, JAX side by side with the PyTorch reference.

  python bench.py [--models fec_small fec_base fec_large] [--batch 256]
                  [--dtypes float32 bfloat16] [--modes infer train] [--warmup 20] [--iters 100]
                  [--aggregation auto] [--torch auto|eager|off] [--max-batch]
  python bench.py --tpu v5e:2x2 [--models ...] [--batch 32] [--dtypes ...] [--modes ...]
                  [--max-batch]

The paper's protocol: `--warmup` iterations, a synchronizing wait, then the mean over `--iters`.
One JSON line per measurement (model, mode, dtype, batch, img/s, ms/iter, peak device memory, and
the start-up: state init, trace + lower, compile). The training step is train.py's (AdamW,
schedule, Mixup/CutMix, EMA) on a mesh of all devices. With torch importable, the same run times
tests/torch_reference.py on CUDA (eager, bf16 autocast, torch.compile) or, without a GPU, on CPU
(eager fp32, torch.compile) and prints the torch/JAX time ratios.

--tpu TOPOLOGY compiles instead for a TPU slice that need not be attached (libtpu's compiler,
`pip install -e ".[tpu]"`), --batch images per chip, and prints per model, mode and dtype the
compile time and per-chip memory (against the chip's HBM) of the program train.py runs, then, from
a second compile with each stage's blocks unrolled (XLA's cost analysis counts a loop body once),
flops and bytes accessed per image and the ten fusions that move the most bytes. --max-batch: the
largest training batch that fits (per chip with --tpu, else on the attached devices).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fec_jax import cli, reporting, throughput
from fec_jax.clustering import AGGREGATIONS
from fec_jax.model import classifiers, create_model, init_variables, list_models, param_shapes

ROOT = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE = 224


class UsageError(ValueError):
  """A bad command line: reported as one `error:` line, exit code 2."""


def peak_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def train_config(name: str, batch: int, dtype: str):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.global_batch_size = batch
  config.model.dtype = dtype
  return config


def infer_program(
    name: str, batch: int, dtype: str, aggregation: str, devices, concrete: bool, unroll=False
):
  """(jitted forward, its arguments, state init seconds) for `batch` images over `devices`.

  concrete: real params and images; otherwise ShapeDtypeStructs (to compile without running).
  unroll: the stages' blocks unrolled (the model's `unroll_stages`), for cost analysis."""
  mesh = Mesh(np.asarray(devices), ("batch",))
  model = create_model(name, dtype=jnp.dtype(dtype), aggregation=aggregation, unroll_stages=unroll)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  forward = jax.jit(
      lambda p, x: model.apply({"params": p}, x),
      in_shardings=(replicated, sharded),
      out_shardings=sharded,
  )
  shape = (batch, IMAGE_SIZE, IMAGE_SIZE, 3)
  start = time.perf_counter()
  if concrete:
    params = init_variables(model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3))["params"]
    images = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), shape), sharded)
  else:
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), param_shapes(model)
    )
    images = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharded)
  return forward, (params, images), time.perf_counter() - start


def train_program(
    name: str, batch: int, dtype: str, aggregation: str, devices, concrete: bool, unroll=False
):
  """(train.py's jitted step, its arguments (state, batch), state init seconds) for a global
  `batch` over `devices`; concrete and unroll as in infer_program. The one use of
  fec_jax.training here: the classification task's loss on the training library's step."""
  from fec_jax import training
  from fec_jax.tasks.classification import Classification

  config = train_config(name, batch, dtype)
  mesh = Mesh(np.asarray(devices), (training.DATA_AXIS,))
  model = create_model(
      name,
      dtype=jnp.dtype(dtype),
      aggregation=aggregation,
      drop_path_rate=config.model.drop_path_rate,
      unroll_stages=unroll,
  )
  schedule = training.lr_schedule(config, steps_per_epoch=1000)
  tx = training.create_optimizer(config, schedule)
  input_shape = (1, IMAGE_SIZE, IMAGE_SIZE, 3)
  abstract = training.abstract_state(model, tx, config, input_shape, mesh)
  sharding = jax.tree.map(lambda a: a.sharding, abstract)
  loss_fn = Classification(config).loss_fn(model, mesh)
  step = training.make_train_step(loss_fn, tx, schedule, config, mesh, sharding)
  start = time.perf_counter()
  if not concrete:
    data = training.batch_sharded(mesh)
    batch_data = {
        "image": jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8, sharding=data),
        "erase": jax.ShapeDtypeStruct((batch, 4), jnp.int32, sharding=data),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data),
    }
    return step, (abstract, batch_data), 0.0
  state = training.create_state(model, tx, config, input_shape, sharding)
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - start
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()  # the train loader's batch on this host
  batch_data = training.global_batch(
      {
          "image": rng.integers(0, 256, (local, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
          "erase": np.tile(np.array([[40, 60, 50, 30]], np.int32), (local, 1)),  # timm's recipe
          "label": rng.integers(0, 1000, local).astype(np.int32),
      },
      mesh,
  )
  return step, (state, batch_data), init_seconds


PROGRAMS = {"infer": infer_program, "train": train_program}


def compile_timed(jitted, args):
  """(compiled, {trace_lower_s, compile_s, stablehlo_lines})."""
  start = time.perf_counter()
  lowered = jitted.trace(*args).lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, {
      "trace_lower_s": round(lowered_at - start, 2),
      "compile_s": round(time.perf_counter() - lowered_at, 2),
      "stablehlo_lines": lowered.as_text().count("\n"),
  }


def run_jax(
    mode: str, name: str, batch: int, dtype: str, aggregation: str, warmup: int, iters: int
) -> tuple[float, dict]:
  """Seconds per step on the attached devices, and the start-up (init, trace + lower, compile)."""
  jitted, args, init_seconds = PROGRAMS[mode](name, batch, dtype, aggregation, jax.devices(), True)
  compiled, startup = compile_timed(jitted, args)
  startup = {"state_init_s": round(init_seconds, 2), **startup}
  if mode == "infer":
    return throughput.measure(lambda _: compiled(*args), None, warmup, iters), startup
  state, batch_data = args
  return throughput.measure(lambda s: compiled(s, batch_data)[0], state, warmup, iters), startup


def tpu_devices(topology: str):
  """The devices of a TPU slice, e.g. 'v5e:2x2', from libtpu (no TPU needs to be attached)."""
  try:
    import libtpu  # noqa: F401  (only to say what is missing)
  except ImportError:
    raise UsageError('--tpu needs libtpu: pip install -e ".[tpu]"') from None
  from jax.experimental import topologies
  # Compiling needs no TPU, so several such processes may share libtpu (else its lockfile stops
  # the second one), and there are no TPU workers to look up (libtpu logs an error block when
  # it cannot find them).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  except Exception as e:  # libtpu rejects a bad name with a JaxRuntimeError, INVALID_ARGUMENT
    if "INVALID_ARGUMENT" in str(e):
      raise UsageError(
          f"unknown TPU topology {topology!r} (expected e.g. v4:2x2x1, v5e:2x2, "
          f"v5p:2x2x1, v6e:2x2): {e}"
      ) from None
    raise UsageError(f"libtpu could not describe TPU topology {topology!r}: {e}") from None


def tpu_compile(
    mode: str, name: str, batch: int, dtype: str, aggregation: str, devices, describe: bool = True
) -> dict:
  """Compiles `mode` for `batch` images per chip on `devices`: compile time and memory of the
  program train.py runs. describe: also flops, bytes and the largest fusions, from a second
  compile with the stages' blocks unrolled (XLA's cost analysis counts a loop body once)."""
  program = functools.partial(PROGRAMS[mode], name, batch * len(devices), dtype, aggregation)
  jitted, args, _ = program(devices, False)
  compiled, times = compile_timed(jitted, args)
  hbm = throughput.TPU_HBM_BYTES.get(devices[0].device_kind)
  memory = throughput.memory_report(compiled)
  report = {
      **times,
      "memory_per_chip": {**memory, "hbm": hbm},
      "fits_hbm": None if hbm is None else memory["total"] <= hbm,
      "scatters": compiled.as_text().count(" scatter("),
  }
  if not describe:
    return report
  jitted, args, _ = program(devices, False, unroll=True)
  unrolled, unrolled_times = compile_timed(jitted, args)
  fusions = throughput.fusion_bytes(unrolled.as_text())
  return {
      **report,
      "unrolled_compile_s": unrolled_times["compile_s"],
      **throughput.cost_report(unrolled, batch),
      "fusions": len(fusions),
      # what the TPU layouts' tile padding adds, over all fusions
      "fusion_padding_factor": round(
          sum(f["bytes"] for f in fusions) / max(1, sum(f["unpadded_bytes"] for f in fusions)), 2
      ),
      "top_fusions_by_bytes": [
          {"name": f["name"], "kind": f["kind"], "bytes": f["bytes"], "output": f["output"]}
          for f in fusions[:10]
      ],
  }


def tpu_fits(
    name: str, batch: int, dtype: str, aggregation: str, devices
) -> tuple[bool, int | None]:
  """(whether a training batch per chip fits the chip's HBM, its total bytes per chip, or None
  where the TPU compiler refused the program for its size)."""
  try:
    report = tpu_compile("train", name, batch, dtype, aggregation, devices, describe=False)
  except Exception as e:  # the TPU compiler refuses programs that exceed HBM
    if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
      return False, None
    raise
  return bool(report["fits_hbm"]), report["memory_per_chip"]["total"]


def largest_tpu_batch(name: str, dtype: str, aggregation: str, devices, start: int = 32) -> int:
  """Largest per-chip training batch (a multiple of 8) whose compiled step fits the chip's HBM.

  TPU compiles take minutes here, so instead of bisecting: memory is about linear in the batch,
  two compiles (start, 2 start) give the line, and the prediction is checked by stepping down,
  then up, by 8 until the next batch no longer fits."""
  hbm = throughput.TPU_HBM_BYTES[devices[0].device_kind]
  fits = lambda b: tpu_fits(name, b, dtype, aggregation, devices)
  fit, small = fits(start)
  if not fit:
    return 0 if start <= 8 else largest_tpu_batch(name, dtype, aggregation, devices, start // 2)
  large = fits(2 * start)[1]
  per_image = (large - small) / start if large is not None and large > small else small / start
  guess = max(start, int(start + (hbm - small) / per_image) // 8 * 8)
  while guess > start and not fits(guess)[0]:
    guess -= 8
  while fits(guess + 8)[0]:
    guess += 8
  return guess


def torch_runs(
    name: str, batch: int, modes: list[str], warmup: int, iters: int, compile_too: bool = True
):
  """Yields (mode, dtype, label, seconds per iteration) of the PyTorch reference on CUDA, or on
  CPU without a GPU (eager fp32 and torch.compile; a label with 'failed' when compile fails);
  compile_too=False: eager only."""
  import torch

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import torch_reference

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  timed = lambda fn: throughput.measure(lambda _: fn(), None, warmup, iters, sync=sync)
  model = torch_reference.create_torch_model(name).to(device)
  x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
  y = torch.randint(0, 1000, (batch,), device=device)
  precisions = {"float32": contextlib.nullcontext}
  if cuda:
    precisions["bfloat16"] = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
  runs = [(dtype, "eager", model) for dtype in precisions]
  if compile_too:
    runs.append(("bfloat16" if cuda else "float32", "torch.compile", torch.compile(model)))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

  def infer(net, context):
    with torch.no_grad(), context():
      return net(x)

  def train_step(net, context):
    with context():
      loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  for mode, fn in (("infer", infer), ("train", train_step)):
    if mode not in modes:
      continue
    model.train(mode == "train")
    for dtype, label, net in runs:
      progress(
          f"timing the PyTorch reference {name} {label} {dtype} {mode} ({device}, batch {batch}, "
          f"{warmup} warm-up + {iters} timed iterations) ..."
      )
      try:
        yield mode, dtype, label, timed(lambda: fn(net, precisions[dtype]))
      except Exception as e:  # torch.compile needs a working C++ toolchain on CPU
        yield mode, dtype, f"{label} failed: {type(e).__name__}", None


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def progress(message: str) -> None:
  """One line on stderr before a slow step (results stay on stdout)."""
  print(message, file=sys.stderr, flush=True)


def parse_args(argv):
  names = classifiers()
  p = cli.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=cli.HelpFormatter)
  p.add_argument(
      "--models",
      nargs="+",
      default=["fec_small", "fec_base", "fec_large"],
      metavar="MODEL",
      help=f"classification variants to time, of: {', '.join(names)}",
  )
  p.add_argument(
      "--batch",
      type=int,
      default=256,
      help="images per step over all devices; with --tpu, per chip",
  )
  p.add_argument(
      "--dtypes",
      nargs="+",
      default=["float32", "bfloat16"],
      choices=["float32", "bfloat16"],
      help="compute dtypes",
  )
  p.add_argument(
      "--modes",
      nargs="+",
      default=["infer", "train"],
      choices=["infer", "train"],
      help="infer: the forward pass; train: train.py's whole training step",
  )
  p.add_argument("--warmup", type=int, default=20, help="untimed iterations before the timing")
  p.add_argument("--iters", type=int, default=100, help="timed iterations, whose mean is reported")
  p.add_argument(
      "--aggregation",
      default="auto",
      choices=AGGREGATIONS,
      help="the clustering's aggregation (auto: segment_sum on CPU, onehot on GPU and TPU)",
  )
  p.add_argument(
      "--torch",
      default="auto",
      choices=["auto", "eager", "off"],
      help=(
          "auto: also time the PyTorch reference when torch is importable (on CUDA eager fp32, "
          "bf16 autocast and bf16 torch.compile; on CPU eager fp32 and fp32 torch.compile); "
          "eager: the same without torch.compile (minutes less on a CPU)"
      ),
  )
  p.add_argument(
      "--tpu",
      metavar="TOPOLOGY",
      help="compile for this TPU slice instead of running (e.g. v5e:2x2; needs libtpu)",
  )
  p.add_argument(
      "--max-batch",
      action="store_true",
      help="also find the largest training batch that fits (per chip with --tpu)",
  )
  args = p.parse_args(argv)
  if args.tpu == "":
    raise UsageError("--tpu is empty; expected a TPU topology such as v5e:2x2")
  unknown = [m for m in args.models if m not in names]
  if unknown:
    what = (
        "not classifiers"
        if set(unknown) <= set(list_models())
        else reporting.counted(len(unknown), "unknown model")
    )
    raise UsageError(
        f"{what}: {unknown}; bench.py times {', '.join(names)}"
        + reporting.did_you_mean(unknown, names)
    )
  for field in ("batch", "iters"):
    if getattr(args, field) <= 0:
      raise UsageError(f"--{field} must be a positive integer, got {getattr(args, field)}")
  if args.warmup < 0:
    raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
  if args.torch == "eager" and not _torch_importable():
    raise UsageError("--torch eager times the PyTorch reference, but torch is not installed")
  if not args.tpu and args.batch % jax.device_count():  # with --tpu, --batch is per chip
    raise UsageError(
        f"--batch {args.batch} must be a multiple of the {jax.device_count()} devices (each step's "
        "images are split evenly over them)"
    )
  return args


def main(argv=None) -> None:
  try:
    args = parse_args(argv)
    devices = tpu_devices(args.tpu) if args.tpu else jax.devices()
    kind = devices[0].device_kind
    if args.tpu and args.max_batch and kind not in throughput.TPU_HBM_BYTES:
      raise UsageError(
          f"--max-batch does not know the HBM of a {kind!r} chip; known: "
          f"{', '.join(throughput.TPU_HBM_BYTES)}"
      )
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  common = {
      "device": kind,
      "devices": len(devices),
      "jax": jax.__version__,
      "aggregation": args.aggregation,
  }
  if args.tpu:
    common.update(tpu=args.tpu, batch_per_chip=args.batch)
    for name in args.models:
      for mode in args.modes:
        for dtype in args.dtypes:
          progress(
              f"compiling {name} {dtype} {mode} for TPU {args.tpu} (batch {args.batch} per chip) ..."
          )
          report = tpu_compile(mode, name, args.batch, dtype, args.aggregation, devices)
          emit({**common, "model": name, "mode": mode, "dtype": dtype, **report})
      if args.max_batch:
        for dtype in args.dtypes:
          progress(
              f"searching the largest {name} {dtype} train batch per chip on TPU {args.tpu} ..."
          )
          emit(
              {
                  **common,
                  "model": name,
                  "mode": "train",
                  "dtype": dtype,
                  "largest_batch_per_chip": largest_tpu_batch(
                      name, dtype, args.aggregation, devices
                  ),
              }
          )
    return
  common["batch"] = args.batch
  for name in args.models:
    jax_times = {}
    for mode in args.modes:
      for dtype in args.dtypes:
        progress(
            f"timing {name} {dtype} {mode} (jax, batch {args.batch}, {args.warmup} warm-up + "
            f"{args.iters} timed iterations) ..."
        )
        seconds, startup = run_jax(
            mode, name, args.batch, dtype, args.aggregation, args.warmup, args.iters
        )
        jax_times[(mode, dtype)] = seconds
        emit(
            {
                **common,
                "impl": "jax",
                "model": name,
                "mode": mode,
                "dtype": dtype,
                "img_per_s": round(args.batch / seconds, 1),
                "ms_per_iter": round(1e3 * seconds, 3),
                "peak_memory_bytes": peak_memory(),
                **startup,
            }
        )
    if args.torch != "off" and _torch_importable():
      for mode, dtype, label, seconds in torch_runs(
          name, args.batch, args.modes, args.warmup, args.iters, compile_too=args.torch == "auto"
      ):
        record = {**common, "impl": f"torch {label}", "model": name, "mode": mode, "dtype": dtype}
        if seconds is not None:
          ours = jax_times.get((mode, dtype))
          record.update(
              img_per_s=round(args.batch / seconds, 1),
              ms_per_iter=round(1e3 * seconds, 3),
              torch_over_jax_time=round(seconds / ours, 2) if ours else None,
          )
        emit(record)
    if args.max_batch:
      for dtype in args.dtypes:
        progress(f"searching the largest {name} {dtype} train batch that fits ...")
        emit(
            {
                **common,
                "model": name,
                "mode": "train",
                "dtype": dtype,
                "largest_batch": largest_train_batch(name, dtype, args.aggregation),
            }
        )


def largest_train_batch(name: str, dtype: str, aggregation: str, start: int = 256) -> int:
  """Largest power-of-two-then-bisected training batch that fits in device memory."""

  def fits(b: int) -> bool:
    progress(f"  trying batch {b} ...")
    return _try(lambda: run_jax("train", name, b, dtype, aggregation, 1, 1))

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


def _torch_importable() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


if __name__ == "__main__":
  main()
