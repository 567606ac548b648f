"""The streaming tools from the command line: make-random width slices (--pattern, --num-layers, --no-mtp,
--recipe), shard options, byte progress (--quiet, pipes), and inspect --tensors reading headers only."""

import io
import json

import numpy as np
import pytest
from hostile_helpers import TINY, assert_error, run_cli, tiny_checkpoint

import nemo_scratch
from nemo_scratch import cli, progress
from nemo_scratch.checkpoint import SafetensorsFile, load_tensors, open_checkpoint, random_tensors, to_transformers
from nemo_scratch.checkpoint.safetensors_io import write_safetensors
from nemo_scratch.checkpoint.stream import F32_SUFFIXES
from nemo_scratch.config import preset


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    src = tiny_checkpoint(root / "bf16", seed=4, shards=2)
    assert cli.main(["quantize", str(src), str(root / "q"), "--recipe", "ultra", "--shards", "2", "--quiet"]) == 0
    return root / "q"


# ---------------------------------------------------------------------------------------------- width slices

def test_pattern_slice_keeps_the_preset_widths(tmp_path, capsys):
    out = tmp_path / "s"
    result = run_cli(capsys, "make-random", "--preset", "small", "--pattern", "M*", out, "--seed", 1)
    assert result.code == 0 and "pattern M*" in result.out and result.err == ""
    cfg, small = json.loads((out / "config.json").read_text()), preset("small")
    assert cfg["hybrid_override_pattern"] == "M*" and cfg["num_hidden_layers"] == 2
    for field in ("hidden_size", "vocab_size", "mamba_num_heads", "num_attention_heads", "head_dim"):
        assert cfg[field] == getattr(small, field), field
    assert load_tensors(out)[1]["backbone.embeddings.weight"].shape == (small.vocab_size, small.hidden_size)


@pytest.mark.parametrize("no_mtp", [False, True])
def test_first_layers_slice_with_and_without_mtp(tmp_path, capsys, no_mtp):
    out = tmp_path / "s"
    argv = ["make-random", out, "--num-layers", 3] + (["--no-mtp"] if no_mtp else [])
    assert run_cli(capsys, *argv).code == 0
    cfg, tensors, info = load_tensors(out)
    assert cfg.hybrid_override_pattern == TINY.hybrid_override_pattern[:3] and info["mtp"] is not no_mtp
    assert any(n.startswith("mtp.") for n in tensors) is not no_mtp
    logits = nemo_scratch.load(out).forward([[1, 2, 3]])
    assert logits.shape == (1, 3, TINY.vocab_size) and np.isfinite(logits).all()


def test_recipe_writes_a_quantized_slice(tmp_path, capsys):
    out = tmp_path / "u"
    result = run_cli(capsys, "make-random", out, "--pattern", "ME*", "--recipe", "ultra", "--shards", 2)
    assert result.code == 0 and "recipe ultra, 2 shard(s)" in result.out
    info = load_tensors(out, weights="stored")[2]
    assert info["formats"]["backbone.layers.1.mixer.experts.0.up_proj.weight"] == "nvfp4"
    assert info["formats"]["backbone.layers.0.mixer.in_proj.weight"] == "fp8"
    assert info["quant_config"]["quantization"]["quant_algo"] == "MIXED_PRECISION"


