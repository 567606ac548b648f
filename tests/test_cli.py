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


def test_every_option_says_what_it_does_and_its_default():
    """Each subcommand's --help: every option has help text, a default is printed where there is one, the
    choices of presets, recipes and golden ops are listed, and tiny says it is not the bundled model."""
    import argparse

    from nemo_scratch.cli import build_parser
    from nemo_scratch.golden import OPS
    from nemo_scratch.presets import PRESETS

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False):
                assert p.formatter_class(name)._get_help_string(action).count("default") >= 1, (name, action.dest)
        assert "(default: " in text or name == "inspect", name
    helps = {name: " ".join(p.format_help().split()) for name, p in sub.choices.items()}   # unwrapped
    assert all(preset in helps["make-random"] and preset in helps["plan"] for preset in PRESETS)
    assert all(op in helps["golden"] for op in OPS)
    assert "{bf16,fp8,nano,super,ultra}" in helps["plan"] and "not the bundled" in helps["plan"]
    assert "(default: 80.0)" in helps["plan"] and "(default: 0)" in helps["plan"]   # a zero default is printed


def test_generate_echoes_the_prompt_with_and_without_stream(ckpt):
    plain = run("generate", "--checkpoint", ckpt, "--prompt", "Hi", "--max-new-tokens", 4, "--greedy").stdout
    streamed = run("generate", "--checkpoint", ckpt, "--prompt", "Hi", "--max-new-tokens", 4, "--greedy",
                   "--stream").stdout
    assert plain.startswith("Hi") and plain.rstrip("\n") == streamed.rstrip("\n")


def test_plan_of_a_test_preset_says_what_it_is():
    out = run("plan", "--preset", "tiny").stdout
    assert "0.000B" not in out and "46,792" in out and "not the bundled trained model" in out
