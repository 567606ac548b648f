"""Hostile inputs, class 4 and 5: arguments, and no silent garbage (non-finite weights, memory).

Arguments: --temperature 0 is greedy; every sampling / seed / flag conflict is refused with one line naming
the flags; non-UTF-8 prompts, out-of-range seeds and malformed numbers are one-line errors (argparse's own
included). Numerics: a non-finite small tensor or scale fails the load naming file and tensor; a NaN in a
large matrix fails the forward naming the first layer and tensor that went non-finite. Memory: a forward,
generate, golden, load or make-random that cannot fit is refused before it allocates, with what it needs,
what is available and what helps.
"""

import json
import tracemalloc

import numpy as np
import pytest
from hostile_helpers import TINY, assert_error, run_cli, run_subprocess, snapshot, tiny_checkpoint

import nemo_scratch
from nemo_scratch import memory
from nemo_scratch.checkpoint import SafetensorsFile, load_tensors, random_tensors, write_checkpoint
from nemo_scratch.errors import InputError, MemoryBudgetError, NonFiniteError
from nemo_scratch.ops.quant import FP8Weight, NVFP4Weight, fp8_quantize, nvfp4_quantize


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny checkpoint without a tokenizer declaration."""
    return tiny_checkpoint(tmp_path_factory.mktemp("plain") / "tiny", bytes_tokenizer=False)


def gen(capsys, ckpt, *flags):
    return run_cli(capsys, "generate", "--checkpoint", ckpt, "--ids", "5,6,7", "--max-new-tokens", 6, *flags)


# ---------------------------------------------------------------------------------------------- arguments

def test_temperature_zero_is_greedy_and_seeds_are_honoured(ckpt, capsys):
    greedy = json.loads(gen(capsys, ckpt, "--greedy", "--json").out)["ids"]
    assert json.loads(gen(capsys, ckpt, "--temperature", 0, "--json").out)["ids"] == greedy
    assert json.loads(gen(capsys, ckpt, "--greedy", "--temperature", 0, "--json").out)["ids"] == greedy
    hot = [json.loads(gen(capsys, ckpt, "--temperature", 5, "--seed", s, "--json").out)["ids"] for s in (1, 1, 2)]
    assert hot[0] == hot[1] and len(hot[0]) == 6


SAMPLING_CONFLICTS = [
    (("--top-p", 0.5), "--top-p 0.5 needs sampling"),
    (("--greedy", "--temperature", 0.7), "--greedy contradicts --temperature 0.7"),
    (("--stream", "--json"), "--stream and --json cannot be combined"),
    (("--seed", 3), "--seed 3 has no effect on greedy decoding"),
    (("--draft-depth", 2), "--draft-depth 2 needs --mtp"),
    (("--temperature", -1), "--temperature -1.0"),
    (("--temperature", "nan"), "--temperature nan"),
    (("--temperature", "inf"), "--temperature inf"),
    (("--temperature", 1, "--top-p", 0), "--top-p 0.0"),
    (("--temperature", 1, "--top-p", 1.5), "--top-p 1.5"),
    (("--temperature", 1, "--seed", -1), "--seed -1"),
    (("--temperature", 1, "--seed", 2**64), f"--seed {2**64}"),
    (("--max-new-tokens", 0), "--max-new-tokens 0"),
    (("--mtp", "--draft-depth", 0), "--draft-depth 0"),
    (("--mtp", "--draft-depth", 65), "--draft-depth 65"),
    (("--seed", "x"), "argument --seed: invalid int value: 'x'"),
    (("--max-new-tokens", "1.5"), "argument --max-new-tokens"),
    (("--backend", "tpu"), "argument --backend: invalid choice"),
    (("--dt-floor", "nan"), "dt_floor"),
]


@pytest.mark.parametrize("flags, fragment", SAMPLING_CONFLICTS, ids=[f for _, f in SAMPLING_CONFLICTS])
def test_generate_flag_conflicts(ckpt, capsys, flags, fragment):
    before = snapshot(ckpt)
    assert_error(gen(capsys, ckpt, *flags), fragment)
    assert snapshot(ckpt) == before


def test_stream_without_a_tokenizer_streams_ids(plain, capsys):
    result = gen(capsys, plain, "--stream")
    assert result.code == 0
    streamed = [int(t) for t in result.out.strip().rstrip(",").split(",")]
    assert streamed[:3] == [5, 6, 7] and len(streamed) == 9


def test_non_utf8_prompts(ckpt, capsys):
    result = run_subprocess("generate", "--checkpoint", ckpt, "--prompt", b"caf\xe9 \xff", "--max-new-tokens", 2)
    assert_error(result, "--prompt is not valid UTF-8", "byte 0xe9")
    assert_error(run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "a\udcffb"), "character 1",
                 "byte 0xff")
    model = nemo_scratch.load(ckpt)
    with pytest.raises(InputError, match="not valid UTF-8"):
        model.tokenizer.encode("\ud800")
    with pytest.raises(InputError, match="seed=-1"):
        model.generate([1, 2], 2, greedy=False, seed=-1)


@pytest.mark.parametrize("argv, fragment", [
    (("make-random", "{tmp}/r", "--seed", -1), "--seed -1"),
    (("make-random", "{tmp}/r", "--shards", 0), "shards=0"),
    (("make-random", "{tmp}/r", "--preset", "mega"), "unknown preset 'mega'"),
    (("golden", "--op", "rms_norm", "--out", "{tmp}/g", "--seed", 2**64), "--seed must be"),
    (("golden", "--op", "rms_norm", "--out", "{tmp}/g", "--shape", "t=" + "9" * 40), "is not an integer"),
    (("golden", "--check", "{tmp}/g", "--op", "rms_norm"), "--op cannot go with it"),
    (("plan", "--preset", "nano", "--gpu-mem-gib", "nan"), "--gpu-mem-gib nan"),
    (("plan", "--preset", "nano", "--gpu-mem-gib", "inf"), "--gpu-mem-gib inf"),
    (("plan", "--preset", "nano", "--gpus", 0), "gpus must be a positive integer"),
    (("forward", "--ids", "1,x"), "--ids must be comma-separated integers"),
    (("forward", "--ids", str(10**30)), "outside the vocabulary"),
    (("forward", "--ids", "1,300"), "token id 300 is outside the vocabulary"),
    (("quantize", "{tmp}/nope", "{tmp}/q"), "does not exist"),
    (("inspect",), "the following arguments are required: checkpoint"),
    (("nosuch",), "invalid choice: 'nosuch'"),
])
def test_other_bad_arguments(tmp_path, capsys, argv, fragment):
    argv = [str(a).format(tmp=tmp_path) for a in argv]
    assert_error(run_cli(capsys, *argv), fragment)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- non-finite

SMALL_TENSORS = ["backbone.layers.1.norm.weight", "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D",
                 "backbone.layers.4.mixer.dt_bias", "backbone.layers.0.mixer.conv1d.bias",
                 "backbone.layers.2.mixer.gate.e_score_correction_bias", "backbone.layers.0.mixer.norm.weight",
                 "backbone.norm_f.weight", "mtp.layers.0.enorm.weight"]


@pytest.mark.parametrize("name", SMALL_TENSORS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_small_tensors_fail_the_load(tmp_path, capsys, name, bad):
    tensors = random_tensors(TINY, seed=1)
    value = tensors[name].copy()
    value.flat[1] = bad
    ckpt = tiny_checkpoint(tmp_path / "c", tensors={**tensors, name: value}, float_dtype="F32")
    before = snapshot(ckpt)
    line = assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1"), str(ckpt), repr(name),
                        str(bad), "non-finite")
    assert "Traceback" not in line and snapshot(ckpt) == before


def _quantized(tmp_path, name, weight):
    tensors = random_tensors(TINY, seed=2)
    return tiny_checkpoint(tmp_path / "q", tensors={**tensors, name: weight})


EXPERT = "backbone.layers.2.mixer.experts.1.up_proj.weight"
SHARED = "backbone.layers.2.mixer.shared_experts.up_proj.weight"


@pytest.mark.parametrize("spoil, fragment", [
    (lambda w: NVFP4Weight(w.packed, w.block_scale, np.float32(0)), "weight_scale_2 is 0 but its codes"),
    (lambda w: NVFP4Weight(w.packed, w.block_scale, np.float32(-1)), "weight_scale_2 is -1.0"),
    (lambda w: NVFP4Weight(w.packed, w.block_scale, np.float32(np.nan)), "weight_scale_2 is nan"),
    (lambda w: NVFP4Weight(w.packed, w.block_scale, np.float32(np.inf)), "weight_scale_2 is inf"),
    (lambda w: NVFP4Weight(w.packed, w.block_scale, w.global_scale, np.float32(np.inf)), "input_scale is inf"),
])
def test_bad_nvfp4_scales_fail_the_load(tmp_path, capsys, spoil, fragment):
    w = nvfp4_quantize(random_tensors(TINY, seed=2)[EXPERT])
    ckpt = _quantized(tmp_path, EXPERT, spoil(w))
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1"), repr(EXPERT), fragment)


@pytest.mark.parametrize("scale, fragment", [(np.nan, "weight_scale is nan"), (-0.5, "weight_scale is -0.5"),
                                             (0.0, "weight_scale is 0 but its codes")])
def test_bad_fp8_scales_fail_the_load(tmp_path, capsys, scale, fragment):
    w = fp8_quantize(random_tensors(TINY, seed=2)[SHARED])
    ckpt = _quantized(tmp_path, SHARED, FP8Weight(w.data, np.float32(scale)))
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1"), repr(SHARED), fragment)


@pytest.mark.parametrize("tensor, byte, code, fragment", [
    (EXPERT.replace("weight", "weight_scale"), 3, 0x7F, f"tensor '{EXPERT}_scale' holds a NaN E4M3 code at [3, 0]"),
    (SHARED, 40, 0xFF, f"tensor '{SHARED}' holds a NaN E4M3 code at [1, 8]"),
])
def test_nan_codes_in_packed_weights_fail_the_forward(ckpt, tmp_path, capsys, tensor, byte, code, fragment):
    """Codes are not read at load (that would read every byte of a checkpoint): the forward names them."""
    q = tmp_path / "q"
    assert run_cli(capsys, "quantize", ckpt, q, "--recipe", "ultra").code == 0
    f = SafetensorsFile(q / "model.safetensors")
    begin = f._data_start + f._entries[tensor][2][0]
    with open(q / "model.safetensors", "r+b") as out:
        out.seek(begin + byte)
        out.write(bytes([code]))
    ids = ",".join(str(i) for i in range(60))   # enough tokens that every expert is routed some
    assert_error(run_cli(capsys, "forward", "--checkpoint", q, "--ids", ids), "layer 2 (moe)", fragment)


def test_all_zero_quantized_weight_with_zero_scale_loads(tmp_path):
    ckpt = _quantized(tmp_path, EXPERT, nvfp4_quantize(np.zeros((16, 16), np.float32)))
    assert load_tensors(ckpt)[1][EXPERT].global_scale == 0


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model whose MLP and lm_head are larger than guards.SMALL (so the load does not read them)."""
    cfg = TINY.replace(intermediate_size=33000, vocab_size=40000)
    tensors = random_tensors(cfg, seed=3)
    return cfg, tensors, tmp_path_factory.mktemp("wide")


