"""Session fixtures of the training tests (test_train_loop.py, test_train_runs.py and others):
each pytest-xdist worker that runs one of them computes them once."""

import jax
import pytest

from tests.train_fixture import STEPS, tiny, train


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> str:
  """A persistent compilation cache: training runs with the same shapes compile once."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory, compilation_cache) -> str:
  """An uninterrupted 6-step demo run on this process's devices (tests.train_fixture.tiny)."""
  workdir = tmp_path_factory.mktemp("reference")
  result = train(tiny(), workdir)
  assert result.step == STEPS and not result.preempted
  return str(workdir)
