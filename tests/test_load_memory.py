"""Loading in the "stored" weight mode touches no tensor data: the anonymous memory a fresh interpreter gains by
``nemo_scratch.load`` of a checkpoint of more than 1 GiB stays under 64 MiB plus its small tensors.

The checkpoint is cheap to make: the tiny preset's layers at width d = 1024 with a vocabulary of 2^18, so the
embedding and lm_head (BF16, 2 x 2^18 x 1024 x 2 bytes = 1 GiB) are almost all of it. They sit in a shard of
their own whose data section is a sparse run of zero bytes (written by seeking, never by writing 1 GiB); the
other tensors are random_tensors' values in a second shard (write_safetensors). RssAnon (/proc/self/status) is
read in the same subprocess before the load, after importing numpy and nemo_scratch, and after it.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_scratch.checkpoint.reader import CONFIG, INDEX
from nemo_scratch.checkpoint.safetensors_io import _header, write_safetensors
from nemo_scratch.checkpoint.stream import F32_SUFFIXES, METADATA
from nemo_scratch.checkpoint.writer import random_tensors
from nemo_scratch.config import preset

VOCAB, WIDTH = 2**18, 1024
BIG = ("backbone.embeddings.weight", "lm_head.weight")
SLACK = 64 * 2**20

PROBE = """
import json, sys
import nemo_scratch
import nemo_scratch.checkpoint, nemo_scratch.model.model, nemo_scratch.model.weights   # what load imports
import nemo_scratch.memory


def rss_anon():
    return nemo_scratch.memory.proc_bytes("/proc/self/status", ("RssAnon",))["RssAnon"]


before = rss_anon()
model = nemo_scratch.load(sys.argv[1], weights="stored")
print(json.dumps({"before": before, "after": rss_anon(), "weights": model.info["weights"]}))
"""


def write_sparse_shard(path, names, shape):
    """A safetensors file of BF16 tensors ``names``, each ``shape``, all zeros: the writer's header, then a hole."""
    text, sizes = _header(path, [(name, "BF16", shape) for name in names], METADATA)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + sum(sizes))              # the data: a sparse run of zeros
    return sum(sizes)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("big") / "ckpt"
    directory.mkdir()
    cfg = preset("tiny", vocab_size=VOCAB, hidden_size=WIDTH, num_nextn_predict_layers=0)
    small = random_tensors(preset("tiny", vocab_size=8, hidden_size=WIDTH, num_nextn_predict_layers=0))
    small = {name: value for name, value in small.items() if name not in BIG}
    write_safetensors(directory / "small.safetensors", {name: (value, "F32" if name.endswith(F32_SUFFIXES)
                                                               else "BF16") for name, value in small.items()},
                      METADATA)
    big_bytes = write_sparse_shard(directory / "vocab.safetensors", BIG, (VOCAB, WIDTH))
    weight_map = {**{name: "small.safetensors" for name in small}, **{name: "vocab.safetensors" for name in BIG}}
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / CONFIG).write_text(json.dumps(cfg.to_dict()))
    small_f32 = sum(4 * value.size for value in small.values())   # every other tensor, even decoded to float32
    return directory, big_bytes, small_f32


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc/self/status (Linux)")
def test_stored_load_of_a_1gib_checkpoint_grows_anonymous_memory_by_its_small_tensors_only(big_checkpoint):
    directory, big_bytes, small_f32 = big_checkpoint
    on_disk = sum(f.stat().st_size for f in directory.iterdir())
    assert big_bytes >= 2**30 and on_disk >= 2**30
    proc = subprocess.run([sys.executable, "-c", PROBE, str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(proc.stdout)
    assert run["weights"] == "stored"
    grown = run["after"] - run["before"]
    assert grown < SLACK + small_f32, (f"RssAnon grew by {grown / 2**20:.1f} MiB on a {on_disk / 2**30:.2f} GiB "
                                       f"checkpoint; allowed {(SLACK + small_f32) / 2**20:.1f} MiB")