@pytest.mark.parametrize("name, index, fragment", [
    ("backbone.layers.3.mixer.up_proj.weight", (1234, 5), "layer 3 (mlp): tensor "
     "'backbone.layers.3.mixer.up_proj.weight' holds nan at [1234, 5]"),
    ("lm_head.weight", (39999, 0), "tensor 'lm_head.weight' holds nan at [39999, 0]"),
])
def test_nan_in_a_large_matrix_fails_the_forward_naming_layer_and_tensor(wide, capsys, name, index, fragment):
    cfg, tensors, root = wide
    value = tensors[name].copy()
    value[index] = np.nan
    ckpt = root / name.replace(".", "_")
    write_checkpoint(ckpt, cfg, {**tensors, name: value}, float_dtype="F32")
    before = snapshot(ckpt)
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", "1,2"), "forward:", fragment)
    assert_error(run_cli(capsys, "generate", "--checkpoint", ckpt, "--ids", "1,2", "--mtp"), fragment)
    assert snapshot(ckpt) == before
    model = nemo_scratch.load(ckpt)
    with pytest.raises(NonFiniteError, match="first non-finite"):
        model.forward([[1, 2]])
    model.check_finite = False                   # the documented opt-out gives the NaN back
    assert np.isnan(model.forward([[1, 2]])).any()