@pytest.mark.parametrize("argv, fragments", [
    (("--pattern", "ME", "--num-layers", 2), ("--pattern and --num-layers exclude each other",)),
    (("--num-layers", 0), ("--num-layers 0", "[1, 6]")),
    (("--preset", "nano", "--num-layers", 53), ("--num-layers 53", "[1, 52]", "'nano' preset has 52 layers")),
    (("--pattern", "MX"), ("'--pattern'", "X")),
    (("--shards", 2, "--shard-gib", 1), ("--shards and --shard-gib exclude each other",)),
    (("--shard-gib", -1), ("--shard-gib -1.0", "> 0")),
    (("--recipe", "int4"), ("--recipe", "int4")),
])
def test_bad_slice_and_shard_options_are_one_line(tmp_path, capsys, argv, fragments):
    assert_error(run_cli(capsys, "make-random", tmp_path / "out", *argv), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_quantize_shard_gib(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path / "bf16", seed=2)
    assert run_cli(capsys, "quantize", src, tmp_path / "q", "--shard-gib", 2**-15, "--quiet").code == 0
    files = sorted((tmp_path / "q").glob("model-*.safetensors"))
    assert len(files) > 1 and (tmp_path / "q" / "model.safetensors.index.json").is_file()
    assert load_tensors(tmp_path / "q")[1].keys() == load_tensors(src)[1].keys()


# ---------------------------------------------------------------------------------------------- progress

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def bars(monkeypatch):
    """Every progress bar the commands make, as (bar, quiet), the real bar kept."""
    made, real = [], progress.progress_bar

    def recording(total, desc, quiet=False, stream=None):
        bar = real(total, desc, quiet, stream)
        made.append((bar, quiet))
        return bar

    monkeypatch.setattr(progress, "progress_bar", recording)
    return made


def _tensor_bytes(path):
    reader = open_checkpoint(path)
    return sum(f.nbytes_of(n) for f in reader.files.values() for n in f.keys())


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_counts_every_byte_and_quiet_draws_nothing(tmp_path, capsys, monkeypatch, bars, quiet):
    flag = ["--quiet"] if quiet else []
    terminal = FakeTerminal()
    capsys.readouterr()
    monkeypatch.setattr("sys.stderr", terminal)      # a terminal: the bar may be drawn unless --quiet
    assert cli.main(["make-random", str(tmp_path / "r"), "--shards", "2", *flag]) == 0
    assert cli.main(["quantize", str(tmp_path / "r"), str(tmp_path / "q"), "--recipe", "nano", *flag]) == 0
    monkeypatch.undo()
    (make, q1), (quant, q2) = bars
    assert make.total == make.n == _tensor_bytes(tmp_path / "r") > 0
    assert quant.total == quant.n == _tensor_bytes(tmp_path / "q") > 0
    assert q1 is q2 is quiet
    assert all((bar._bar is None) is quiet for bar, _ in bars)        # a tqdm bar on a terminal unless --quiet
    if quiet:
        assert terminal.getvalue() == ""


def test_no_bar_in_a_pipe(tmp_path, capsys, bars):
    result = run_cli(capsys, "make-random", tmp_path / "r")
    assert result.code == 0 and result.err == "" and bars[0][0]._bar is None and bars[0][0].n == bars[0][0].total


# ---------------------------------------------------------------------------------------------- inspect --tensors

def test_inspect_tensors_lists_every_stored_tensor(quantized, capsys):
    report = json.loads(run_cli(capsys, "inspect", quantized, "--tensors", "--json").out)
    reader = open_checkpoint(quantized)
    rows = report["tensors"]
    assert sorted(r["stored"] for r in rows) == reader.names()
    assert sum(r["bytes"] for r in rows) == _tensor_bytes(quantized) == report["total_bytes"]
    by_name = {r["name"]: r for r in rows}
    expert = "backbone.layers.2.mixer.experts.0.up_proj.weight"
    assert by_name[expert]["format"] == by_name[expert + "_scale"]["format"] == "nvfp4"
    assert (by_name[expert]["dtype"], by_name[expert + "_scale"]["dtype"]) == ("U8", "F8_E4M3")
    assert by_name[expert]["shape"] == [16, 8] and by_name[expert + "_scale_2"]["shape"] == []
    names = [r["name"] for r in rows]
    assert names.index(expert) + 1 == names.index(expert + "_scale")          # each weight, then its scales
    assert by_name["backbone.layers.0.mixer.A_log"]["format"] == "f32"
    text = run_cli(capsys, "inspect", quantized, "--tensors").out
    listing = text[text.index("tensor (NVIDIA name)"):].splitlines()
    assert len(listing) == 1 + len(rows) and "file" in listing[0] and "stored as" not in listing[0]
    assert "tensors" not in json.loads(run_cli(capsys, "inspect", quantized, "--json").out)


def test_inspect_tensors_names_transformers_stacked_experts(tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    TINY.save(out)
    write_safetensors(out / "model.safetensors", {n: (v, "F32" if n.endswith(F32_SUFFIXES) else "BF16")
                                                  for n, v in to_transformers(random_tensors(TINY)).items()})
    text = run_cli(capsys, "inspect", out, "--tensors").out
    line = next(ln for ln in text.splitlines() if ln.startswith("backbone.layers.2.mixer.experts.{0..7}.up_proj"))
    assert "model.layers.2.mixer.experts.up_proj" in line and "[8, 16, 16]" in line and "stored as" in text


def test_inspect_reads_no_tensor_data(quantized, capsys, monkeypatch):
    def untouchable(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    for method in ("raw", "get", "read"):
        monkeypatch.setattr(SafetensorsFile, method, untouchable)
    monkeypatch.setattr(np, "memmap", untouchable)
    for argv in (["--tensors"], ["--tensors", "--json"], []):
        result = run_cli(capsys, "inspect", quantized, *argv)
        assert result.code == 0 and result.err == "", result.err
