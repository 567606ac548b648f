"""Every way a checkpoint can be bad raises a nemo_scratch error naming the file and the tensor at fault:
corrupt or truncated safetensors, path traversal through the index, missing / unexpected / misshaped
tensors, unsupported dtypes, config mismatches, partial MTP heads, and bad arguments to the writers."""

import json
import os

import numpy as np
import pytest

from nemo_scratch.checkpoint import (SafetensorsFile, load_tensors, open_checkpoint, random_tensors,
                                     write_checkpoint, write_safetensors)
from nemo_scratch.config import preset
from nemo_scratch.errors import CheckpointError, ConfigError, InputError
from nemo_scratch.ops.quant import NVFP4Weight

TINY = preset("tiny")


@pytest.fixture(scope="module")
def weights():
    return random_tensors(TINY, seed=0)


@pytest.fixture
def stored(weights):
    """{name: (array, "F32")}: a valid tiny checkpoint's tensors, to spoil one by one."""
    return {name: (value, "F32") for name, value in weights.items()}


def save(directory, stored, cfg=TINY):
    directory.mkdir(parents=True, exist_ok=True)
    cfg.save(directory)
    write_safetensors(directory / "model.safetensors", stored)
    return directory


def raises(exc_type, call, *needles):
    """Assert ``call()`` raises ``exc_type`` whose message contains every needle (file, tensor, ...)."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in: {message}"
    return message


def raw_file(path, header, data=b"", length=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


# ---------------------------------------------------------------------------------------------- safetensors

def test_truncated_file(tmp_path):
    path = write_safetensors(tmp_path / "t.safetensors", {"a": (np.ones(4, np.float32), "F32"),
                                                          "b": (np.ones(4, np.float32), "F32")})
    path.write_bytes(path.read_bytes()[:-3])
    raises(CheckpointError, lambda: SafetensorsFile(path), path, "'b'", "truncated")
    path.write_bytes(b"\x10\x00")
    raises(CheckpointError, lambda: SafetensorsFile(path), path, "truncated")


def test_header_length_past_the_end(tmp_path):
    path = raw_file(tmp_path / "h.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                    b"\0" * 4, length=10**6)
    raises(CheckpointError, lambda: SafetensorsFile(path), path, "header length", "1000000")


@pytest.mark.parametrize("header, needle", [(b'{"a": {"dtype"', "not valid UTF-8 JSON"),
                                            (b"\xff\xfe", "not valid UTF-8 JSON"),
                                            (b"[1, 2]", "a JSON list"),
                                            (b'{"a": 1, "a": 2}', "'a' appears twice"),
                                            (b'{"__metadata__": {"k": 1}}', "__metadata__")])
def test_corrupt_header(tmp_path, header, needle):
    path = raw_file(tmp_path / "c.safetensors", header)
    raises(CheckpointError, lambda: SafetensorsFile(path), path, "corrupt header", needle)


@pytest.mark.parametrize("entry, needle", [
    ({"dtype": "F8_E5M2", "shape": [2], "data_offsets": [0, 2]}, "unsupported dtype 'F8_E5M2'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "corrupt shape"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "corrupt shape"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "corrupt shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8]}, "corrupt data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "begin is past end"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}, "past the end of the data section"),
    ({"dtype": "F32", "shape": [2]}, "expected an object with 'dtype', 'shape' and 'data_offsets'"),
])
def test_corrupt_entry_names_file_and_tensor(tmp_path, entry, needle):
    path = raw_file(tmp_path / "e.safetensors", {"weird.tensor": entry}, b"\0" * 16)
    raises(CheckpointError, lambda: SafetensorsFile(path), path, "'weird.tensor'", needle)


def test_overlapping_offsets(tmp_path):
    header = {"first": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "second": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path = raw_file(tmp_path / "o.safetensors", header, b"\0" * 12)
    raises(CheckpointError, lambda: SafetensorsFile(path), path, "'first'", "'second'", "overlap")


def test_write_safetensors_rejects_bad_input(tmp_path):
    path = tmp_path / "w.safetensors"
    raises(CheckpointError, lambda: write_safetensors(path, {"x": (np.ones(2), "F8_E5M2")}), path, "'x'", "F8_E5M2")
    raises(CheckpointError, lambda: write_safetensors(path, {"x": np.ones(2)}), path, "'x'", "pair")
    raises(CheckpointError, lambda: write_safetensors(path, {"x": (np.ones(2, np.int32), "BF16")}), path, "'x'", "float")
    raises(CheckpointError, lambda: write_safetensors(path, {"__metadata__": (np.ones(2), "F32")}), "__metadata__")
    raises(CheckpointError, lambda: write_safetensors(path, {}, metadata={"n": 1}), path, "metadata")
    raises(CheckpointError, lambda: write_safetensors(tmp_path / "no" / "w.safetensors", {}), "cannot write")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- directories

def test_missing_config_json(tmp_path, stored):
    write_safetensors(tmp_path / "model.safetensors", stored)
    raises(CheckpointError, lambda: load_tensors(tmp_path), tmp_path / "config.json", "not found")
    raises(CheckpointError, lambda: open_checkpoint(tmp_path / "nowhere"), tmp_path / "nowhere", "does not exist")
    (tmp_path / "config.json").write_text("{not json")
    raises(ConfigError, lambda: open_checkpoint(tmp_path), tmp_path / "config.json", "not valid JSON")


def test_no_safetensors_file(tmp_path):
    TINY.save(tmp_path)
    raises(CheckpointError, lambda: open_checkpoint(tmp_path), tmp_path, "no model.safetensors")


@pytest.fixture
def sharded(tmp_path, weights):
    directory = write_checkpoint(tmp_path / "ckpt", TINY, weights, shards=2)
    index_path = directory / "model.safetensors.index.json"
    return directory, index_path, json.loads(index_path.read_text())


def _point(index_path, index, tensor, file_name):
    index["weight_map"][tensor] = file_name
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("escape", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_entry_escaping_the_directory(sharded, escape, stored):
    directory, index_path, index = sharded
    outside = write_safetensors(directory.parent / "outside.safetensors", {"lm_head.weight": stored["lm_head.weight"]})
    escape = str(outside) if escape == "ABSOLUTE" else escape
    _point(index_path, index, "lm_head.weight", escape)
    message = raises(CheckpointError, lambda: load_tensors(directory), index_path, "'lm_head.weight'", escape)
    assert ("absolute path" if escape == str(outside) else "'..'") in message


def test_symlink_escaping_the_directory(sharded, stored):
    directory, index_path, index = sharded
    outside = write_safetensors(directory.parent / "elsewhere.safetensors", {"lm_head.weight": stored["lm_head.weight"]})
    os.symlink(outside, directory / "link.safetensors")
    _point(index_path, index, "lm_head.weight", "link.safetensors")
    raises(CheckpointError, lambda: open_checkpoint(directory), index_path, "'lm_head.weight'", "outside the checkpoint")


def test_hub_cache_symlinks_are_allowed(tmp_path, weights):
    repo = tmp_path / "models--nvidia--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    write_checkpoint(blobs, TINY, weights)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (blobs / name).rename(blobs / f"sha-{name}")
        os.symlink(f"../../blobs/sha-{name}", snapshot / name)
    assert load_tensors(snapshot)[1].keys() == weights.keys()


def test_index_and_shards_disagree(sharded):
    directory, index_path, index = sharded
    shard2 = "model-00002-of-00002.safetensors"
    moved = next(n for n, f in index["weight_map"].items() if f != shard2)
    _point(index_path, dict(index, weight_map=dict(index["weight_map"])), moved, shard2)
    raises(CheckpointError, lambda: open_checkpoint(directory), index_path, repr(moved), "has no such tensor")
    del index["weight_map"][moved]
    index_path.write_text(json.dumps(index))
    raises(CheckpointError, lambda: open_checkpoint(directory), index_path, repr(moved), "does not list it")
    _point(index_path, index, moved, "model-00009-of-00002.safetensors")
    raises(CheckpointError, lambda: open_checkpoint(directory), index_path, repr(moved), "not found")
    index_path.write_text(json.dumps({"weight_map": []}))
    raises(CheckpointError, lambda: open_checkpoint(directory), index_path, "weight_map")


def test_tensor_stored_twice(tmp_path, stored):
    directory = save(tmp_path, stored)
    write_safetensors(directory / "extra.safetensors", {"lm_head.weight": stored["lm_head.weight"]})
    raises(CheckpointError, lambda: open_checkpoint(directory), "'lm_head.weight'", "extra.safetensors",
           "model.safetensors", "stored twice")
    (directory / "extra.safetensors").unlink()
    write_safetensors(directory / "model.safetensors", {**stored, "model.norm_f.weight": stored["backbone.norm_f.weight"]})
    raises(CheckpointError, lambda: load_tensors(directory), "'backbone.norm_f.weight'", "'model.norm_f.weight'",
           "stored twice")


# ---------------------------------------------------------------------------------------------- validation

def test_missing_tensor(tmp_path, stored):
    del stored["backbone.layers.3.mixer.up_proj.weight"]
    raises(CheckpointError, lambda: load_tensors(save(tmp_path, stored)), tmp_path / "model.safetensors",
           "missing tensor 'backbone.layers.3.mixer.up_proj.weight'", "[48, 32]", "layer 3 (mlp)")


def test_unexpected_tensor(tmp_path, stored):
    stored["backbone.layers.0.mixer.bogus.weight"] = (np.ones(3, np.float32), "F32")
    raises(CheckpointError, lambda: load_tensors(save(tmp_path, stored)), tmp_path / "model.safetensors",
           "'backbone.layers.0.mixer.bogus.weight'", "unexpected")


def test_wrong_shape(tmp_path, stored):
    stored["backbone.layers.1.mixer.q_proj.weight"] = (np.ones((32, 31), np.float32), "F32")
    raises(CheckpointError, lambda: load_tensors(save(tmp_path, stored)), tmp_path / "model.safetensors",
           "'backbone.layers.1.mixer.q_proj.weight'", "[32, 31]", "expected [32, 32]", "num_attention_heads")


def test_unsupported_dtype(tmp_path, stored):
    stored["backbone.layers.3.mixer.down_proj.weight"] = (np.ones((32, 48), np.int32), "I32")
    raises(CheckpointError, lambda: load_tensors(save(tmp_path, stored)), tmp_path / "model.safetensors",
           "'backbone.layers.3.mixer.down_proj.weight'", "unsupported dtype I32")


def test_config_disagreeing_with_the_weights(tmp_path, stored):
    directory = save(tmp_path, stored, cfg=TINY.replace(hidden_size=64))
    raises(CheckpointError, lambda: load_tensors(directory), tmp_path / "model.safetensors",
           "'backbone.embeddings.weight'", "[256, 32]", "hidden_size = 64", "config.json")


def test_partial_mtp_head(tmp_path, stored):
    del stored["mtp.layers.1.final_layernorm.weight"]
    raises(CheckpointError, lambda: load_tensors(save(tmp_path, stored)), tmp_path / "model.safetensors",
           "partial MTP", "'mtp.layers.1.final_layernorm.weight'")


def test_mtp_tensors_without_mtp_in_the_config(tmp_path, stored):
    directory = save(tmp_path, stored, cfg=TINY.replace(num_nextn_predict_layers=0))
    raises(CheckpointError, lambda: load_tensors(directory), tmp_path / "model.safetensors", "'mtp.layers.0",
           "num_nextn_predict_layers = 0")


def test_bad_quantized_sets(tmp_path, stored):
    name = "backbone.layers.0.mixer.in_proj.weight"
    base, (out, cols) = name[:-len("weight")], stored[name][0].shape
    nvfp4 = {name: (np.zeros((out, cols // 2), np.uint8), "U8"),
             base + "weight_scale": (np.zeros((out, cols // 16), np.uint8), "F8_E4M3"),
             base + "weight_scale_2": (np.float32(1.0), "F32")}
    path = tmp_path / "model.safetensors"
    for change, needles in [
        ({base + "weight_scale": (np.zeros((out, 3), np.uint8), "F8_E4M3")}, [base + "weight_scale'", f"[{out}, 2]"]),
        ({base + "weight_scale_2": (np.ones(2, np.float32), "F32")}, [base + "weight_scale_2'", "F32 scalar"]),
        ({base + "weight_scale_2": (np.float32(1.0), "BF16")}, [base + "weight_scale_2'", "is BF16"]),
        ({name: stored[name]}, [base + "weight_scale", "not quantized"]),
    ]:
        raises(CheckpointError, lambda: load_tensors(save(tmp_path, {**stored, **nvfp4, **change})), path, *needles)
    orphan = {**stored, "backbone.layers.3.mixer.up_proj.input_scale": (np.float32(1.0), "F32"),
              "lm_head.weight_scale": (np.float32(1.0), "F32")}
    del orphan["lm_head.weight"]
    raises(CheckpointError, lambda: load_tensors(save(tmp_path, orphan)), path, "lm_head.weight_scale", "'lm_head.weight'")


def test_stacked_experts_of_the_wrong_rank(tmp_path, stored):
    stored["model.layers.2.mixer.experts.up_proj"] = (np.ones((8, 16), np.float32), "F32")
    raises(CheckpointError, lambda: load_tensors(save(tmp_path, stored)), tmp_path / "model.safetensors",
           "'model.layers.2.mixer.experts.up_proj'", "3 dimensions")


def test_reader_and_loader_arguments(tmp_path, stored):
    directory = save(tmp_path, stored)
    raises(InputError, lambda: load_tensors(directory, dtype="float16"), "dtype='float16'")
    raises(CheckpointError, lambda: open_checkpoint(directory).get("lm_head.weigh"), "'lm_head.weigh'",
           "did you mean 'lm_head.weight'")


def test_write_checkpoint_rejects_bad_input(tmp_path, weights):
    out = tmp_path / "out"
    partial = {n: v for n, v in weights.items() if n != "backbone.norm_f.weight"}
    raises(CheckpointError, lambda: write_checkpoint(out, TINY, partial), "missing tensor 'backbone.norm_f.weight'")
    raises(InputError, lambda: write_checkpoint(out, TINY, weights, shards=0), "shards=0")
    raises(InputError, lambda: write_checkpoint(out, TINY, weights, shards=10**6), "shards=1000000")
    raises(InputError, lambda: write_checkpoint(out, TINY, weights, float_dtype="F8"), "float_dtype='F8'")
    raises(InputError, lambda: write_checkpoint(out, TINY, weights, quant_config=["x"]), "quant_config")
    name = "backbone.layers.0.mixer.out_proj.weight"
    bad = NVFP4Weight(np.zeros((32, 16), np.uint8), np.zeros((32, 3), np.uint8), np.float32(1.0))
    raises(CheckpointError, lambda: write_checkpoint(out, TINY, {**weights, name: bad}), repr(name), "block_scale",
           "[32, 2]")
    assert not out.exists()
