"""bench/cpu_gemv.py and bench/memory_scale.py at toy sizes: they run, measure both sides, and say which path
the backend takes; the recorded figures (docs/benchmarks.md) come from their full runs, not from here."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import memory_scale  # noqa: E402

import nemo_scratch  # noqa: E402
from nemo_scratch.ops import quant_fast  # noqa: E402


def test_cpu_gemv_times_the_kernel_and_the_tiles_and_names_the_path():
    # a fresh interpreter: the script sizes the thread pools of the process it runs in
    m_tiles = quant_fast.GEMV_ROWS + 1
    proc = subprocess.run([sys.executable, str(BENCH / "cpu_gemv.py"), "--threads", "1", "--rows", f"1,{m_tiles}",
                           "--shapes", "expert", "--formats", "bf16,nvfp4", "--repeats", "1", "--bandwidth-mib",
                           "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"memory bandwidth: sum \(read\) [\d.]+ GB/s, copy \(read \+ write\) [\d.]+ GB/s", out)
    rows = re.findall(r"^expert +\[ *1856 x 2688\] (\w+) +m=(\d+) +kernel +([\d.]+) ms .* ratio +([\d.]+) +"
                      r"\(the backend runs: (\w+) *\)", out, flags=re.M)
    assert len(rows) == 4
    for fmt, m, ms, ratio, path in rows:
        assert float(ms) > 0 and float(ratio) > 0
        assert path == ("kernel" if int(m) <= quant_fast.GEMV_ROWS else "tiles"), (fmt, m, path)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets VmHWM through /proc (Linux)")
@pytest.mark.parametrize("kind", ["stored", "float32"])
def test_memory_scale_probe_reports_every_phase(capsys, kind):
    args = SimpleNamespace(threads=1, prefill=8, decode=2, prefill_chunk=None)
    assert memory_scale.probe(kind, nemo_scratch.DEFAULT_CHECKPOINT, args) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run["kind"] == kind and run["weights"] == kind
    for phase in ("load", "prefill", "decode"):
        assert run[phase]["seconds"] > 0 and run[phase]["peak_rss"] >= 0 and run[phase]["peak_anon"] >= 0
    assert run["prefill_tok_s"] > 0 and run["again_tok_s"] > 0 and run["decode_tok_s"] > 0


def test_memory_scale_ratios_read_both_prefills_and_the_decode():
    text = memory_scale.ratios({"prefill_tok_s": 300, "again_tok_s": 400, "decode_tok_s": 30},
                               {"prefill_tok_s": 200, "again_tok_s": 500, "decode_tok_s": 10})
    assert text == "prefill 1.50x, prefill again 0.80x, decode 3.00x"
