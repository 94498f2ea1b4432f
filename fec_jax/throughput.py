"""The paper's throughput protocol (as in the Swin/PoolFormer scripts it cites): batch 256,
20 warm-up iterations, a synchronizing wait, then the mean over 100 iterations."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax

BATCH, WARMUP, ITERS = 256, 20, 100


def measure(step: Callable[[Any], Any], carry: Any, warmup: int = WARMUP, iters: int = ITERS,
            sync: Callable[[Any], Any] = jax.block_until_ready) -> float:
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
