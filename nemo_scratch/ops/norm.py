"""RMSNorm and the Mamba-2 gated group RMSNorm. Spec sections 2 and 3.2.

Also home of the two smooth activations the other ops share: ``sigmoid`` (the router, spec 5) and ``silu``
(the norm's gate here, and the conv activation in conv.py), both exact at their limits (an overflowing ``exp`` gives the right 0).
"""

import numpy as np

from .common import get_xp
from .contracts import check_gated_rms_norm, check_rms_norm


def sigmoid(x):  # [...] -> [...]
    """sigma(x) = 1 / (1 + exp(-x)).

    For x below about -88 (float32) exp(-x) overflows to inf and 1 / (1 + inf) = 0 is the correct limit, so
    the overflow warning is silenced rather than avoided (one pass fewer than the exp(-|x|) form).
    """
    xp = get_xp(x)
    with np.errstate(over="ignore"):
        return 1 / (1 + xp.exp(-x))


def silu(x):  # [...] -> [...]
    """SiLU (swish): x * sigma(x)."""
    return x * sigmoid(x)


def rms_norm(x, weight, eps):  # [..., d], [d] -> [..., d]
    """RMSNorm over the last axis (NemotronHRMSNorm = LlamaRMSNorm, spec 2).

    transformers normalises in float32 and casts back to the input dtype; Llama casts before the weight
    multiply, transformers 5.23's NemotronH (and NVIDIA's remote code) after it. Here the input dtype IS the
    compute dtype (float32, or float64 in oracle mode), so the cast is the identity and both orders give the
    same numbers; we keep Llama's order: normalise, cast to the input dtype, then multiply by the weight.
    """
    dtype, _ = check_rms_norm(x, weight, eps)
    xp = get_xp(x, weight)
    eps = dtype.type(eps)  # a float64 eps from a config must not promote a float32 x
    # x_hat = x * rsqrt(mean(x^2) + eps)
    x_hat = x * (1 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps))
    # y = weight * x_hat.astype(input dtype)    (the cast is a no-op: see the docstring)
    return weight * x_hat.astype(x.dtype, copy=False)


def gated_rms_norm(y, z, weight, n_groups, eps):  # [..., i], [..., i], [i] -> [..., i]
    """The Mamba-2 output norm (Zamba2RMSNormGated, norm_before_gate=False, spec 3.2 and pitfall 4).

    The gate multiplies FIRST; then each of ``n_groups`` contiguous groups of i/n_groups channels is
    RMS-normalised on its own; then the weight multiplies.
    """
    dtype, i = check_gated_rms_norm(y, z, weight, n_groups, eps)
    xp = get_xp(y, z, weight)
    eps = dtype.type(eps)
    # g = y * silu(z)                                   (gate before the norm)
    g = y * silu(z)
    # gg[..., G, i/G]: group G holds channels G*i/n_groups ... (G+1)*i/n_groups - 1
    gg = g.reshape(*g.shape[:-1], n_groups, i // n_groups)
    # gg_hat = gg * rsqrt(mean(gg^2 over the group) + eps)
    gg = gg * (1 / xp.sqrt(xp.mean(gg * gg, axis=-1, keepdims=True) + eps))
    # out = weight * gg_hat, back in the [..., i] layout
    return weight * gg.reshape(g.shape)