def test_overflow_with_finite_weights_is_named(ckpt):
    model = nemo_scratch.load(ckpt)
    model.params["layers"][3]["up"] = model.params["layers"][3]["up"] * np.float32(1e30)
    with np.errstate(all="ignore"), pytest.raises(NonFiniteError, match=r"layer 3 \(mlp\): its weights are finite"):
        model.forward([[1, 2, 3]])


def test_nan_in_the_mtp_head_is_named_not_blamed_on_lm_head(ckpt):
    model = nemo_scratch.load(ckpt)
    model.params["mtp"]["layers"][1]["experts_up"][2][3, 4] = np.nan
    with pytest.raises(NonFiniteError, match=r"MTP head: .*'mtp.layers.1.mixer.experts.2.up_proj.weight' holds nan"):
        model.generate([1, 2, 3], 6, mtp=True)
    assert model.generate([1, 2, 3], 6).ids.shape == (1, 6)   # the backbone alone is fine


# ---------------------------------------------------------------------------------------------- memory

def test_forward_refused_before_allocating(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("NEMO_SCRATCH_MEMORY_LIMIT", "100M")
    ids = ",".join(str(i % 256) for i in range(4000))
    line = assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", ids), "a forward over 1 x 4000",
                        "needs about", "only 100.0 MiB is available", "fewer token ids")
    assert "attention layer" in line
    monkeypatch.setenv("NEMO_SCRATCH_MEMORY_LIMIT", "lots")
    assert_error(run_cli(capsys, "forward", "--checkpoint", ckpt, "--ids", ids), "NEMO_SCRATCH_MEMORY_LIMIT='lots'")


