"""The streaming writers (checkpoint/stream.py): make-random and quantize write tensor by tensor, a slice of
rows at a time, and write exactly the bytes of the whole-model writers, in bounded memory."""

import json
import tracemalloc

import numpy as np
import pytest
from hostile_helpers import TINY, snapshot

from nemo_scratch.checkpoint import (SafetensorsFile, load_tensors, make_random_checkpoint, random_tensors, stream,
                                     to_transformers, write_checkpoint)
from nemo_scratch.checkpoint.convert import EXTRA_FILES, quantize_checkpoint
from nemo_scratch.checkpoint.modelopt import quant_config_for, recipe_format
from nemo_scratch.checkpoint.safetensors_io import write_safetensors, write_safetensors_stream
from nemo_scratch.checkpoint.schema import expected_tensors
from nemo_scratch.config import preset
from nemo_scratch.errors import CheckpointError, InputError
from nemo_scratch.ops.quant import fp8_quantize, nvfp4_quantize

RECIPES = ("ultra", "super", "nano", "fp8")


@pytest.fixture(params=[None, 40], ids=["default-pieces", "40-value-pieces"])
def pieces(request, monkeypatch):
    """Default slices (whole tiny tensors), and slices of 40 values: every tensor then spans many pieces, and
    a quantized weight of more than 100 values is read (or drawn) twice instead of kept."""
    if request.param is not None:
        monkeypatch.setattr(stream, "PIECE_ELEMS", request.param)
        monkeypatch.setattr(stream, "HOLD_ELEMS", 100)
    return request.param


