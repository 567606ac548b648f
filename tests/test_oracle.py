"""nemo_scratch.oracle.check, as a kernel author uses it: right implementations pass, wrong ones fail with the
reason and the place.

Right: independent torch implementations (a sequential SSD recurrence, a stable-sort router, a gather MoE, a
float8_e4m3fn NVFP4 decode and matmul, attention with an explicit mask, RMSNorm), in float32 and float64.
Wrong: a router that breaks ties toward the HIGHER expert index, a transposed output, a float64 result, a
chunked scan that drops the state carried between chunks, a decode whose block index is off by one, attention
without the causal mask. Each failure names its cause and location. Results as torch tensors, lists and
``__array__`` objects are read; bad arguments are InputErrors. torch is the ``oracle`` extra.
"""

import ast

import numpy as np
import pytest
from hypothesis import find, given, settings

from nemo_scratch import oracle
from nemo_scratch.errors import InputError, OracleFailure
from nemo_scratch.golden import OPS
from nemo_scratch.ops import moe, norm, quant
from nemo_scratch.oracle import strategies

torch = pytest.importorskip("torch", reason="the torch implementations under test need torch (the oracle extra)")

pytestmark = pytest.mark.oracle
EXAMPLES = 20


# ---------------------------------------------------------------------------------------------- right ones (torch)

def torch_ssd(x, dt, A, B, C, chunk, D=None, initial_state=None):  # the recurrence, token by token
    rep = x.shape[2] // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)                # [b,t,h,n]
    state = initial_state.clone()
    ys = []
    for s in range(x.shape[1]):
        # state = exp(dt A) state + dt x B^T;  y = state C
        state = torch.exp(dt[:, s] * A)[..., None, None] * state + \
            (dt[:, s, :, None] * x[:, s])[..., None] * Bh[:, s, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, s]))
    return torch.stack(ys, 1) + D[:, None] * x, state


def torch_route(x, gate_weight, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                routed_scaling_factor=1.0, higher=False):
    s = torch.sigmoid(x @ gate_weight.T)
    sc = s + correction_bias
    t, e = sc.shape
    group_scores = sc.view(t, n_group, e // n_group).topk(min(2, e // n_group), dim=-1).values.sum(-1)
    kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    mask = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, kept, True).repeat_interleave(e // n_group, 1)
    masked = sc.masked_fill(~mask, float("-inf"))
    if higher:   # the bug: sort the experts in reverse, so a tie goes to the higher index
        idx = e - 1 - torch.sort(masked.flip(-1), dim=-1, descending=True, stable=True).indices[:, :top_k]
    else:        # a stable sort keeps tied experts in index order: the lower one first
        idx = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = s.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * routed_scaling_factor


def torch_moe(x, idx, weights, up, down):
    out = torch.zeros_like(x)
    for j in range(idx.shape[1]):
        h = torch.relu(torch.einsum("tfl,tl->tf", up[idx[:, j]], x)) ** 2
        out += weights[:, j, None] * torch.einsum("tlf,tf->tl", down[idx[:, j]], h)
    return out


E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def torch_dequantize(packed, block_scale, global_scale, off_by_one=False):
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()                    # low nibble first
    out, inn = codes.shape
    scales = block_scale.view(torch.float8_e4m3fn).float()                                    # [out, in/16]
    block = torch.arange(inn) // 16
    if off_by_one:   # the bug: the last element of each block reads the next block's scale
        block = torch.clamp((torch.arange(inn) + 1) // 16, max=inn // 16 - 1)
    return E2M1[codes] * scales[:, block] * global_scale


def torch_nvfp4_matmul(x, packed, block_scale, global_scale, transposed=False):
    w = torch_dequantize(packed, block_scale, global_scale).to(x.dtype)
    return w @ x.T if transposed else x @ w.T


def torch_attention(q, k, v, causal=True):
    b, t, nq, dh = q.shape
    s, r = k.shape[1], nq // k.shape[2]
    kk, vv = k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)
    scores = torch.einsum("btqd,bsqd->bqts", q, kk) * dh ** -0.5
    if causal:   # query i is key position s - t + i
        scores = scores.masked_fill(torch.arange(s)[None, :] > torch.arange(t)[:, None] + (s - t), float("-inf"))
    return torch.einsum("bqts,bsqd->btqd", torch.softmax(scores, -1), vv)


def torch_rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))


