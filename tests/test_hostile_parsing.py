"""Hostile inputs, class 2 and 3: strict parsing, and bounds checked before anything is allocated.

Every JSON file (config.json, the index, hf_quant_config.json, a safetensors header, golden metadata) is
read with bounded size and depth: no RecursionError. Index entries are plain file names. A safetensors file
is covered exactly by its tensors (no gap, no trailing bytes; the safetensors library agrees). Symlinked
config / tokenizer / quant config files must stay inside the checkpoint. Config fields are typed, bounded
and consistent, and a config implying millions of experts or layers fails in well under a second. Each case
runs the CLI, checks the one error line and what it names, and that the checkpoint is byte-identical after.
"""

import json
import os
import shutil
import struct
import time

import numpy as np
import pytest
from hostile_helpers import assert_error, edit_json, run_cli, snapshot, tiny_checkpoint

from nemo_scratch.checkpoint import SafetensorsFile, write_safetensors
from nemo_scratch.config import NemotronConfig, preset
from nemo_scratch.errors import CheckpointError, ConfigError

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("parsing")
    return tiny_checkpoint(root / "single"), tiny_checkpoint(root / "sharded", shards=2)


@pytest.fixture
def single(pristine, tmp_path):
    return Path_copy(pristine[0], tmp_path / "single")


@pytest.fixture
def sharded(pristine, tmp_path):
    return Path_copy(pristine[1], tmp_path / "sharded")


def Path_copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def forward_error(capsys, ckpt, *fragments):
    """`forward` on a spoiled checkpoint: one error line naming the fragments; the files untouched."""
    before = snapshot(ckpt)
    line = assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1,2"), *fragments)
    assert snapshot(ckpt) == before
    return line


def nested(depth):
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------------------------------- JSON

@pytest.mark.parametrize("target", ["config.json", INDEX, "hf_quant_config.json"])
def test_deeply_nested_json_files(sharded, capsys, target):
    path = sharded / target
    text = path.read_text() if path.exists() else '{"producer": {}}'
    path.write_text(text.rstrip()[:-1] + f', "deep": {nested(100000)}}}')
    forward_error(capsys, sharded, str(path), "JSON nested too deeply (limit 64 levels)")
    path.write_text(text.rstrip()[:-1] + f', "deep": {nested(65)}}}')      # parses, but deeper than the limit
    forward_error(capsys, sharded, str(path), "nested 66 levels deep")


def test_deeply_nested_safetensors_header(tmp_path, capsys):
    header = ('{"__metadata__": {"format": "pt"}, "x": ' + nested(5000) + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="corrupt header: UTF-8 JSON nested too deeply"):
        SafetensorsFile(path)
    assert_error(run_cli(capsys, "golden", "--check", path), str(path), "corrupt header: UTF-8 JSON nested too")


@pytest.mark.parametrize("text, fragment", [
    ('{"hybrid_override_pattern": "M", "hidden_size": 1' + "0" * 5000 + "}", "not valid JSON"),
    ('{"hybrid_override_pattern": "M", "hybrid_override_pattern": "E"}', "appears twice"),
    ("\xff\xfe{}", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (b'\xef\xbb\xbf{"hybrid_override_pattern": "M"}', "not valid JSON"),
    ("", "not valid JSON"),
])
def test_malformed_config_json(single, capsys, text, fragment):
    (single / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode("latin-1"))
    forward_error(capsys, single, str(single / "config.json"), fragment)


@pytest.mark.parametrize("quant, fragment", [
    ({"quantization": {"quant_algo": "NVFP4", "exclude_modules": ["x*"] * 5000}}, "lists 5000 patterns"),
    ({"quantization": {"quant_algo": "NVFP4", "group_size": 32}}, "group_size' is 32"),
    ({"quantization": {"quant_algo": "INT3"}}, "'quantization.quant_algo' is 'INT3'"),
    ({"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a": 7}}}, "quantized_layers['a']"),
    ({"quantization": 12}, "'quantization' must be a JSON object"),
])
def test_malformed_quant_configs(single, capsys, quant, fragment):
    (single / "hf_quant_config.json").write_text(json.dumps(quant))
    forward_error(capsys, single, str(single / "hf_quant_config.json"), fragment)


def test_oversized_config_json(single, capsys):
    (single / "config.json").write_text('{"pad": "' + " " * (17 * 2**20) + '"}')
    forward_error(capsys, single, str(single / "config.json"), "exceeds the limit")


# ---------------------------------------------------------------------------------------------- index entries

