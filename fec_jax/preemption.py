"""Preemption: SIGTERM (what Cloud TPU/GPU schedulers send before evicting a VM) or SIGINT
(Ctrl-C) asks the training loop to stop cleanly: finish the current step, write a checkpoint,
wait for it, exit 0. A second signal exits at once.

Several processes must stop at the same step (each saves its share of the same checkpoint), but
a signal may reach only some of them: the processes agree on "stop" with an all-gather of the
signal each received (or none) every SYNC_EVERY_STEPS steps, and every SYNC_EVERY_STEPS batches
of an evaluation (which they run together); with one process the flag is read at every step and
batch. (JAX's own `multihost_utils.reached_preemption_sync_point` listens to SIGTERM only and
needs the coordination service's notifier; this agreement also covers SIGINT and one-process
runs.)
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# multi-process: an all-gather (and a wait for the device) this often, in steps or eval batches
SYNC_EVERY_STEPS = 10


class Preemption:
  """Context manager: installs the handlers (main thread only), restores the old ones on exit.

  with Preemption() as preemption:
    for step in ...:
      ...
      if preemption.stop_now(step):
        save, wait, return
  """

  def __init__(self):
    self.signal_name: str | None = None  # the first signal this process received
    self._peer_signal: str | None = None  # one that only another process received
    self._previous = {}
    # what a first signal makes this process do, as the handler says it
    self._on_signal = "finishing the current step, then saving a checkpoint"

  @property
  def reason(self) -> str | None:
    """Why the run stops: 'SIGTERM', 'SIGTERM (received by another process)'; None: it does not."""
    if self.signal_name is None and self._peer_signal is not None:
      return f"{self._peer_signal} (received by another process)"
    return self.signal_name

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning("training outside the main thread: SIGTERM/SIGINT are not caught")
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      os.write(2, f"{name} again: exiting at once\n".encode())
      os._exit(128 + signum)
    self.signal_name = name
    os.write(2, f"{name} received: {self._on_signal} (send it again to exit at once)\n".encode())

  def failed(self) -> None:
    """The run failed: it trains and saves no more steps; from now on a first signal says that
    the process exits once its cleanup ends, not that it saves the current step."""
    self._on_signal = (
        "the run failed; exiting once the work under way ends: the train state's "
        "initialization, a checkpoint being written"
    )

  def stop_now(self, step: int, agree: bool = False) -> bool:
    """True when every process is to stop after `step` (a train step, or an evaluation's
    batch counted from 1; the same answer on every process). With several processes they agree
    every SYNC_EVERY_STEPS steps, and where every process passes agree=True (the run's last
    step, after an evaluation); elsewhere it is False."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    if step % SYNC_EVERY_STEPS and not agree:
      return False
    mine = signal.Signals[self.signal_name].value if self.signal_name else 0
    received = int(np.max(multihost_utils.process_allgather(np.int32(mine))))  # 0: no signal
    if received and self.signal_name is None:
      self._peer_signal = signal.Signals(received).name
    return bool(received)
