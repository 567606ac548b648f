"""The MoE mixer's pieces: the router, squared-ReLU MLPs and the routed experts of LatentMoE. Spec section 5.

The model composes them (spec 5, pitfalls 7-8):

    idx, w = route(x, gate, bias, k, ...)                        # reads the FULL width d
    out    = latent_moe(x, idx, w, up, down, fc1, fc2)           # fc2(experts(fc1(x))), fc = None: identity
           + mlp(x, shared_up, shared_down)                      # the shared expert: full width, unscaled

Every weight multiply goes through ``linear``, so a weight may be a dense array or a packed NVFP4Weight /
FP8Weight; stacked expert weights [e, ...] are indexed ``up[e]``. ``mlp`` and ``latent_moe`` are composite
ops: written once here over primitives that ``ops=`` supplies (a backend, whose kernels then run underneath;
None for the reference), so the model runs these very functions on every backend.
"""

import numpy as np

from .common import get_xp, reference_ops
from .contracts import check_latent_moe, check_mlp, check_moe_experts, check_relu2, check_route, dense
from .linear import linear
from .norm import sigmoid


def _top(scores, k):  # [t, m] -> [t, k] int64
    """Indices of the k largest scores per row, largest first; ties -> the lower index (a stable sort)."""
    xp = get_xp(scores)
    return xp.argsort(-scores, axis=-1, kind="stable")[:, :k].astype(xp.int64)


def route(x, gate_weight, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
          routed_scaling_factor=1.0):  # [t,d], [e,d], [e]|None -> (idx [t,k] int64, w [t,k])
    """NemotronHTopkRouter (= DeepseekV3TopkRouter, transformers 5.23): sigmoid scores, biased group-limited
    top-k selection, unbiased weights.

    idx is ordered by descending biased score, ties to the lower expert index (transformers' topk is
    unsorted, so only the selected SET is comparable with it); group ties go to the lower group index.
    """
    dtype, t, _, e = check_route(x, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                               routed_scaling_factor)
    xp = get_xp(x, gate_weight, correction_bias)
    # s = sigmoid(x gate^T)                                  [t, e]
    s = sigmoid(linear(x, gate_weight))
    # scores_for_choice = s + e_score_correction_bias      (the bias steers selection only)
    sc = s if correction_bias is None else s + correction_bias
    # group score = sum of the top-2 biased scores in each group of e/n_group experts
    # Deviation: a group of ONE expert scores its only expert (transformers' topk(2) would raise).
    grouped = sc.reshape(t, n_group, e // n_group)
    group_scores = xp.sum(xp.sort(grouped, axis=-1)[..., -2:], axis=-1)                           # [t, n_group]
    # keep the topk_group best groups; experts of the other groups score -inf
    kept = _top(group_scores, topk_group)                                                           # [t, topk_g]
    group_kept = xp.any(xp.arange(n_group)[None, None, :] == kept[:, :, None], axis=1)             # [t, n_group]
    expert_kept = xp.repeat(group_kept, e // n_group, axis=1)                                       # [t, e]
    # idx = topk(masked scores_for_choice, k)
    idx = _top(xp.where(expert_kept, sc, dtype.type(-np.inf)), top_k)                             # [t, k]
    # w = s[idx]: the UNBIASED sigmoid scores of the chosen experts
    w = xp.take_along_axis(s, idx, axis=-1)
    if norm_topk_prob:
        # w = w / (sum_k w + 1e-20)
        w = w / (xp.sum(w, axis=-1, keepdims=True) + dtype.type(1e-20))
    # w = w * routed_scaling_factor
    return idx, w * dtype.type(routed_scaling_factor)


def relu2(x):  # [...] -> [...]
    """Squared ReLU (mlp_hidden_act "relu2"): relu(x)**2."""
    check_relu2(x)
    xp = get_xp(x)
    r = xp.maximum(x, 0)
    return r * r


def mlp(x, up, down, ops=None):  # [..., d], [f,d], [d,f] -> [..., d]
    """The ungated squared-ReLU MLP: down(relu2(up(x))). Dense "mlp" blocks, the shared expert, one expert.

    ``ops`` supplies ``linear`` and ``relu2``: a backend, or None for the reference.
    """
    check_mlp(x, up, down)
    ops = ops or reference_ops()
    # y = down(relu2(up x))
    return ops.linear(ops.relu2(ops.linear(x, up)), down)


def moe_experts(x, idx, weights, up, down):  # [t,l], [t,k], [t,k], [e,f,l], [e,l,f] -> [t,l]
    """The routed experts in their own width l: out[t] = sum_j w[t,j] * down[e](relu2(up[e] x[t])), e = idx[t,j].

    Like transformers' NemotronHExperts: loop over the experts that were hit, in ascending order, gather
    their tokens, run the expert, and accumulate the weighted outputs in the compute dtype.
    """
    dtype, t, l, e, f, k = check_moe_experts(x, idx, weights, up, down)
    xp = get_xp(x, idx, weights, *dense(up, down))
    out = xp.zeros((t, l), dtype=dtype)
    for ex in xp.unique(idx).tolist():
        # the (token, slot) pairs routed to expert ex; each token at most once
        tok, slot = xp.nonzero(idx == ex)
        # out[tok] += w[tok, slot] * down[ex](relu2(up[ex] x[tok]))
        out[tok] += weights[tok, slot][:, None] * mlp(x[tok], up[ex], down[ex])
    return out


def latent_moe(x, idx, weights, up, down, fc1=None, fc2=None, ops=None):  # [t,d], [t,k], [t,k], [e,f,l], [e,l,f]
    """LatentMoE: squeeze to the latent width l, run the routed experts there, expand back -> [t,d].

    out = fc2(moe_experts(fc1(x), idx, weights, up, down)), fc1 [l,d], fc2 [d,l]; None = identity (l = d).
    The router has already read the full-width x; the shared expert is added by the caller.
    ``ops`` supplies ``linear`` and ``moe_experts``: a backend, or None for the reference.
    """
    check_latent_moe(x, idx, weights, up, down, fc1, fc2)
    ops = ops or reference_ops()
    # u = fc1 x                                  [t, l]
    u = x if fc1 is None else ops.linear(x, fc1)
    # r = routed experts in the latent space    [t, l]
    r = ops.moe_experts(u, idx, weights, up, down)
    # out = fc2 r                                [t, d]
    return r if fc2 is None else ops.linear(r, fc2)
