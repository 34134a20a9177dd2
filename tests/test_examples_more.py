"""examples/compile_gpt2.py, explain_llama7b.py and pareto_plot.py run as users run them."""
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

from distributed import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _example(name: str) -> str:
    return os.path.join(ROOT, "examples", name)


def _run(cmd: list, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _figure(text: str, label: str) -> float:
    return float(re.search(re.escape(label) + r"[^:]*: ([0-9.e+-]+)", text).group(1))


@pytest.mark.timeout(240)
def test_compile_gpt2_example_matches_eager_with_collectives_in_the_graphs():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                _example("compile_gpt2.py"), "--steps", "2"], timeout=220).stdout
    assert _figure(out, "largest loss difference over 2 steps") <= 1e-5
    assert _figure(out, "largest gradient difference (step 1") <= 2e-5
    counts = re.search(r"collectives in compiled forward: (\d+), backward: (\d+)", out)
    assert int(counts.group(1)) > 0 and int(counts.group(2)) > 0, out
    assert "reduce_scatter_tensor" in out and "all_gather_into_tensor" in out
    assert "autoseqpar report: GPT2LMHeadModel, tp=2" in out


@pytest.mark.timeout(120)
def test_explain_llama7b_example_is_fast_and_reports_every_layer():
    start = time.perf_counter()
    out = _run([sys.executable, _example("explain_llama7b.py")], timeout=110).stdout
    seconds = time.perf_counter() - start
    assert seconds < 60, f"explain_llama7b.py took {seconds:.1f} s"
    assert "6,738,415,616 parameters" in out
    assert "Saved activations per layer per rank" in out
    assert re.search(r"^layer\s+attention\s+mlp\s+norms\s+masks\s+other\s+total", out, re.M)
    rows = re.findall(r"^model\.layers\.(\d+)\s", out, re.M)
    assert sorted(map(int, rows)) == list(range(32)), rows
    assert "Largest saved activations per rank" in out


@pytest.mark.timeout(180)
def test_pareto_plot_example_prints_the_curve_and_writes_a_png(tmp_path):
    png = tmp_path / "pareto.png"
    out = _run([sys.executable, _example("pareto_plot.py"), "--out", str(png), "--points", "4"],
               timeout=170, cwd=tmp_path).stdout
    assert "saved per rank (exact)" in out and "recompute us (estimate, h100)" in out
    for policy in ("none", "paper", "full", "auto"):
        assert re.search(rf"^{policy}\s", out, re.M), out
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install 'autoseqpar[plot]'" in out
    pytest.importorskip("matplotlib")
    assert f"plot written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
