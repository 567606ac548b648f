"""The dtype and shape policy of every reference op (docs/ops-api.md, "dtypes").

- float32 in gives float32 out, float64 in gives float64 out; integer outputs are int64;
- mixing float32 and float64 arguments raises DtypeError (never a silent promotion to float64);
- a misshaped argument raises ShapeError whose message names that argument.
"""

import numpy as np
import pytest

from nemo_scratch.errors import DtypeError, ShapeError
from nemo_scratch.ops import attention, conv, moe, norm, ssd

B, T, C, W = 2, 3, 4, 3                      # conv
H, P, G, N = 4, 2, 2, 3                      # ssd
Q, KV, DH, S = 4, 2, 2, 5                    # attention
D, E, K, F, L = 6, 4, 2, 3, 5                # moe


def case_args(name, dtype):
    """Keyword arguments of one valid call of op ``name`` in ``dtype``."""
    rng = np.random.default_rng(0)

    def a(*shape):
        return rng.standard_normal(shape).astype(dtype)

    idx = np.array([[0, 2], [3, 1], [1, 0]], dtype=np.int64)
    return {
        "rms_norm": dict(x=a(B, T, D), weight=a(D), eps=1e-5),
        "gated_rms_norm": dict(y=a(B, T, H * P), z=a(B, T, H * P), weight=a(H * P), n_groups=G, eps=1e-5),
        "causal_conv1d": dict(x=a(B, T, C), weight=a(C, W), bias=a(C), state=a(B, C, W)),
        "causal_conv1d_step": dict(x=a(B, C), state=a(B, C, W), weight=a(C, W), bias=a(C)),
        "discretize_dt": dict(dt_raw=a(B, T, H), dt_bias=a(H), dt_min=1e-3, dt_max=np.float64(10.0)),
        "ssd_scan_sequential": dict(x=a(B, T, H, P), dt=np.abs(a(B, T, H)), A=-np.abs(a(H)), B=a(B, T, G, N),
                                    C=a(B, T, G, N), D=a(H), initial_state=a(B, H, P, N)),
        "ssd_scan_chunked": dict(x=a(B, T, H, P), dt=np.abs(a(B, T, H)), A=-np.abs(a(H)), B=a(B, T, G, N),
                                 C=a(B, T, G, N), chunk=2, D=a(H), initial_state=a(B, H, P, N)),
        "ssd_step": dict(x=a(B, H, P), dt=np.abs(a(B, H)), A=-np.abs(a(H)), B=a(B, G, N), C=a(B, G, N), D=a(H),
                         state=a(B, H, P, N)),
        "gqa_attention": dict(q=a(B, T, Q, DH), k=a(B, S, KV, DH), v=a(B, S, KV, DH)),
        "gqa_decode": dict(q=a(B, 1, Q, DH), k=a(B, S, KV, DH), v=a(B, S, KV, DH)),
        # a float64 numpy scalar as the scale must not promote float32 weights
        "route": dict(x=a(T, D), gate_weight=a(E, D), correction_bias=a(E), top_k=K, n_group=2, topk_group=1,
                      routed_scaling_factor=np.float64(2.5)),
        "relu2": dict(x=a(T, D)),
        "mlp": dict(x=a(T, D), up=a(F, D), down=a(D, F)),
        "moe_experts": dict(x=a(T, L), idx=idx, weights=a(T, K), up=a(E, F, L), down=a(E, L, F)),
        "latent_moe": dict(x=a(T, D), idx=idx, weights=a(T, K), up=a(E, F, L), down=a(E, L, F), fc1=a(L, D),
                           fc2=a(D, L)),
    }[name]


OPS = {
    "rms_norm": norm.rms_norm, "gated_rms_norm": norm.gated_rms_norm,
    "causal_conv1d": conv.causal_conv1d, "causal_conv1d_step": conv.causal_conv1d_step,
    "discretize_dt": ssd.discretize_dt, "ssd_scan_sequential": ssd.ssd_scan_sequential,
    "ssd_scan_chunked": ssd.ssd_scan_chunked, "ssd_step": ssd.ssd_step,
    "gqa_attention": attention.gqa_attention, "gqa_decode": attention.gqa_decode,
    "route": moe.route, "relu2": moe.relu2, "mlp": moe.mlp, "moe_experts": moe.moe_experts,
    "latent_moe": moe.latent_moe,
}

# The arguments whose shape each op checks against the others (the first array of an op sets the sizes).
MISSHAPEN = {
    "rms_norm": ["weight"], "gated_rms_norm": ["z", "weight"],
    "causal_conv1d": ["x", "weight", "bias", "state"], "causal_conv1d_step": ["x", "state", "weight", "bias"],
    "discretize_dt": ["dt_bias"],
    "ssd_scan_sequential": ["x", "dt", "A", "B", "C", "D", "initial_state"],
    "ssd_scan_chunked": ["x", "dt", "A", "B", "C", "D", "initial_state"],
    "ssd_step": ["x", "dt", "A", "B", "C", "D", "state"],
    "gqa_attention": ["q", "k", "v"], "gqa_decode": ["q", "k", "v"],
    "route": ["x", "gate_weight", "correction_bias"], "mlp": ["up", "down"],
    "moe_experts": ["x", "idx", "weights", "up", "down"], "latent_moe": ["x", "fc1", "fc2"],
}


def float_outputs(result):
    return [r for r in (result if isinstance(result, tuple) else (result,)) if r.dtype.kind == "f"]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_dtype_follows_input_dtype(name, dtype):
    result = OPS[name](**case_args(name, dtype))
    outs = result if isinstance(result, tuple) else (result,)
    for out in outs:
        assert out.dtype == (np.int64 if out.dtype.kind == "i" else np.dtype(dtype)), f"{name}: {out.dtype}"
    assert float_outputs(result), f"{name} returned no float output"


def float_arrays(args):
    return [k for k, v in args.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]


@pytest.mark.parametrize("name", [n for n in OPS if len(float_arrays(case_args(n, "float32"))) > 1])
def test_mixing_float32_and_float64_raises(name):
    args = case_args(name, "float32")
    for arg in float_arrays(args)[1:]:  # each float64 array among float32 ones
        with pytest.raises(DtypeError, match="mix"):
            OPS[name](**{**args, arg: args[arg].astype(np.float64)})


@pytest.mark.parametrize("name", OPS)
def test_non_float_input_raises(name):
    args = case_args(name, "float32")
    first = float_arrays(args)[0]
    with pytest.raises(DtypeError, match="float32 or float64"):
        OPS[name](**{**args, first: args[first].astype(np.float16)})


@pytest.mark.parametrize("name, arg", [(n, a) for n, args in MISSHAPEN.items() for a in args])
def test_misshaped_argument_raises_naming_it(name, arg):
    args = case_args(name, "float32")
    bad = {**args, arg: args[arg][..., None]}  # one extra axis
    with pytest.raises(ShapeError, match=rf": {arg} has shape"):
        OPS[name](**bad)
