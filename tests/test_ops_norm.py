"""nemo_scratch.ops.norm: RMSNorm, the gated group RMSNorm (spec 2, 3.2), and the shared activations.

- rms_norm and gated_rms_norm equal a direct re-derivation (row by row, group by group, in float64);
- the gate multiplies before the norm and each group of i/n_groups channels is normalised on its own;
- sigmoid / silu never overflow;
- (oracle) both norms equal transformers' NemotronHRMSNorm / NemotronHRMSNormGated.
"""

import warnings

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_close

from nemo_scratch.errors import ShapeError
from nemo_scratch.ops.norm import gated_rms_norm, rms_norm, sigmoid, silu

DTYPES = st.sampled_from(["float32", "float64"])


def normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


@given(seed=st.integers(0, 2**16), lead=st.lists(st.integers(1, 3), max_size=2), d=st.integers(1, 40),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), dtype=DTYPES)
@example(seed=0, lead=[], d=1, scale=1.0, dtype="float32")
def test_rms_norm_matches_definition(seed, lead, d, scale, dtype):
    rng = np.random.default_rng(seed)
    x, weight = normal(rng, (*lead, d), dtype, scale), normal(rng, (d,), dtype)
    eps = 1e-5
    out = rms_norm(x, weight, eps)
    assert out.shape == x.shape and out.dtype == dtype
    want = np.empty(x.shape)
    for index in np.ndindex(*lead):
        row = x[index].astype(np.float64)
        want[index] = weight * (row / np.sqrt(np.sum(row ** 2) / d + eps))
    assert_close(out, want.astype(dtype), "rms_norm")


@given(seed=st.integers(0, 2**16), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       n_groups=st.integers(1, 4), width=st.integers(1, 6), dtype=DTYPES)
@example(seed=0, lead=[1], n_groups=1, width=1, dtype="float32")
def test_gated_rms_norm_matches_definition(seed, lead, n_groups, width, dtype):
    rng = np.random.default_rng(seed)
    i = n_groups * width
    y, z, weight = normal(rng, (*lead, i), dtype), normal(rng, (*lead, i), dtype, 3.0), normal(rng, (i,), dtype)
    eps = 1e-5
    out = gated_rms_norm(y, z, weight, n_groups, eps)
    assert out.shape == y.shape and out.dtype == dtype
    want = np.empty(y.shape)
    for index in np.ndindex(*lead):
        zz = z[index].astype(np.float64)
        g = y[index].astype(np.float64) * zz / (1 + np.exp(-zz))  # gate first: g = y * silu(z)
        for gg in range(n_groups):  # then each contiguous group of i / n_groups channels on its own
            part = slice(gg * width, (gg + 1) * width)
            want[index][part] = weight[part] * g[part] / np.sqrt(np.mean(g[part] ** 2) + eps)
    assert_close(out, want.astype(dtype), "gated_rms_norm")


def test_gated_rms_norm_groups_are_independent():
    """Scaling one group's inputs leaves the other groups' outputs alone (groups are i/n_groups wide, not i)."""
    rng = np.random.default_rng(1)
    y, z, weight = normal(rng, (2, 8), "float64"), normal(rng, (2, 8), "float64"), normal(rng, (8,), "float64")
    y2 = y.copy()
    y2[:, :4] *= 10.0
    a, b = gated_rms_norm(y, z, weight, 2, 0.0), gated_rms_norm(y2, z, weight, 2, 0.0)
    assert_close(b[:, 4:], a[:, 4:], "gated_rms_norm", what="untouched group")
    assert_close(b[:, :4], a[:, :4], "gated_rms_norm", what="scaled group (RMSNorm is scale-invariant)")
    assert not np.allclose(gated_rms_norm(y2, z, weight, 1, 0.0)[:, 4:], a[:, 4:])


def test_n_groups_must_divide_the_width():
    y = np.ones((2, 6), np.float32)
    with pytest.raises(ShapeError, match="n_groups"):
        gated_rms_norm(y, y, np.ones(6, np.float32), 4, 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_and_silu_never_overflow(dtype):
    x = np.array([-1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, u = sigmoid(x), silu(x)
    assert s.dtype == dtype and u.dtype == dtype
    assert s[0] == 0 and s[3] == 0.5 and s[-1] == 1 and u[0] == 0 and u[-1] == x[-1]
    mid = x[1:-1].astype(np.float64)
    assert_close(s[1:-1], (1 / (1 + np.exp(-mid))).astype(dtype), "activation", what="sigmoid")


@pytest.mark.oracle
def test_norms_match_transformers():
    torch = pytest.importorskip("torch", reason="the oracle test needs torch (extra 'oracle')")
    nh = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h",
                             reason="the oracle test needs transformers (extra 'oracle')")
    rng = np.random.default_rng(2)
    x, z = normal(rng, (2, 3, 12), "float32"), normal(rng, (2, 3, 12), "float32")
    weight = normal(rng, (12,), "float32")
    plain, gated = nh.NemotronHRMSNorm(12, eps=1e-5), nh.NemotronHRMSNormGated(12, group_size=4, eps=1e-5)
    with torch.no_grad():
        plain.weight.copy_(torch.from_numpy(weight))
        gated.weight.copy_(torch.from_numpy(weight))
        want_plain = plain(torch.from_numpy(x)).numpy()
        want_gated = gated(torch.from_numpy(x), gate=torch.from_numpy(z)).numpy()
    assert_close(rms_norm(x, weight, 1e-5), want_plain, "rms_norm", what="vs NemotronHRMSNorm")
    assert_close(gated_rms_norm(x, z, weight, 3, 1e-5), want_gated, "gated_rms_norm",
                 what="vs NemotronHRMSNormGated")
