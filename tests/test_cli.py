"""The CLI as a user runs it: subprocesses of ``python -m nemo_scratch``; errors are one line, exit status 2."""

import json
import subprocess
import sys

import numpy as np
import pytest



def run(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "nemo_scratch", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny checkpoint that declares the byte-level tokenizer, made by the CLI itself."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    run("make-random", "--preset", "tiny", out, "--shards", 2)
    cfg = json.loads((out / "config.json").read_text())
    cfg["nemo_scratch_tokenizer"] = "bytes"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_make_random_writes_sharded_checkpoint(ckpt):
    assert (ckpt / "model.safetensors.index.json").is_file()
    assert len(list(ckpt.glob("model-0000*-of-00002.safetensors"))) == 2


def test_forward_writes_logits(ckpt, tmp_path):
    out = tmp_path / "logits.npy"
    run("forward", "--checkpoint", ckpt, "--ids", "1,2,3", "--out", out)
    logits = np.load(out)
    assert logits.shape == (1, 3, 256) and logits.dtype == np.float32
    import nemo_scratch

    np.testing.assert_array_equal(logits, nemo_scratch.load(ckpt).forward([[1, 2, 3]]))


def test_generate_json_ids_and_prompt(ckpt):
    out = json.loads(run("generate", "--checkpoint", ckpt, "--ids", "1,2,3", "--max-new-tokens", 5, "--greedy",
                         "--json").stdout)
    assert len(out["ids"]) == 5 and out["tokens_per_s"] > 0 and isinstance(out["text"], str)
    by_text = json.loads(run("generate", "--checkpoint", ckpt, "--prompt", "Hi!", "--max-new-tokens", 4,
                             "--json").stdout)
    assert len(by_text["ids"]) == 4


def test_generate_mtp_stats(ckpt):
    plain = json.loads(run("generate", "--checkpoint", ckpt, "--ids", "5,6,7", "--max-new-tokens", 8,
                           "--json").stdout)
    spec = json.loads(run("generate", "--checkpoint", ckpt, "--ids", "5,6,7", "--max-new-tokens", 8, "--mtp",
                          "--draft-depth", 2, "--json").stdout)
    assert spec["ids"] == plain["ids"]
    stats = spec["mtp"]
    for key in ("proposed", "accepted", "acceptance_rate", "acceptance_per_depth", "forward_passes_saved"):
        assert key in stats
    assert len(stats["acceptance_per_depth"]) == 2


def test_plan_quantize_inspect(ckpt, tmp_path):
    plan = json.loads(run("plan", "--preset", "ultra", "--recipe", "ultra", "--gpus", 8, "--gpu-mem-gib", 80,
                          "--json").stdout)
    assert plan["gpus"]["fits"] is True
    text = run("plan", "--preset", "nano").stdout
    assert "31.6" in text               # the published figure printed beside the computed one
    q = tmp_path / "q"
    run("quantize", ckpt, q, "--recipe", "ultra")
    report = json.loads(run("inspect", q, "--json").stdout)
    assert {g["format"] for g in report["groups"]} >= {"nvfp4", "fp8", "bf16"}
    assert "bits/param" in run("inspect", q).stdout


def test_errors_are_one_line(ckpt, tmp_path):
    assert_one_line_error(run("forward", "--checkpoint", tmp_path / "nope", "--ids", "1", ok=False), "nope")
    assert_one_line_error(run("forward", "--checkpoint", ckpt, "--ids", "1,x", ok=False), "--ids")
    assert_one_line_error(run("forward", "--checkpoint", ckpt, "--ids", "1,999", ok=False), "999", "vocabulary")
    assert_one_line_error(run("plan", "--preset", "mega", ok=False), "mega")
    nocfg = tmp_path / "bare"
    run("make-random", "--preset", "tiny", nocfg)
    assert_one_line_error(run("generate", "--checkpoint", nocfg, "--prompt", "hi", ok=False), "tokenizer",
                          "--ids")
    (nocfg / "model.safetensors").write_bytes((nocfg / "model.safetensors").read_bytes()[:1000])
    assert_one_line_error(run("forward", "--checkpoint", nocfg, "--ids", "1", ok=False), "model.safetensors")
