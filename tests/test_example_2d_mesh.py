"""examples/train_2d_mesh.py as users run it: torchrun on 4 CPU ranks, a (dp=2, tp=2) mesh."""
import os
import subprocess
import sys

import pytest

from distributed import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("data_parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_train_2d_mesh_example_matches_single_process(data_parallel):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.join(ROOT, "examples", "train_2d_mesh.py"), "--steps", "2", *data_parallel]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tp groups (autoseqpar) [0, 1] [2, 3]" in out.stdout
    for line in ("largest gradient difference (step 1", "largest loss difference over 2 steps",
                 "largest relative grad-norm difference (clipped",
                 "largest weight difference after training"):
        assert line in out.stdout
