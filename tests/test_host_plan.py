"""`plan --host`: the host memory a CPU run needs, predicted from the headers, held to a measured run.

A Nano-width slice (d 2688, 64 Mamba heads x 64, state 128, 32 q / 2 kv heads; pattern "M*", vocabulary
8192 to keep the test small) is written once; a fresh interpreter loads it in each weight mode and runs a
512-token prefill. The growth of its resident memory over the interpreter's own (VmHWM) must be at most the
prediction, and the prediction at most 25% more.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_scratch import cli
from nemo_scratch.checkpoint import make_random_checkpoint
from nemo_scratch.config import preset
from nemo_scratch.errors import PlanError
from nemo_scratch.parallel.plan import plan_host

PROBE = Path(__file__).parent / "memory_probe.py"
TOKENS = 512


@pytest.fixture(scope="module")
def nano_slice(tmp_path_factory):
    path = tmp_path_factory.mktemp("nano-slice") / "ckpt"
    cfg = preset("nano", hybrid_override_pattern="M*", vocab_size=8192, num_nextn_predict_layers=0)
    make_random_checkpoint(path, cfg, seed=0)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("weights", ["stored", "float32"])
def test_measured_host_memory_is_within_the_prediction(nano_slice, weights):
    proc = subprocess.run([sys.executable, str(PROBE), str(nano_slice), weights, str(TOKENS)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(proc.stdout)
    measured = run["prefilled"]["VmHWM"] - run["start"]["VmRSS"]
    predicted = plan_host(nano_slice, weights=weights, max_len=TOKENS, prefill_chunk=TOKENS).total_bytes
    assert measured <= predicted <= 1.25 * measured, (weights, measured, predicted)
    if weights == "stored":   # load reads headers only: nothing grew but the small tensors
        assert run["loaded"]["RssAnon"] - run["start"]["RssAnon"] < 64 * 2**20


def test_cli_prints_the_host_table(nano_slice, capsys):
    assert cli.main(["plan", "--checkpoint", str(nano_slice), "--host", "--max-len", "512",
                     "--prefill-chunk", "512"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "KV cache", "conv/SSM states", "activations", "resident peak", "allocated"):
        assert row in out
    assert "memory-mapped" in out


def test_what_must_be_allocated_is_refused_in_one_line(monkeypatch, capsys):
    from nemo_scratch import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)
    with pytest.raises(PlanError, match=r"must allocate .* \(the float32 weights"):
        plan_host("nano", "nano", weights="float32", max_len=4096, prefill_chunk=1024)
    assert plan_host("nano", "nano", weights="stored", max_len=4096, prefill_chunk=1024).fits  # mapped weights
    assert cli.main(["plan", "--preset", "nano", "--recipe", "nano", "--host", "--weights", "float32",
                     "--max-len", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: plan: a CPU run of nano must allocate")
