"""One code style for the repository: pyink, with the settings in pyproject.toml, leaves every
Python file (tests included) as it is. Run `pyink .` to format."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_python_file_is_formatted():
  out = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--diff", "."],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
