"""Golden vectors (nemo_scratch/golden.py, docs/oracle.md section 4) as a kernel author gets them: through the CLI.

For every op of golden.OPS, ``python -m nemo_scratch golden`` (a subprocess, at a non-default shape) writes a
file; read_golden re-loads it with the requested shapes; the reference recomputes out64 bit for bit and out32
within (key, float32); out32 and out64 agree within (key, float32); integer outputs and EXACT ops match
exactly; check_golden agrees and catches a tampered file. Bad --op / --shape / --seed print one line
``error: ...`` and exit with status 2 (a few as subprocesses, all through ``cli.main``). The subprocesses run
concurrently to keep the file fast.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from tolerances import TOLERANCES, assert_close

from nemo_scratch import cli, golden
from nemo_scratch.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from nemo_scratch.errors import CheckpointError, InputError

# op -> a --shape that differs from the defaults: non-multiples of the chunk, warp and NVFP4 block where it can
SHAPES = {
    "rms_norm": "b=2,t=3,d=37",
    "gated_rms_norm": "b=2,t=3,i=48,g=3",
    "causal_conv1d": "b=2,t=5,c=33,w=3",
    "causal_conv1d_step": "b=3,c=33,w=4",
    "ssd_scan_chunked": "b=2,t=37,h=6,p=4,g=3,n=8,chunk=16",
    "ssd_step": "b=2,h=6,p=4,g=3,n=8",
    "gqa_attention": "b=2,t=5,s=33,q=6,kv=2,dh=8",
    "route": "t=5,d=24,e=12,k=3,n_group=4,topk_group=2",
    "moe_experts": "t=7,e=5,k=3,f=12,l=9",
    "nvfp4_matmul": "m=3,out=5,in=48",
    "nvfp4_dequantize": "out=3,in=80",
}
BAD = {  # argv -> a fragment the one-line error must contain; the first three run as subprocesses
    ("--op", "no_such_op"): "--op 'no_such_op' has no golden vectors",
    ("--op", "rms_norm", "--shape", "z=3"): "has no dimension 'z'",
    ("--op", "gated_rms_norm", "--shape", "i=10,g=3"): "does not fit gated_rms_norm",
    ("--op", "rms_norm", "--shape", "t=x"): "t='x' is not an integer",
    ("--op", "rms_norm", "--shape", "t=0"): "t must be positive",
    ("--op", "gqa_attention", "--shape", "t=5,s=4"): "does not fit gqa_attention",
    ("--op", "moe_experts", "--shape", "e=2,k=3"): "k=3 distinct experts, so k <= e=2",
    ("--op", "rms_norm", "--seed", "-1"): "--seed must be a non-negative integer",
}
SUBPROCESS_BAD = list(BAD)[:3]


def run_all(calls):
    """Run ``{key: golden-argv}`` as concurrent ``python -m nemo_scratch golden`` subprocesses -> {key: result}."""
    procs = {key: subprocess.Popen([sys.executable, "-m", "nemo_scratch", "golden", *map(str, argv)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, argv in calls.items()}
    outputs = {key: p.communicate(timeout=120) for key, p in procs.items()}
    return {key: subprocess.CompletedProcess(p.args, p.returncode, *outputs[key]) for key, p in procs.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every CLI call of this file, started together: ({op: (path, result)}, {bad argv: result})."""
    folder = tmp_path_factory.mktemp("golden")
    paths = {op: folder / f"{op}.safetensors" for op in SHAPES}
    results = run_all({**{op: ("--op", op, "--shape", spec, "--seed", 7, "--out", paths[op])
                          for op, spec in SHAPES.items()},
                       **{argv: (*argv, "--out", folder / "bad.safetensors") for argv in SUBPROCESS_BAD}})
    return {op: (paths[op], results[op]) for op in SHAPES}, {argv: results[argv] for argv in SUBPROCESS_BAD}


def test_every_op_has_a_shape():
    assert sorted(SHAPES) == sorted(golden.OPS)