@pytest.mark.parametrize("argv, fragment", [
    (("generate", "--checkpoint", "{ckpt}", "--ids", "1,2", "--max-new-tokens", 10**9), "generating 1000000000"),
    (("make-random", "--preset", "ultra", "{tmp}/u"), "a random checkpoint of 108 layers"),
    (("golden", "--op", "gqa_attention", "--shape", "t=200000,s=200000", "--out", "{tmp}/g"), "golden gqa_attention"),
])
def test_calls_that_cannot_fit_are_refused(ckpt, tmp_path, capsys, monkeypatch, argv, fragment):
    """make-random streams (one slice of a tensor in memory at a time), so what Ultra cannot fit is the disk."""
    monkeypatch.setenv("NEMO_SCRATCH_MEMORY_LIMIT", "8G")
    monkeypatch.setattr("nemo_scratch.memory.free_disk_bytes", lambda path: 100 * 2**30)
    argv = [str(a).format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    tracemalloc.start()
    room = ("on disk", "only 100.00 GiB is free") if argv[0] == "make-random" else ("available",)
    assert_error(run_cli(capsys, *argv), fragment, "needs about", *room)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20 and list(tmp_path.iterdir()) == []


def test_load_refused_before_reading(ckpt, monkeypatch):
    monkeypatch.setattr(memory, "CHECK_ABOVE", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    with pytest.raises(MemoryBudgetError, match=rf"loading {ckpt} with weights='float32' \(float64\) needs about"):
        load_tensors(ckpt, dtype="float64")


@pytest.mark.parametrize("tokens", [64, 700])
def test_forward_estimate_bounds_the_real_peak(ckpt, tokens):
    """The estimate is an upper bound of what the NumPy reference allocates, and not a wild one."""
    model = nemo_scratch.load(ckpt)
    need = memory.forward_bytes(model.cfg, 1, tokens, model.dtype, last_only=False)["total"]
    ids = [[i % 256 for i in range(tokens)]]
    tracemalloc.start()
    model.forward(ids)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= need <= 8 * peak, (peak, need)
    assert memory.available_bytes() is None or memory.available_bytes() > 0