@pytest.mark.parametrize("value, fragment", [
    (7, "not a non-empty string"), (["model-00001-of-00002.safetensors"], "not a non-empty string"),
    (None, "not a non-empty string"), ("", "not a non-empty string"), ("a\0b.safetensors", "NUL"),
    ("sub/model.safetensors", "path separator"), ("..\\outside.safetensors", "climbs out"),
    ("x" * 300 + ".safetensors", "longer than"), ("/etc/passwd", "absolute path"),
])
def test_malformed_index_entries(sharded, capsys, value, fragment):
    edit_json(sharded / INDEX, lambda index: index["weight_map"].update({"lm_head.weight": value}))
    forward_error(capsys, sharded, str(sharded / INDEX), "'lm_head.weight'", fragment)


@pytest.mark.parametrize("weight_map", [[], {}, "model.safetensors", None])
def test_index_without_a_weight_map(sharded, capsys, weight_map):
    edit_json(sharded / INDEX, lambda index: index.update(weight_map=weight_map))
    forward_error(capsys, sharded, str(sharded / INDEX), "weight_map")


# ---------------------------------------------------------------------------------------------- safetensors

def _raw(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


F4 = {"dtype": "F32", "shape": [1]}
COVERAGE = {  # name -> (header, data bytes, fragment of our error)
    "trailing": ({"x": {**F4, "data_offsets": [0, 4]}}, b"\0" * 5, "1 trailing bytes"),
    "gap_first": ({"x": {**F4, "data_offsets": [4, 8]}}, b"\0" * 8, "gap of 4 bytes"),
    "gap_between": ({"x": {**F4, "data_offsets": [0, 4]}, "y": {**F4, "data_offsets": [8, 12]}}, b"\0" * 12,
                    "gap of 4 bytes after tensor 'x'"),
    "empty_trailing": ({}, b"\0", "1 trailing bytes"),
}


@pytest.mark.parametrize("case", sorted(COVERAGE))
def test_safetensors_not_fully_covered(tmp_path, capsys, case):
    header, data, fragment = COVERAGE[case]
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=fragment):
        SafetensorsFile(path)
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors library is the oracle of these rules")
    with pytest.raises(Exception):   # the library refuses the same file
        st.load_file(path)
    ok = _raw(tmp_path / "ok.safetensors", {"x": {**F4, "data_offsets": [0, 4]}}, b"\0" * 4)
    assert SafetensorsFile(ok).get("x").shape == (1,) and st.load_file(ok)["x"].shape == (1,)


def test_trailing_bytes_in_a_checkpoint_shard(sharded, capsys):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b"garbage")
    forward_error(capsys, sharded, str(shard), "7 trailing bytes")


def test_unreadable_and_odd_files(single, capsys):
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").mkdir()
    forward_error(capsys, single, str(single / "model.safetensors"), "is a directory")
    os.rmdir(single / "model.safetensors")
    os.symlink("model.safetensors", single / "model.safetensors")      # a symlink loop
    forward_error(capsys, single, str(single / "model.safetensors"), "cannot be resolved")
    (single / "model.safetensors").unlink()
    (single / "config.json").rename(single / "real.json")
    (single / "config.json").mkdir()
    forward_error(capsys, single, str(single / "config.json"), "is a directory")


# ---------------------------------------------------------------------------------------------- symlinks

@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "hf_quant_config.json"])
def test_symlinks_leading_out_of_the_checkpoint(single, tmp_path, capsys, name):
    outside = tmp_path / f"outside-{name}"
    shutil.copy(single / "config.json", outside)
    if (single / name).exists():
        (single / name).unlink()
    os.symlink(outside, single / name)
    forward_error(capsys, single, name, "outside the checkpoint")


def test_symlinks_inside_the_checkpoint_are_fine(single, capsys):
    (single / "config.json").rename(single / "real-config.json")
    os.symlink("real-config.json", single / "config.json")
    assert run_cli(capsys, "forward", "--checkpoint", single, "--ids", "1").code == 0


# ---------------------------------------------------------------------------------------------- config fields

BAD_FIELDS = [
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ({"use_conv_bias": 1}, "'use_conv_bias' must be true or false"),
    ({"num_hidden_layers": 9}, "'num_hidden_layers' is 9 but the layer pattern has 6"),
    ({"layer_norm_epsilon": float("inf")}, "'layer_norm_epsilon' must be a finite number"),
    ({"layer_norm_epsilon": float("nan")}, "'layer_norm_epsilon' must be a finite number"),
    ({"routed_scaling_factor": -2.5}, "'routed_scaling_factor' must be a finite number > 0"),
    ({"time_step_limit": [float("nan"), 1.0]}, "'time_step_limit'"),
    ({"time_step_min": 0.5, "time_step_max": 0.1}, "'time_step_min'"),
    ({"hidden_size": True}, "'hidden_size' must be a number"),
    ({"hidden_size": 32.5}, "'hidden_size' must be an integer"),
    ({"hidden_size": "32"}, "'hidden_size' must be a number"),
    ({"torch_dtype": 16}, "'torch_dtype' must be a string"),
    ({"mlp_hidden_act": "gelu"}, "'mlp_hidden_act' is 'gelu'"),
    ({"attention_bias": True}, "'attention_bias' is True"),
    ({"mtp_hybrid_override_pattern": None, "mtp_layers_block_type": []}, "'mtp_layers_block_type'"),
    ({"hybrid_override_pattern": ["M", 7]}, "'hybrid_override_pattern'"),
]


