"""Checkpoint I/O: safetensors round trips for every dtype, bfloat16 rounding against ml_dtypes, checkpoint
directories (single file, sharded, several files, transformers' layout, ModelOpt NVFP4/FP8), random test
checkpoints, and (marker ``oracle``) checkpoints written by transformers and the safetensors library."""

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nemo_scratch.checkpoint import (SafetensorsFile, load_tensors, make_random_checkpoint, open_checkpoint,
                                     random_tensors, to_transformers, write_checkpoint, write_safetensors)
from nemo_scratch.checkpoint.safetensors_io import bf16_to_float32, float32_to_bf16
from nemo_scratch.config import preset
from nemo_scratch.errors import CheckpointError, InputError
from nemo_scratch.ops.quant import FP8Weight, NVFP4Weight

TINY = preset("tiny")


@pytest.fixture(scope="module")
def tiny_tensors():
    return random_tensors(TINY, seed=0)


def bf16_bits(x):  # float32 [...] -> uint16 [...], the independent oracle
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


# ---------------------------------------------------------------------------------------------- safetensors

ROUND_TRIPS = [  # (dtype, values written, values expected back)
    ("F32", np.array([[1.5, -0.0], [np.inf, 3e-40]], np.float32), None),
    ("F64", np.array([1e-300, -2.5, np.nan]), None),
    ("F16", np.array([0.5, -65504.0, 6e-8], np.float32), np.array([0.5, -65504.0, 6e-8], np.float16).astype(np.float32)),
    ("F8_E4M3", np.arange(256, dtype=np.uint8).reshape(16, 16), None),
    ("U8", np.array([0, 7, 255], np.uint8), None),
    ("I8", np.array([-128, 0, 127], np.int64), np.array([-128, 0, 127], np.int8)),
    ("I16", np.array([-32768, 32767], np.int16), None),
    ("I32", np.array([[-(2**31)], [2**31 - 1]], np.int64), np.array([[-(2**31)], [2**31 - 1]], np.int32)),
    ("I64", np.array([-(2**63), 2**63 - 1], np.int64), None),
    ("BOOL", np.array([True, False, True]), None),
]


@pytest.mark.parametrize("dtype, values, expected", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_every_dtype_round_trips(tmp_path, dtype, values, expected):
    expected = values if expected is None else expected
    path = write_safetensors(tmp_path / "x.safetensors", {"t": (values, dtype), "scalar": (values.reshape(-1)[:1].reshape(()), dtype),
                                                         "empty": (values.reshape(-1)[:0].reshape(0, 3), dtype)})
    f = SafetensorsFile(path)
    assert f.keys() == ["t", "scalar", "empty"]
    assert f.dtype_of("t") == dtype and f.shape_of("t") == values.shape
    got = f.get("t")
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    assert f.get("scalar").shape == () and f.get("empty").shape == (0, 3)


def test_bf16_upcast_is_exact_for_every_bit_pattern(tmp_path):
    bits = np.arange(2**16, dtype=np.uint16)
    ours = bf16_to_float32(bits)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), bits.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32))
    # every bfloat16-representable float32 survives a BF16 write and read bit for bit (NaN stays NaN)
    path = write_safetensors(tmp_path / "bf16.safetensors", {"w": (ours.reshape(256, 256), "BF16")})
    back = SafetensorsFile(path).get("w").reshape(-1)
    finite = ~np.isnan(ours)
    np.testing.assert_array_equal(back[finite].view(np.uint32), ours[finite].view(np.uint32))
    assert np.isnan(back[~finite]).all()


F32_BITS = st.integers(0, 2**32 - 1)


@given(st.lists(F32_BITS, min_size=1, max_size=64))
@example([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F7F8000, 0x00008000, 0x80018000, 0x7F800001, 0xFFC00000])
def test_bf16_rounding_is_nearest_even_like_ml_dtypes(words):
    # the examples: ties to even (down and up), overflow to inf, a subnormal tie, NaNs with low payloads
    x = np.array(words, dtype=np.uint32).view(np.float32)
    ours = float32_to_bf16(x)
    assert ours.dtype == np.uint16 and ours.shape == x.shape
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], bf16_bits(x[~nan]))
    assert np.isnan(bf16_to_float32(ours[nan])).all()


def test_bf16_ties_round_to_even():
    upper = np.random.default_rng(1).integers(0, 0x7F7F, 4096, dtype=np.uint32) << 16
    for low in (0x7FFF, 0x8000, 0x8001):
        x = (upper | np.uint32(low)).view(np.float32)
        np.testing.assert_array_equal(float32_to_bf16(x), bf16_bits(x))


