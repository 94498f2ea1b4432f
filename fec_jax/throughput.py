"""The paper's throughput protocol (as in the Swin/PoolFormer scripts it cites): batch 256,
20 warm-up iterations, a synchronizing wait, then the mean over 100 iterations; and what a
compiled program costs (memory, flops, bytes, the fusions that move the most bytes), for
programs compiled for a TPU that is not attached."""

from __future__ import annotations

import math
import re
import time
from typing import Any, Callable

import jax

BATCH, WARMUP, ITERS = 256, 20, 100


def measure(
    step: Callable[[Any], Any],
    carry: Any,
    warmup: int = WARMUP,
    iters: int = ITERS,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> float:
  """Seconds per call of `carry -> carry`: warm-up, wait for the device, then the mean of iters.

  sync(carry) waits for the device (torch timings pass torch.cuda.synchronize)."""
  for _ in range(warmup):
    carry = step(carry)
  sync(carry)
  start = time.perf_counter()
  for _ in range(iters):
    carry = step(carry)
  sync(carry)
  return (time.perf_counter() - start) / iters


# --------------------------------------------------------------------------- compiled programs

# HBM per chip (Cloud TPU system architecture pages), by jax's device_kind.
TPU_HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}

_ELEMENT_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
# An HLO array shape with its optional layout: bf16[8,56,56,128]{3,2,1,0:T(8,128)(2,1)}
_SHAPE = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([\d,]*)\](?:\{([^}]*)\})?")
# An instruction: `%name = <shape> opcode(operands), attributes`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(?:, |$)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def shape_bytes(dtype: str, dims: str, layout: str | None, padded: bool = True) -> int:
  """Bytes of one HLO array in memory: its dims padded to the layout's first tile, if any.

  The tile (e.g. TPU's T(8,128)) covers the most minor physical dims, so an f32[4096, 24] array
  with T(8,128) occupies 4096 x 128 elements. padded=False: the bytes of its elements only."""
  shape = [int(d) for d in dims.split(",") if d]
  if layout and shape and padded:
    order, _, tiling = layout.partition(":")
    minor_to_major = [int(i) for i in order.split(",") if i.strip().isdigit()]
    physical = [shape[i] for i in reversed(minor_to_major)] if minor_to_major else shape
    tile = re.match(r"T\(([\d,]+)\)", tiling)
    if tile:
      sizes = [int(t) for t in tile.group(1).split(",")]
      for k, t in enumerate(sizes[::-1], start=1):  # tile dims align with the minor dims
        if k <= len(physical):
          physical[-k] = -(-physical[-k] // t) * t
    shape = physical
  return math.prod(shape) * _ELEMENT_BYTES[dtype]


def fusion_bytes(hlo_text: str) -> list[dict[str, Any]]:
  """The fusions of an optimized HLO module (compiled.as_text()), most bytes moved first.

  Bytes moved = the sum of the (tile-padded) sizes of the fusion's operands and outputs, from the
  shapes and layouts the module prints for each instruction ("unpadded_bytes": the same without
  the tile padding); fusions nested inside fused computations are not counted again."""
  nbytes = lambda text, padded=True: sum(shape_bytes(*s, padded) for s in _SHAPE.findall(text))
  sizes, unpadded, fused, fusions, computation = {}, {}, set(), [], None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, output, opcode, operands = match.groups()
    sizes[name], unpadded[name] = nbytes(output), nbytes(output, False)
    if opcode != "fusion":
      continue
    calls = _CALLS.search(line)
    fused.add(calls.group(1) if calls else None)
    kind = re.search(r"kind=(\w+)", line)
    fusions.append(
        {
            "name": name,
            "kind": kind.group(1) if kind else "",
            "output": output,
            "operands": re.findall(r"%([\w.\-]+)", operands),
            "computation": computation,
        }
    )
  top = []
  for f in fusions:
    if f.pop("computation") not in fused:
      operands = f.pop("operands")
      f["bytes"] = sizes[f["name"]] + sum(sizes.get(o, 0) for o in operands)
      f["unpadded_bytes"] = unpadded[f["name"]] + sum(unpadded.get(o, 0) for o in operands)
      top.append(f)
  return sorted(top, key=lambda f: -f["bytes"])


def memory_report(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program (memory_analysis): arguments, outputs, temporaries
  and their total (less the outputs that alias donated arguments)."""
  m = compiled.memory_analysis()
  total = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )
  return {
      "arguments": m.argument_size_in_bytes,
      "outputs": m.output_size_in_bytes,
      "temporaries": m.temp_size_in_bytes,
      "total": total,
  }


def cost_analysis(compiled) -> dict[str, Any]:
  """XLA's cost analysis of a compiled program as one dict ('flops', 'bytes accessed', ...),
  where a jax version gives it as a list of one."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def cost_report(compiled, images: int) -> dict[str, float]:
  """Flops and bytes accessed per image of a compiled (per-device) program for `images` images."""
  cost = cost_analysis(compiled)
  return {
      "flops_per_image": float(cost["flops"]) / images,
      "bytes_accessed_per_image": float(cost["bytes accessed"]) / images,
  }