@pytest.mark.parametrize("op", sorted(golden.OPS))
def test_cli_writes_a_file_read_golden_reloads(op, runs):
    path, proc = runs[0][op]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {path}"
    name, inputs, static, outs, meta = golden.read_golden(path)
    defaults, make, _, outputs, key = golden.OPS[op]
    dims = golden.parse_dims(op, SHAPES[op])
    assert name == op and json.loads(meta["dims"]) == dims != defaults
    assert meta["seed"] == "7" and meta["tolerance_key"] == key
    assert meta["kernel_tolerance_key"] == golden.kernel_key(key)
    if key != golden.EXACT:
        rtol, atol, _ = TOLERANCES[(f"kernel_{key}", "float32")]
        assert (float(meta["kernel_rtol"]), float(meta["kernel_atol"])) == (rtol, atol)
    # the file holds exactly the inputs the maker draws (same seed: same values) and the op's outputs
    want_inputs, want_static = make(np.random.default_rng(7), dims)
    assert static == want_static and sorted(inputs) == sorted(want_inputs)
    for arg, value in want_inputs.items():
        assert inputs[arg].dtype == value.dtype and np.array_equal(inputs[arg], value), arg
    assert sorted(outs["out64"]) == sorted(outs["out32"]) == sorted(outputs)


@pytest.mark.parametrize("op", sorted(golden.OPS))
def test_reference_reproduces_the_file(op, runs):
    name, inputs, static, outs, meta = golden.read_golden(runs[0][op][0])
    assert name == op
    key = meta["tolerance_key"]
    out64 = dict(zip(golden.OPS[op][3], golden.compute(op, inputs, static, np.float64)))
    out32 = dict(zip(golden.OPS[op][3], golden.compute(op, inputs, static, np.float32)))
    for n in golden.OPS[op][3]:
        # float64: bit for bit on the machine that wrote it
        assert out64[n].dtype == outs["out64"][n].dtype and out64[n].shape == outs["out64"][n].shape
        assert out64[n].tobytes() == outs["out64"][n].tobytes(), n
        if key == golden.EXACT or out32[n].dtype.kind != "f":
            assert out32[n].dtype == outs["out32"][n].dtype and np.array_equal(out32[n], outs["out32"][n]), n
            assert np.array_equal(outs["out32"][n], outs["out64"][n]), n
            continue
        assert outs["out32"][n].dtype == np.float32 and outs["out64"][n].dtype == np.float64
        assert_close(out32[n], outs["out32"][n], key, what=f"{op} out32.{n} recomputed")
        # float32 and float64 outputs agree within the float32 tolerance
        assert_close(outs["out32"][n].astype(np.float64), outs["out64"][n], key, dtype=np.float32,
                     what=f"{op} out32.{n} vs out64.{n}")


@pytest.mark.parametrize("op", sorted(golden.OPS))
def test_check_golden_passes_then_catches_tampering(op, runs, tmp_path):
    path = runs[0][op][0]
    report = golden.check_golden(path)
    assert set(report) == {"out64", "out32", "out32_vs_out64"}
    for check in report.values():
        assert sorted(check) == sorted(golden.OPS[op][3]) and all(e["used"] <= 1 for e in check.values())
    assert all(e["max_abs"] == 0.0 for e in report["out64"].values())
    # one element of out32 moved by 1% (or, for integer outputs, by one): out of tolerance
    f = SafetensorsFile(path)
    tensors = {k: (np.array(f.get(k)), f.dtype_of(k)) for k in f.keys()}
    first = f"out32.{golden.OPS[op][3][0]}"
    bad = tensors[first][0].copy()
    bad.flat[0] = bad.flat[0] + 1 if bad.dtype.kind in "iu" else bad.flat[0] * bad.dtype.type(1.01) + 1
    tensors[first] = (bad, tensors[first][1])
    tampered = write_safetensors(tmp_path / "tampered.safetensors", tensors, metadata=f.metadata)
    with pytest.raises(CheckpointError, match=rf"out32 '{golden.OPS[op][3][0]}' of {op} is out of tolerance"):
        golden.check_golden(tampered)


