"""The examples run as users run them (torchrun on 2 CPU ranks)."""
import os
import subprocess
import sys

import pytest

from distributed import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_train_gpt2_example_matches_single_process():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.join(ROOT, "examples", "train_gpt2.py"), "--steps", "4"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "largest loss difference over 4 steps" in out.stdout
    assert "colwise" in out.stdout and "reduce_scatter" in out.stdout