def test_header_is_padded_and_metadata_kept(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", {"a": (np.ones(3, np.float32), "BF16")},
                             metadata={"format": "pt"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and len(raw) == 8 + n + 6
    assert json.loads(raw[8:8 + n])["a"] == {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}
    assert SafetensorsFile(path).metadata == {"format": "pt"}


def test_get_views_the_file_without_copying(tmp_path):
    path = write_safetensors(tmp_path / "v.safetensors", {"w": (np.arange(12, dtype=np.float32).reshape(3, 4), "F32")})
    got = SafetensorsFile(path).get("w")
    assert not got.flags.owndata and not got.flags.writeable
    assert isinstance(got.base, np.ndarray)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "w.safetensors"
    good = {"a": (np.ones(2, np.float32), "F32")}
    write_safetensors(path, good)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"w\.safetensors: tensor 'b'"):
        write_safetensors(path, {**good, "b": (np.ones(2, np.float32), "U8")})
    with pytest.raises(CheckpointError, match=r"new\.safetensors: tensor 'c'.*do not fit I8"):
        write_safetensors(tmp_path / "new.safetensors", {"c": (np.array([300]), "I8")})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


# ---------------------------------------------------------------------------------------------- checkpoints

def test_random_tiny_checkpoint_loads_and_validates(tmp_path, tiny_tensors):
    make_random_checkpoint(tmp_path / "ckpt", TINY)
    cfg, tensors, info = load_tensors(tmp_path / "ckpt")
    assert cfg.to_dict() == TINY.to_dict()
    assert tensors.keys() == tiny_tensors.keys()
    for name, ref in tiny_tensors.items():
        assert tensors[name].dtype == np.float32 and tensors[name].shape == ref.shape, name
        np.testing.assert_array_equal(tensors[name], ref, err_msg=name)
    assert info["mtp"] is True and info["files"] == ["model.safetensors"] and info["notes"] == []
    f32 = {n for n, fmt in info["formats"].items() if fmt == "f32"}
    assert f32 == {n for n in tiny_tensors if n.endswith((".A_log", ".D", ".e_score_correction_bias"))}
    assert set(info["formats"].values()) == {"bf16", "f32"}
    _, tensors64, _ = load_tensors(tmp_path / "ckpt", dtype="float64")
    assert all(t.dtype == np.float64 and np.array_equal(t, tiny_tensors[n]) for n, t in tensors64.items())


def test_random_tensors_are_numerically_sane(tiny_tensors):
    t = tiny_tensors
    assert all(v.dtype == np.float32 for v in t.values())
    a_log = t["backbone.layers.0.mixer.A_log"]
    assert ((a_log >= 0) & (a_log <= np.log(16))).all()
    assert (t["backbone.layers.0.mixer.D"] == 1).all()
    dt = np.log1p(np.exp(t["backbone.layers.0.mixer.dt_bias"].astype(np.float64)))   # softplus
    assert ((dt >= TINY.time_step_min * 0.999) & (dt <= TINY.time_step_max * 1.001)).all()
    norm = t["backbone.layers.0.norm.weight"]
    assert not (norm == 1).all() and abs(norm.mean() - 1) < 0.1
    assert np.std(t["backbone.layers.3.mixer.down_proj.weight"]) < np.std(t["backbone.layers.3.mixer.up_proj.weight"])
    assert any(n.startswith("mtp.") for n in t)
    again = random_tensors(TINY, seed=0)
    assert all(np.array_equal(again[n], v) for n, v in t.items())
    assert not np.array_equal(random_tensors(TINY, seed=1)["lm_head.weight"], t["lm_head.weight"])


def test_sharded_equals_single_file(tmp_path, tiny_tensors):
    write_checkpoint(tmp_path / "one", TINY, tiny_tensors)
    write_checkpoint(tmp_path / "three", TINY, tiny_tensors, shards=3)
    _, one, _ = load_tensors(tmp_path / "one")
    _, three, info = load_tensors(tmp_path / "three")
    assert one.keys() == three.keys() and all(np.array_equal(one[n], three[n]) for n in one)
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert info["files"] == shards
    index = json.loads((tmp_path / "three" / "model.safetensors.index.json").read_text())
    reader = open_checkpoint(tmp_path / "three")
    assert set(index["weight_map"]) == set(reader.names()) and set(index["weight_map"].values()) == set(shards)
    sizes = [SafetensorsFile(tmp_path / "three" / s) for s in shards]
    assert index["metadata"]["total_size"] == sum(f.nbytes_of(n) for f in sizes for n in f.keys())
    assert all(len(f) > 0 for f in sizes)


def test_reader_inspects_tensor_by_tensor(tmp_path, tiny_tensors):
    write_checkpoint(tmp_path / "c", TINY, tiny_tensors, shards=2)
    r = open_checkpoint(tmp_path / "c")
    name = "backbone.layers.0.mixer.A_log"
    assert name in r and r.dtype_of(name) == "F32" and r.shape_of(name) == (TINY.mamba_num_heads,)
    assert r.dtype_of("lm_head.weight") == "BF16" and r.file_of("lm_head.weight").parent == tmp_path / "c"
    np.testing.assert_array_equal(r.get(name), tiny_tensors[name])
    assert r.config.to_dict() == TINY.to_dict() and r.quant_config is None and len(r.names()) == len(tiny_tensors)


def test_nvfp4_and_fp8_round_trip(tmp_path, tiny_tensors):
    rng = np.random.default_rng(0)
    tensors = dict(tiny_tensors)
    nvfp4_name, fp8_name = "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.2.mixer.experts.1.up_proj.weight"
    out, cols = tensors[nvfp4_name].shape
    nvfp4 = NVFP4Weight(rng.integers(0, 256, (out, cols // 2), dtype=np.uint8),
                        rng.integers(0, 0x7F, (out, cols // 16), dtype=np.uint8), np.float32(0.01), np.float32(0.5))
    fp8 = FP8Weight(rng.integers(0, 256, tensors[fp8_name].shape, dtype=np.uint8), np.array([0.02], np.float32))
    tensors[nvfp4_name], tensors[fp8_name] = nvfp4, fp8
    quant = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        nvfp4_name.removesuffix(".weight"): {"quant_algo": "NVFP4", "group_size": 16},
        fp8_name.removesuffix(".weight"): {"quant_algo": "FP8"}}}}
    write_checkpoint(tmp_path / "q", TINY, tensors, quant_config=quant)
    r = open_checkpoint(tmp_path / "q")
    base = nvfp4_name[:-len("weight")]
    assert (r.dtype_of(nvfp4_name), r.shape_of(nvfp4_name)) == ("U8", (out, cols // 2))
    assert (r.dtype_of(base + "weight_scale"), r.dtype_of(base + "weight_scale_2"), r.shape_of(base + "weight_scale_2")) \
        == ("F8_E4M3", "F32", ())
    assert r.quant_config == quant
    # config.json holds the flat form transformers and vLLM read
    assert r.raw_config["quantization_config"] == {"quant_method": "modelopt", **quant["quantization"],
                                                   "producer": quant.get("producer")}
    _, got, info = load_tensors(tmp_path / "q")
    assert info["formats"][nvfp4_name] == "nvfp4" and info["formats"][fp8_name] == "fp8"
    assert isinstance(got[nvfp4_name], NVFP4Weight) and got[nvfp4_name].shape == (out, cols)
    for field in ("packed", "block_scale", "global_scale", "input_scale"):
        np.testing.assert_array_equal(getattr(got[nvfp4_name], field), getattr(nvfp4, field))
    assert got[nvfp4_name].global_scale.shape == () and got[nvfp4_name].global_scale.dtype == np.float32
    assert isinstance(got[fp8_name], FP8Weight) and got[fp8_name].input_scale is None
    np.testing.assert_array_equal(got[fp8_name].data, fp8.data)
    assert got[fp8_name].scale == np.float32(0.02) and info["quant_config"] == quant


def test_several_files_without_index_and_ignored_kv_scales(tmp_path, tiny_tensors):
    write_checkpoint(tmp_path / "c", TINY, tiny_tensors)
    extra = {"backbone.layers.1.mixer.k_proj.k_scale": (np.float32(1.0), "F32"),
             "backbone.layers.1.mixer.v_proj.v_scale": (np.float32(1.0), "F32")}
    write_safetensors(tmp_path / "c" / "kv_scales.safetensors", extra)
    _, tensors, info = load_tensors(tmp_path / "c")
    assert info["files"] == ["kv_scales.safetensors", "model.safetensors"]
    assert info["ignored"] == sorted(extra) and tensors.keys() == tiny_tensors.keys()


@pytest.mark.parametrize("layout", ["transformers", "legacy_embedding"])
def test_transformers_names_and_stacked_experts_load(tmp_path, tiny_tensors, layout):
    if layout == "transformers":
        stored = to_transformers(tiny_tensors)   # model.*, experts stacked [e, f, l] / [e, l, f]
        assert stored["model.layers.2.mixer.experts.up_proj"].shape == (8, 16, 16)
    else:
        stored = dict(tiny_tensors)
        stored["backbone.embedding.weight"] = stored.pop("backbone.embeddings.weight")
    TINY.save(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {n: (v, "F32") for n, v in stored.items()})
    _, tensors, info = load_tensors(tmp_path)
    assert tensors.keys() == tiny_tensors.keys() and info["mtp"] is True
    assert all(np.array_equal(tensors[n], v) for n, v in tiny_tensors.items())


def test_checkpoint_without_mtp_loads_and_says_so(tmp_path, tiny_tensors):
    no_mtp = {n: v for n, v in tiny_tensors.items() if not n.startswith("mtp.")}
    write_checkpoint(tmp_path / "c", TINY, no_mtp)
    cfg, tensors, info = load_tensors(tmp_path / "c")
    assert cfg.num_nextn_predict_layers == 1 and info["mtp"] is False and tensors.keys() == no_mtp.keys()
    assert "no mtp.* tensor" in info["notes"][0]


def test_overwrite_policy(tmp_path, tiny_tensors):
    """A non-empty destination is refused without overwrite=True; with it, the directory is replaced as a whole
    (a stale shard, index, quant config or notes file of the old one cannot survive next to the new weights)."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=str(foreign)):
        write_checkpoint(foreign, TINY, tiny_tensors)
    assert (foreign / "notes.txt").read_text() == "mine"
    write_checkpoint(foreign, TINY, tiny_tensors, overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json", "model.safetensors"]
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, TINY, tiny_tensors, shards=3, quant_config={"quantization": {}})
    with pytest.raises(InputError, match="overwrite=True"):
        write_checkpoint(ckpt, TINY, tiny_tensors)   # a previous checkpoint is not replaced without asking
    assert load_tensors(ckpt)[2]["files"] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    write_checkpoint(ckpt, TINY, tiny_tensors, overwrite=True)   # replaced, stale shards gone
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert load_tensors(ckpt)[2]["files"] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "foreign"]   # no temporaries left behind


# ---------------------------------------------------------------------------------------------- oracles

@pytest.mark.oracle
def test_safetensors_library_agrees(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors package is the oracle here")
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f16": np.ones(3, np.float16),
              "i64": np.array([-5, 2**40]), "u8": np.arange(7, dtype=np.uint8), "b": np.array([True, False])}
    st_numpy.save_file(arrays, tmp_path / "theirs.safetensors")
    theirs = SafetensorsFile(tmp_path / "theirs.safetensors")
    for name, a in arrays.items():
        np.testing.assert_array_equal(theirs.get(name), a)
    codes = {"f32": "F32", "f16": "F16", "i64": "I64", "u8": "U8", "b": "BOOL"}
    write_safetensors(tmp_path / "ours.safetensors", {n: (a, codes[n]) for n, a in arrays.items()})
    back = st_numpy.load_file(tmp_path / "ours.safetensors")
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a)


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch", reason="transformers' NemotronHForCausalLM is the oracle (extra 'oracle')")
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle (extra 'oracle')")
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**TINY.to_dict())).eval()
    return torch, model


def _state_dict_numpy(model):
    return {n: t.detach().float().numpy() for n, t in model.state_dict().items()}


@pytest.mark.oracle
@pytest.mark.parametrize("torch_dtype", ["float32", "bfloat16"])
def test_transformers_saved_checkpoint_loads_with_the_same_values(tmp_path, hf_model, torch_dtype):
    torch, model = hf_model
    model = model.to(getattr(torch, torch_dtype))
    model.save_pretrained(tmp_path)
    ref = _state_dict_numpy(model)
    model.to(torch.float32)
    assert open_checkpoint(tmp_path).dtype_of("lm_head.weight") == {"float32": "F32", "bfloat16": "BF16"}[torch_dtype]
    cfg, tensors, info = load_tensors(tmp_path)
    assert cfg.to_dict()["time_step_limit"] == [0.0, float("inf")]        # transformers' {"__float__": ...} tag
    assert cfg.hidden_size == TINY.hidden_size and info["mtp"] is False   # transformers drops MTP
    ours = to_transformers(tensors)
    assert ours.keys() == ref.keys()
    for name, value in ref.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == value.shape, name
        np.testing.assert_array_equal(ours[name], value, err_msg=name)   # BF16 upcast is exact


@pytest.mark.oracle
def test_state_dict_file_with_stacked_experts_loads(tmp_path, hf_model):
    torch, model = hf_model
    from safetensors.torch import save_file

    model.config.save_pretrained(tmp_path)
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    _, tensors, _ = load_tensors(tmp_path)
    ref = _state_dict_numpy(model)
    ours = to_transformers(tensors)
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[n], v) for n, v in ref.items())


@pytest.mark.oracle
def test_transformers_loads_what_we_write(tmp_path, hf_model, tiny_tensors):
    torch, model = hf_model
    import transformers

    no_mtp = {n: v for n, v in tiny_tensors.items() if not n.startswith("mtp.")}
    write_checkpoint(tmp_path, TINY, no_mtp)   # our config.json and safetensors, read by transformers
    loaded = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ref = to_transformers(no_mtp)
    for name, value in _state_dict_numpy(loaded).items():
        np.testing.assert_array_equal(value, ref[name], err_msg=name)
