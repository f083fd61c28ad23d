"""The examples run as a user runs them: a fresh Python process that starts its own local Ray.

The child does not join the session's Ray of ``conftest.py``: ``RAY_ADDRESS`` is taken out of
its environment, and the example starts a new local Ray unless ``RAY_ADDRESS`` is set.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_group_data_parallel_example_trains_two_workers_to_the_same_parameters():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "examples/group_data_parallel.py", "--workers", "2", "--steps", "60"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "2 workers hold identical parameters: True" in done.stdout, output
    found = re.search(r"test accuracy: ([\d.]+)%", done.stdout)
    assert found is not None, output
    assert float(found.group(1)) > 80.0  # 91.7% in 60 steps (sync, 2 workers); chance is 10%