def quantize_whole(src, dst, recipe):
    """quantize as it was before streaming: the whole model loaded as float32, quantized, written at once."""
    cfg, tensors, info = load_tensors(src, dtype="float32")
    out = {}
    for spec in expected_tensors(cfg, include_mtp=info["mtp"]):
        fmt, w = recipe_format(spec, recipe, cfg), tensors[spec.name]
        out[spec.name] = nvfp4_quantize(w) if fmt == "nvfp4" else fp8_quantize(w) if fmt == "fp8" else w
    extras = [src / name for name in EXTRA_FILES if (src / name).is_file()]
    write_checkpoint(dst, cfg, out, quant_config=quant_config_for(cfg, recipe), extra_files=extras)
    return dst


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """BF16 in NVIDIA's layout (with a tokenizer.json), F16, and transformers' stacked-expert layout."""
    root = tmp_path_factory.mktemp("sources")
    tensors = random_tensors(TINY, seed=3)
    bf16 = write_checkpoint(root / "bf16", TINY, tensors)
    (bf16 / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    f16 = write_checkpoint(root / "f16", TINY, tensors, float_dtype="F16")
    stacked = root / "stacked"
    stacked.mkdir()
    TINY.save(stacked)
    write_safetensors(stacked / "model.safetensors", {
        name: (value, "F32" if name.endswith(stream.F32_SUFFIXES) else "BF16")
        for name, value in to_transformers(tensors).items()}, metadata={"format": "pt"})
    return {"bf16": bf16, "f16": f16, "stacked": stacked}


# ---------------------------------------------------------------------------------------------- same bytes

@pytest.mark.parametrize("shards", [1, 3])
def test_make_random_streams_the_bytes_of_write_checkpoint(tmp_path, pieces, shards):
    whole = write_checkpoint(tmp_path / "whole", TINY, random_tensors(TINY, seed=7), shards=shards)
    streamed = make_random_checkpoint(tmp_path / "streamed", TINY, seed=7, shards=shards)
    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert snapshot(streamed) == snapshot(whole)


@pytest.mark.parametrize("source", ["bf16", "f16", "stacked"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_streamed_quantize_equals_quantizing_the_whole_model(sources, tmp_path, pieces, source, recipe):
    src = sources[source]
    counts = quantize_checkpoint(src, tmp_path / "streamed", recipe)
    assert snapshot(tmp_path / "streamed") == snapshot(quantize_whole(src, tmp_path / "whole", recipe))
    assert sum(counts.values()) == len(expected_tensors(TINY))
    if source == "bf16":
        assert (tmp_path / "streamed" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("recipe", RECIPES)
def test_make_random_recipe_is_make_random_then_quantize(tmp_path, pieces, recipe):
    bf16 = make_random_checkpoint(tmp_path / "bf16", TINY, seed=2)
    quantize_checkpoint(bf16, tmp_path / "q", recipe)
    direct = make_random_checkpoint(tmp_path / "direct", TINY, seed=2, recipe=recipe)
    assert snapshot(direct) == snapshot(tmp_path / "q")
    hf = json.loads((direct / "hf_quant_config.json").read_text())
    assert hf == quant_config_for(TINY, recipe)
    assert json.loads((direct / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"


# ---------------------------------------------------------------------------------------------- shards

def test_shards_of_bounded_bytes(tmp_path):
    limit = 40_000
    out = make_random_checkpoint(tmp_path / "c", TINY, seed=1, shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    sizes = [sum(SafetensorsFile(f).nbytes_of(n) for n in SafetensorsFile(f).keys()) for f in files]
    largest = max(s.numel * 2 for s in expected_tensors(TINY))          # BF16: a weight alone may exceed it
    assert all(size <= max(limit, largest) for size in sizes)
    assert index["metadata"]["total_size"] == sum(sizes)
    one = make_random_checkpoint(tmp_path / "one", TINY, seed=1)          # default 2 GiB: one file
    assert sorted(p.name for p in one.iterdir()) == ["config.json", "model.safetensors"]
    a, b = load_tensors(out)[1], load_tensors(one)[1]
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("options, fragment", [
    ({"shards": 2, "shard_bytes": 10}, "not both"), ({"shard_bytes": 0}, "shard_bytes=0"),
    ({"shard_bytes": float("inf")}, "shard_bytes=inf"), ({"shards": 0}, "shards=0"),
    ({"recipe": "int4"}, "recipe='int4'"), ({"float_dtype": "F8"}, "float_dtype='F8'"),
])
def test_bad_options_are_refused_before_writing(tmp_path, options, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        make_random_checkpoint(tmp_path / "c", TINY, **options)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- errors

def test_stream_writer_checks_every_piece(tmp_path):
    layout = [("a", "BF16", (2, 3)), ("b", "U8", (4,))]
    good = [("a", np.zeros((1, 3), np.uint16)), ("a", np.zeros((1, 3), np.uint16)), ("b", np.arange(4, dtype=np.uint8))]
    path = write_safetensors_stream(tmp_path / "ok.safetensors", layout, good)
    assert SafetensorsFile(path).get("b").tolist() == [0, 1, 2, 3]
    cases = [(good[:2] + [("a", np.zeros(3, np.uint16))], "more than the 12"),
             (good[:1] + good[2:], "where the header has tensor 'a'"),
             ([good[0], ("a", np.zeros(3, np.float32))], "dtype float32"),
             (good[:2], "tensor 'b': 0 bytes of data, expected 4"),
             (good + [("c", np.zeros(1, np.uint8))], "where the header has no more tensors")]
    for pieces, fragment in cases:
        with pytest.raises(CheckpointError, match=fragment):
            write_safetensors_stream(tmp_path / "bad.safetensors", layout, iter(pieces))
        assert not (tmp_path / "bad.safetensors").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]


def test_nan_in_a_weight_to_quantize_names_it(tmp_path, monkeypatch):
    """A small tensor is checked up front, as load does; a large one as its values stream past the quantizer."""
    tensors = random_tensors(TINY, seed=1)
    name = "backbone.layers.0.mixer.in_proj.weight"
    tensors[name][3, 5] = np.nan
    src = write_checkpoint(tmp_path / "src", TINY, tensors)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' holds nan at \[3, 5\]"):
        quantize_checkpoint(src, tmp_path / "q", "ultra")
    monkeypatch.setattr("nemo_scratch.checkpoint.convert.SMALL", 0)     # as if every matrix were large
    with pytest.raises(InputError, match=rf"model.safetensors: tensor '{name}' contains NaN or inf"):
        quantize_checkpoint(src, tmp_path / "q", "ultra")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------------------------------------- memory

WIDE = preset("tiny", hidden_size=256, vocab_size=4096, hybrid_override_pattern="MEMEM*EMEMEMEM*EMEMEME",
              n_routed_experts=16, moe_intermediate_size=256, moe_latent_size=128,
              moe_shared_expert_intermediate_size=512, mamba_num_heads=8, mamba_head_dim=32, num_attention_heads=8,
              head_dim=32, intermediate_size=512, num_nextn_predict_layers=0)


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("workers", [1, 3])
def test_peak_memory_is_a_slice_not_the_model(tmp_path, monkeypatch, workers):
    """A checkpoint 15x its largest tensor: make-random and quantize allocate a few times that tensor's float32
    bytes at most (the slices being encoded, a quantized weight kept for its second pass, the entry list), far
    from the float32 model; each further encoding thread adds at most one slice (stream_peak_bytes)."""
    monkeypatch.setattr(stream, "WORKERS", workers)
    specs = expected_tensors(WIDE)
    largest, model = 4 * max(s.numel for s in specs), 4 * sum(s.numel for s in specs)
    assert model >= 15 * largest
    src = tmp_path / "bf16"
    peaks = {"make-random": _peak(lambda: make_random_checkpoint(src, WIDE, seed=0)),
             "make-random --recipe nano": _peak(lambda: make_random_checkpoint(tmp_path / "n", WIDE, recipe="nano")),
             "quantize ultra": _peak(lambda: quantize_checkpoint(src, tmp_path / "u", "ultra")),
             "quantize fp8": _peak(lambda: quantize_checkpoint(src, tmp_path / "f", "fp8"))}
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}, f"largest tensor {largest / 2**20:.1f} MiB "
          f"(float32), model {model / 2**20:.1f} MiB")
    for what, peak in peaks.items():
        slices = (workers - 1) * stream.PIECE_BYTES_PER_ELEM * stream.PIECE_ELEMS
        assert peak <= 3 * largest + 2 * 2**20 + slices, (what, peak, largest)
        assert peak <= model / 5 + slices, (what, peak, model)
    formats = {load_tensors(tmp_path / d, weights="stored")[2]["formats"][f"backbone.layers.{i}.mixer.in_proj.weight"]
               for d in ("u", "f", "n") for i in (0, 2)}
    assert formats == {"fp8", "nvfp4"}