@pytest.mark.parametrize("change, fragment", BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_contradictory_or_mistyped_config_fields(single, capsys, change, fragment):
    edit_json(single / "config.json", lambda cfg: cfg.update(change))
    forward_error(capsys, single, str(single / "config.json"), fragment)


def test_foreign_model_type_is_one_warning_line(single, capsys):
    edit_json(single / "config.json", lambda cfg: cfg.update(model_type="llama"))
    result = run_cli(capsys, "forward", "--checkpoint", single, "--ids", "1")
    assert result.code == 0
    assert result.err.strip().splitlines() == [f"warning: {single / 'config.json'}: field 'model_type' is 'llama', "
                                                "expected 'nemotron_h'; reading it as a Nemotron-H config"]


@pytest.mark.parametrize("change, fragment", [
    ({"n_routed_experts": 5_000_000}, "'n_routed_experts' is 5000000"),
    ({"hybrid_override_pattern": "ME" * 5_000_000}, "more than the bound"),
    ({"layers_block_type": ["mamba"] * 1_000_000}, "more than the bound"),
    ({"vocab_size": 10**12}, "'vocab_size'"),
    ({"hidden_size": 2**60}, "'hidden_size'"),
    ({"n_routed_experts": 16384, "moe_intermediate_size": 2**20, "hidden_size": 2**16, "hybrid_override_pattern":
      "E" * 64, "num_hidden_layers": 64}, "parameters"),
])
def test_sizes_are_bounded_before_anything_is_built(single, capsys, change, fragment):
    edit_json(single / "config.json", lambda cfg: cfg.update(change))
    start = time.perf_counter()
    forward_error(capsys, single, fragment)
    assert time.perf_counter() - start < 1.0
    raw = json.loads((single / "config.json").read_text())
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=fragment):
        NemotronConfig.from_dict(raw, source="api")
    assert time.perf_counter() - start < 1.0


def test_presets_still_fit_the_bounds():
    for name in ("tiny", "small", "nano", "super", "ultra"):
        cfg = preset(name)
        assert NemotronConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


# ---------------------------------------------------------------------------------------------- golden files

@pytest.fixture(scope="module")
def golden_file(tmp_path_factory):
    from nemo_scratch.golden import write_golden

    return write_golden("rms_norm", "b=1,t=3,d=16", tmp_path_factory.mktemp("g") / "rms.safetensors")


def _respoil(src, dst, meta=None, drop=None, replace=None):
    f = SafetensorsFile(src)
    tensors = {k: (np.array(f.get(k)), f.dtype_of(k)) for k in f.keys() if k != drop}
    tensors.update(replace or {})
    return write_safetensors(dst, tensors, metadata={**f.metadata, **(meta or {})})


@pytest.mark.parametrize("spoil, fragment", [
    (dict(meta={"static": "{not json"}), "metadata 'static'"),
    (dict(meta={"static": nested(10000)}), "metadata 'static': JSON nested too deeply"),
    (dict(meta={"static": '{"eps": "tiny"}'}), "metadata 'static'"),
    (dict(meta={"dims": '{"b": 1, "t": -3, "d": 16}'}), "metadata 'dims'"),
    (dict(meta={"tolerance_key": "nope"}), "'tolerance_key'"),
    (dict(meta={"op": "no_such_op"}), "golden file of op 'no_such_op'"),
    (dict(drop="in.weight"), "expected in.<arg>"),
    (dict(replace={"in.x": (np.zeros((1, 3, 16), np.float32), "F32")}), "'in.x' is F32, expected F64"),
    (dict(replace={"in.x": (np.zeros((1, 4, 16)), "F64")}), "'in.x' has shape [1, 4, 16]"),
    (dict(replace={"in.bogus": (np.zeros(2), "F64")}), "'in.bogus' is not an input"),
])
def test_malformed_golden_files(golden_file, tmp_path, capsys, spoil, fragment):
    bad = _respoil(golden_file, tmp_path / "bad.safetensors", **spoil)
    before = bad.read_bytes()
    assert_error(run_cli(capsys, "golden", "--check", bad), str(bad), fragment)
    assert bad.read_bytes() == before