def assert_one_line_error(returncode, stderr, fragment):
    lines = stderr.strip().splitlines()
    assert returncode == 2, (returncode, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("argv", SUBPROCESS_BAD, ids=[" ".join(a) for a in SUBPROCESS_BAD])
def test_bad_arguments_give_one_line_error_and_status_2(argv, runs):
    assert_one_line_error(runs[1][argv].returncode, runs[1][argv].stderr, BAD[argv])


@pytest.mark.parametrize("argv", list(BAD), ids=[" ".join(a) for a in BAD])
def test_bad_arguments_in_process(argv, tmp_path, capsys):
    """The same error path through cli.main (what the subprocess runs), for every bad argument."""
    code = cli.main(["golden", *argv, "--out", str(tmp_path / "bad.safetensors")])
    assert_one_line_error(code, capsys.readouterr().err, BAD[argv])
    assert not (tmp_path / "bad.safetensors").exists()


def test_same_seed_same_file_other_seed_other_inputs(tmp_path):
    a = golden.write_golden("ssd_step", "", tmp_path / "a.safetensors", seed=3)
    b = golden.write_golden("ssd_step", "", tmp_path / "b.safetensors", seed=3)
    c = golden.write_golden("ssd_step", "", tmp_path / "c.safetensors", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(golden.read_golden(a)[1]["x"], golden.read_golden(c)[1]["x"])


def test_read_golden_rejects_files_that_are_not_golden(tmp_path):
    plain = write_safetensors(tmp_path / "plain.safetensors", {"w": (np.zeros(3, np.float32), "F32")})
    with pytest.raises(CheckpointError, match="not a golden file"):
        golden.read_golden(plain)
    meta = {"op": "rms_norm", "static": "{}", "tolerance_key": "rms_norm"}
    stray = write_safetensors(tmp_path / "stray.safetensors", {"weights.w": (np.zeros(3), "F64")}, metadata=meta)
    with pytest.raises(CheckpointError, match="'weights.w' is not in.<arg>"):
        golden.read_golden(stray)
    short = write_safetensors(tmp_path / "short.safetensors", {"out64.y": (np.zeros(3), "F64")}, metadata=meta)
    with pytest.raises(CheckpointError, match=r"out32 holds \[\], expected the outputs \['y'\]"):
        golden.read_golden(short)


def test_compare_formula_and_exact_keys():
    ref = np.array([1.0, -2.0, 0.0])
    rtol, atol, _ = TOLERANCES[("ssd", "float64")]
    edge = ref + (atol + rtol * np.abs(ref))                        # exactly on the budget
    assert golden.compare(edge, ref, "ssd", np.float64)["used"] == pytest.approx(1.0)
    over = golden.compare(ref + 2 * (atol + rtol * np.abs(ref)), ref, "ssd", np.float64)
    assert over["used"] > 1 and over["first_bad"] == (0,) and over["n_bad"] == 3
    assert over["reason"] == "3 of 3 elements out of tolerance"
    assert golden.compare(edge, ref, "ssd", np.float64, atol_scale=4.0)["used"] < 1     # atol * atol_scale
    nan = golden.compare(np.array([1.0, np.nan]), np.array([1.0, 1.0]), "ssd", np.float64)
    assert nan["used"] == np.inf and nan["first_bad"] == (1,) and "non-finite" in nan["reason"]
    neg_zero, zero = np.array([-0.0], np.float32), np.array([0.0], np.float32)
    assert golden.compare(neg_zero, zero, golden.EXACT, np.float32)["used"] == np.inf   # bits, not values
    assert golden.compare(zero, zero, golden.EXACT, np.float32)["used"] == 0.0
    with pytest.raises(InputError, match="has no golden vectors"):
        golden.parse_dims("nope", "")
    with pytest.raises(InputError, match="tolerance key 'nope' has no float32 entry"):
        golden.compare(ref, ref, "nope", np.float32)


def test_compare_checks_shape_and_dtype_first_with_a_reason():
    ref = np.arange(6, dtype=np.float32).reshape(2, 3)
    transposed = golden.compare(ref.T.copy(), ref, "ssd", np.float32)
    assert transposed["used"] == np.inf and transposed["reason"] == \
        "shape [3, 2], expected [2, 3] (the same sizes in another order: a transposed result?)"
    assert golden.compare(ref[:1], ref, "ssd", np.float32)["reason"] == "shape [1, 3], expected [2, 3]"
    wide = golden.compare(ref.astype(np.float64), ref, "ssd", np.float32)      # the values are right
    assert wide["used"] == np.inf and wide["reason"] == "dtype float64, expected float32"
    # a float32 result held to the float64 reference (out32 vs out64) is the normal case
    assert golden.compare(ref, ref.astype(np.float64), "ssd", np.float32)["reason"] is None
    assert "less precise" in golden.compare(ref.astype(np.float64), ref, "ssd", np.float64)["reason"]
    idx = np.array([[0, 1]], np.int64)
    assert golden.compare(idx.astype(np.int32), idx, "router", np.float32)["reason"] == "dtype int32, expected int64"
    assert golden.compare(idx[:, ::-1], idx, "router", np.float32)["first_bad"] == (0, 0)


def test_exact_compare_takes_any_nan_where_the_reference_has_one():
    ref = np.array([np.nan, 1.5, -0.0], np.float32)
    canonical = np.array([0x7FFFFFFF, 0x3FC00000, 0x80000000], np.uint32).view(np.float32)   # a GPU's NaN
    assert golden.compare(canonical, ref, golden.EXACT, np.float32)["used"] == 0.0
    moved = golden.compare(np.array([1.5, np.nan, -0.0], np.float32), ref, golden.EXACT, np.float32)
    assert moved["used"] == np.inf and moved["first_bad"] == (0,) and moved["n_bad"] == 2


# op -> case -> what the written inputs must show
CASE_SHAPES = {"route": "t=6,d=24,e=12,k=3,n_group=4,topk_group=2", "ssd_scan_chunked": "t=37,chunk=16",
               "nvfp4_dequantize": "out=5,in=48", "nvfp4_matmul": "m=3,out=5,in=48"}


@pytest.mark.parametrize("op, case", [(op, case) for op in sorted(golden.OPS)
                                      for case in golden.case_names(op)[1:]])
def test_every_case_writes_a_file_that_checks(op, case, tmp_path):
    out = golden.write_golden(op, CASE_SHAPES.get(op, ""), tmp_path / "case.safetensors", seed=3, case=case)
    name, inputs, static, outs, meta = golden.read_golden(out)
    assert name == op and meta["case"] == case and float(meta["atol_scale"]) >= 1
    key = golden.OPS[op][4]
    if key != golden.EXACT:
        atol = TOLERANCES[(golden.kernel_key(key), "float32")][1]
        assert float(meta["kernel_atol"]) == pytest.approx(atol * float(meta["atol_scale"]))
    report = golden.check_golden(out)
    assert all(e["used"] <= 1 for check in report.values() for e in check.values())


def test_tie_and_boundary_cases_hold_what_they_claim(tmp_path):
    def inputs(op, case, shape=""):
        out = golden.write_golden(op, CASE_SHAPES.get(op, shape), tmp_path / f"{op}_{case}.safetensors", seed=1,
                                  case=case)
        return golden.read_golden(out)

    _, route, static, outs, _ = inputs("route", "ties")
    scores = 1 / (1 + np.exp(-(route["x"] @ route["gate_weight"].T))) + route["correction_bias"]
    chosen = np.take_along_axis(scores, outs["out64"]["idx"], axis=1)
    # some token's selection holds two experts with exactly equal scores: ties, to the lower index
    tied = [(t, j) for t in range(scores.shape[0]) for j in range(1, chosen.shape[1])
            if chosen[t, j] == chosen[t, j - 1]]
    assert tied and all(outs["out64"]["idx"][t, j] > outs["out64"]["idx"][t, j - 1] for t, j in tied)
    _, ssd_in, _, _, _ = inputs("ssd_scan_chunked", "dt_floor")
    assert np.mean(np.isin(ssd_in["dt"], (0.0, 1e-3))) > 0.5 and (ssd_in["dt"] == 0).any()
    _, nv, _, outs, _ = inputs("nvfp4_dequantize", "boundary_scales")
    codes = np.stack([nv["packed"] & 15, nv["packed"] >> 4], -1).reshape(5, 3, 16)
    assert (np.sort(codes, axis=-1) == np.arange(16)).all()            # every code in every block
    assert np.isnan(outs["out32"]["w"]).any() == bool(np.isin(nv["block_scale"], (0x7F, 0xFF)).any())
    with pytest.raises(InputError, match=r"--case 'ties': rms_norm has the cases \['random', 'zeros'"):
        golden.write_golden("rms_norm", "", tmp_path / "x.safetensors", case="ties")
    with pytest.raises(InputError, match="needs e >= 2 experts"):
        golden.write_golden("route", "e=1,k=1", tmp_path / "x.safetensors", case="ties")


def test_cli_check_reproduces_a_golden_file(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "g.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "nemo_scratch", "golden", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    assert run("--op", "gated_rms_norm", "--out", out).returncode == 0
    proc = run("--check", out)
    assert proc.returncode == 0 and "reproduces" in proc.stdout, proc.stderr
    missing = run("--op", "gated_rms_norm")
    assert missing.returncode == 2 and missing.stderr.startswith("error: golden: pass --op")
    ties = tmp_path / "ties.safetensors"
    assert run("--op", "route", "--case", "ties", "--out", ties).returncode == 0
    assert golden.read_golden(ties)[4]["case"] == "ties" and "reproduces" in run("--check", ties).stdout
    bad = run("--op", "route", "--case", "nope", "--out", tmp_path / "nope.safetensors")
    assert bad.returncode == 2 and "--case 'nope': route has the cases ['random', 'ties'" in bad.stderr