RIGHT = {
    "ssd_scan_chunked": torch_ssd,
    "route": torch_route,
    "moe_experts": torch_moe,
    "nvfp4_dequantize": torch_dequantize,
    "nvfp4_matmul": torch_nvfp4_matmul,
    "gqa_attention": torch_attention,
    "rms_norm": torch_rms_norm,
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", sorted(RIGHT))
def test_right_torch_implementations_pass(op, dtype):
    report = oracle.check(op, RIGHT[op], dtype=dtype, examples=EXAMPLES, convert=torch.from_numpy)
    assert isinstance(report, oracle.OracleReport)
    assert report.op == op and report.dtype == dtype and report.cases == EXAMPLES
    assert sum(report.by_case.values()) == EXAMPLES and set(report.by_case) <= set(oracle.case_names(op))
    assert len(report.by_case) >= 2, report.by_case          # adversarial cases were drawn, not only random
    assert 0.0 <= report.worst_used <= 1.0
    key = OPS[op][4]
    assert report.tolerance_key == (key if dtype == "float64" or key == "exact" else f"kernel_{key}")
    assert str(report).startswith(f"{op} ({dtype}): {EXAMPLES} cases pass")


def test_every_case_of_the_right_scan_and_router_runs():
    for op in ("ssd_scan_chunked", "route"):
        for case in oracle.case_names(op):
            report = oracle.check(op, RIGHT[op], examples=4, cases=(case,), convert=torch.from_numpy)
            assert report.by_case == {case: 4}


# ---------------------------------------------------------------------------------------------- wrong ones

def failure(op, fn, **kw):
    with pytest.raises(OracleFailure) as info:
        oracle.check(op, fn, examples=EXAMPLES, convert=torch.from_numpy, **kw)
    text = str(info.value)
    assert text.startswith(f"oracle.check({op!r}, ") and "reproduce: nemo-scratch golden --op " + op in text, text
    return text


def test_router_that_breaks_ties_toward_the_higher_index_fails_naming_the_tie():
    text = failure("route", lambda **kw: torch_route(**kw, higher=True))
    assert "case 'ties'" in text or "case 'zeros'" in text or "case 'saturated'" in text, text
    assert "output 'idx': " in text and "compared exactly" in text
    assert "first bad element: idx[" in text and "where: token " in text
    assert "(an exact tie) and the tie went to the HIGHER index" in text and "ties go to the LOWER expert index" in text


def test_transposed_output_fails_naming_the_shapes():
    text = failure("nvfp4_matmul", lambda **kw: torch_nvfp4_matmul(**kw, transposed=True))
    assert "output 'y': shape [" in text and "a transposed result?" in text and "the axes are [m, out]" in text
    # the shrunk case has m != out (else the transposed result would be right); the message names both
    got, want = (text.split("shape ")[1].split(", expected ")[0], text.split(", expected ")[1].split(" (")[0])
    assert ast.literal_eval(got) == list(reversed(ast.literal_eval(want))), text
    # with m > 1 a transposed result is told apart from a reshaped one, and named
    text = failure("nvfp4_matmul", lambda **kw: torch_nvfp4_matmul(**kw, transposed=True), dims={"m": 3})
    assert "cause: its values are the reference's with the axes in the order [out, m]: a transposed result" in text


def test_float64_result_fails_naming_the_dtypes():
    text = failure("rms_norm", lambda x, weight, eps: torch_rms_norm(x.double(), weight.double(), eps))
    assert "output 'y': dtype float64, expected float32" in text


def test_scan_that_drops_the_chunk_carry_fails_in_chunk_1():
    def no_carry(x, dt, A, B, C, chunk, D=None, initial_state=None):   # every chunk restarts from initial_state
        ys, states = [], []
        for c0 in range(0, x.shape[1], chunk):
            part = slice(c0, c0 + chunk)
            y, state = torch_ssd(x[:, part], dt[:, part], A, B[:, part], C[:, part], chunk, D, initial_state)
            ys.append(y)
        return torch.cat(ys, 1), state

    text = failure("ssd_scan_chunked", no_carry, cases=("random",))
    assert "output 'y': " in text and "elements out of tolerance" in text
    assert "where: chunk 1 of " in text and "step 0 inside it" in text, text
    assert "cause: chunk 0 is right and the error starts in chunk 1: the state carried from chunk to chunk" in text
    assert "% of the 'kernel_ssd' budget" in text


def test_off_by_one_block_scale_fails_naming_the_block():
    text = failure("nvfp4_dequantize", lambda **kw: torch_dequantize(**kw, off_by_one=True))
    assert "compared exactly" in text and "first bad element: w[" in text
    assert "(out=0, in=15)" in text and "where: 16-element block 0 of row 0 (columns 0..15" in text, text
    assert "element 15 of it" in text
    assert "is code" in text and "scaled by the scale of block 1, not of its own block 0" in text


def test_attention_without_the_causal_mask_fails_naming_the_query_tile():
    text = failure("gqa_attention", lambda q, k, v, causal=True: torch_attention(q, k, v, causal=False))
    assert "output 'o': " in text and "first bad element: o[0, 0, 0, 0]" in text, text
    assert "where: query 0 sits at key position" in text and "query tile 0 of 64 queries" in text
    assert "cause: it matches attention WITHOUT the causal mask" in text


def test_gqa_head_mapping_and_first_keys_mask_are_named():
    def tiled(q, k, v, causal=True):     # query head j reads kv head j % kv
        r = q.shape[2] // k.shape[2]
        return torch_attention(q, k.repeat(1, 1, r, 1), v.repeat(1, 1, r, 1))

    assert "(repeat, not tile)" in failure("gqa_attention", tiled, dims={"kv": 2, "q": 4})
    first = failure("gqa_attention", lambda q, k, v, causal=True: torch_attention(q, k[:, :q.shape[1]],
                                                                                  v[:, :q.shape[1]]))
    assert "aligned to the FIRST t keys" in first


def test_ties_within_the_right_set_and_wrong_order():
    def reversed_slots(**kw):
        idx, w = torch_route(**kw)
        return idx.flip(-1), w.flip(-1)

    text = failure("route", reversed_slots, dims={"k": 2, "e": 4})
    assert "has the right experts in another order" in text


# ---------------------------------------------------------------------------------------------- result types

def test_lists_and_array_objects_are_read():
    class Wrapped:                        # an array library of its own: only __array__
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a

    assert oracle.check("rms_norm", lambda **kw: norm.rms_norm(**kw).tolist(), examples=5).cases == 5
    assert oracle.check("rms_norm", lambda **kw: Wrapped(norm.rms_norm(**kw)), examples=5).cases == 5
    assert oracle.check("route", lambda **kw: tuple(a.tolist() for a in moe.route(**kw)), examples=5).cases == 5
    tensors = lambda **kw: tuple(torch.from_numpy(a).requires_grad_(a.dtype.kind == "f")   # noqa: E731
                                 for a in moe.route(**kw))
    assert oracle.check("route", tensors, examples=5).cases == 5


def test_unreadable_and_missing_outputs_fail():
    bf16 = failure("rms_norm", lambda **kw: torch_rms_norm(**kw).to(torch.bfloat16))
    assert "output 'y' is a torch.Tensor of dtype torch.bfloat16 that NumPy cannot hold" in bf16
    assert "returned one Tensor, expected a tuple of 2: (y, final_state)" in failure(
        "ssd_scan_chunked", lambda **kw: torch_ssd(**kw)[0])
    with pytest.raises(OracleFailure, match=r"raised ValueError: boom[\s\S]*reproduce: "):
        oracle.check("rms_norm", lambda **kw: (_ for _ in ()).throw(ValueError("boom")), examples=3)


def test_a_function_that_writes_its_input_fails():
    def in_place(x, weight, eps):
        x *= 2
        return norm.rms_norm(x / 2, weight, eps)

    with pytest.raises(OracleFailure, match=r"modified its input\(s\) \['x'\]"):
        oracle.check("rms_norm", in_place, examples=3)


def test_bad_arguments_are_input_errors():
    for kw, fragment in ((dict(op="nope"), "op 'nope' has no reference"), (dict(fn=3), "fn is a int"),
                         (dict(dtype="float16"), "dtype='float16'"), (dict(examples=0), "examples=0"),
                         (dict(cases=("ties",)), "rms_norm has the cases"), (dict(dims={"z": 3}), "dims names 'z'"),
                         (dict(dims={"d": 0}), "dims d=0"), (dict(convert=1), "convert is a int"),
                         (dict(tile=0), "tile=0")):
        args = {"op": "rms_norm", "fn": norm.rms_norm, **kw}
        with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
            oracle.check(args.pop("op"), args.pop("fn"), **args)


def test_pinned_dims_seed_and_cases():
    seen = []

    def spy(x, weight, eps):
        seen.append(x.shape)
        return norm.rms_norm(x, weight, eps)

    report = oracle.check("rms_norm", spy, examples=6, dims={"d": 64}, cases=("huge", "zeros"), seed=3)
    assert all(shape[-1] == 64 for shape in seen) and set(report.by_case) <= {"huge", "zeros"}
    assert report.worst_used == 0.0   # the reference itself


@settings(max_examples=30)
@given(d=strategies.crossing(1, 70, 32), case=strategies.cases("ssd_scan_chunked"))
def test_strategies_are_public_and_draw_valid_cases(d, case):
    assert 1 <= d <= 70
    assert isinstance(case, oracle.Case) and case.case in oracle.case_names("ssd_scan_chunked")
    assert case.dims["h"] % case.dims["g"] == 0 and 1 <= case.dims["t"] <= 3 * case.dims["chunk"] + 1
    assert case.golden_command().startswith("nemo-scratch golden --op ssd_scan_chunked --case ")


def test_strategies_cross_the_boundaries():
    assert sorted(strategies.DIMS) == sorted(OPS)
    quiet = settings(database=None, max_examples=500)
    assert find(strategies.crossing(1, 70, 32), lambda v: v == 33, settings=quiet) == 33
    # a ragged last chunk: t one past a multiple of chunk, at a chunk > 1
    ragged = find(strategies.cases("ssd_scan_chunked"), lambda c: c.dims["chunk"] > 1 and
                  c.dims["t"] % c.dims["chunk"] == 1 and c.dims["t"] > c.dims["chunk"], settings=quiet)
    assert ragged.dims["t"] == ragged.dims["chunk"] + 1
    ties = find(strategies.cases("route"), lambda c: c.case == "ties", settings=quiet)
    assert ties.dims["e"] >= 2                     # NEEDS: a tie takes two experts
    assert find(strategies.cases("nvfp4_matmul"), lambda c: c.dims["out"] == 129, settings=quiet)


def test_to_numpy_reads_every_array_kind():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert oracle.to_numpy(torch.from_numpy(a)).dtype == np.float32
    assert oracle.to_numpy(torch.from_numpy(a).requires_grad_()).tolist() == a.tolist()
    assert oracle.to_numpy([[1.0, 2.0]], like=a).dtype == np.float32      # lists take the reference's dtype
    assert oracle.to_numpy([[1, 2]], like=a).dtype == np.int64            # but not across kinds
    assert quant.e2m1_decode(np.arange(16, dtype=np.uint8)).tobytes() == oracle.to_numpy(E2M1.numpy()).tobytes()


# ---------------------------------------------------------------------------------------------- the doc

def test_doc_shows_what_check_prints():
    """docs/oracle.md section 6: each example block prints the indented report below it (numbers aside, which
    rounding may move between machines)."""
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "oracle.md").read_text()
    section = text[text.index("## 6. Testing your own implementation"):]
    pairs = re.findall(r"^```python\n(.*?)^```\n\n(?:It prints|prints):\n\n((?:    [^\n]*\n)+)", section,
                       flags=re.S | re.M)
    assert len(pairs) == 2, "section 6 shows a torch SSD and a NumPy router, each with what it prints"
    mask = lambda s: re.sub(r"-?\d+(\.\d+)?(e[+-]?\d+)?", "#", s)   # noqa: E731
    for code, shown in pairs:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "docs/oracle.md", "exec"), {"__name__": "oracle_doc"})
        want = [mask(line[4:]) for line in shown.splitlines()]
        got = [mask(line) for line in printed.getvalue().splitlines()]
        if want[0].startswith("ssd_scan_chunked (float#): # cases pass"):   # the report: its worst case may move
            want[0], got[0] = want[0].split("; worst")[0], got[0].split("; worst")[0]
        assert got == want, printed.getvalue()
