"""The MoE mixer's pieces: the router, squared-ReLU MLPs and the routed experts of LatentMoE. Spec section 5.

The model composes them (spec 5, pitfalls 7-8):

    idx, w = route(x, gate, bias, k, ...)                        # reads the FULL width d
    out    = latent_moe(x, idx, w, up, down, fc1, fc2)           # fc2(experts(fc1(x))), fc = None: identity
           + mlp(x, shared_up, shared_down)                      # the shared expert: full width, unscaled

Every weight multiply goes through ``linear``, so a weight may be a dense array or a packed NVFP4Weight /
FP8Weight; stacked expert weights [e, ...] are indexed ``up[e]``.
"""

import numpy as np

from ..errors import DtypeError, InputError, ShapeError
from .common import check_float, check_shape, get_xp
from .linear import linear
from .norm import sigmoid
from .quant import FP8Weight, NVFP4Weight, _check_fp8, _check_nvfp4


def _dense(*weights):
    """The weights that are plain float arrays (packed ones are decoded inside ``linear``)."""
    return [w for w in weights if w is not None and not isinstance(w, (NVFP4Weight, FP8Weight))]


def _top(scores, k):  # [t, m] -> [t, k] int64
    """Indices of the k largest scores per row, largest first; ties -> the lower index (a stable sort)."""
    xp = get_xp(scores)
    return xp.argsort(-scores, axis=-1, kind="stable")[:, :k].astype(xp.int64)


def check_route(name, x, gate_weight, correction_bias, top_k, n_group, topk_group):  # -> dtype
    """The argument rules of the router (shared with the GPU backends' launchers)."""
    dtype = check_float(name, x, *_dense(gate_weight), correction_bias)
    check_shape(name, "x", x, (None, None))
    t, d = x.shape
    check_shape(name, "gate_weight", gate_weight, (None, d))
    e = gate_weight.shape[0]
    if correction_bias is not None:
        check_shape(name, "correction_bias", correction_bias, (e,))
    if not 1 <= n_group <= e or e % n_group:
        raise InputError(f"{name}: n_group={n_group} must divide the e={e} experts")
    if not 1 <= topk_group <= n_group:
        raise InputError(f"{name}: topk_group={topk_group}, expected 1 <= topk_group <= n_group={n_group}")
    if not 1 <= top_k <= topk_group * (e // n_group):
        raise InputError(f"{name}: top_k={top_k}, expected 1 <= top_k <= {topk_group * (e // n_group)} (the "
                         f"experts in the topk_group={topk_group} kept groups of {e // n_group})")
    return dtype


def route(x, gate_weight, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
          routed_scaling_factor=1.0):  # [t,d], [e,d], [e]|None -> (idx [t,k] int64, w [t,k])
    """NemotronHTopkRouter (= DeepseekV3TopkRouter, transformers 5.23): sigmoid scores, biased group-limited
    top-k selection, unbiased weights.

    idx is ordered by descending biased score, ties to the lower expert index (transformers' topk is
    unsorted, so only the selected SET is comparable with it); group ties go to the lower group index.
    """
    dtype = check_route("route", x, gate_weight, correction_bias, top_k, n_group, topk_group)
    (t, _), e = x.shape, gate_weight.shape[0]
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
    check_float("relu2", x)
    xp = get_xp(x)
    r = xp.maximum(x, 0)
    return r * r


def mlp(x, up, down):  # [..., d], [f,d], [d,f] -> [..., d]
    """The ungated squared-ReLU MLP: down(relu2(up(x))). Dense "mlp" blocks, the shared expert, one expert."""
    name = "mlp"
    check_float(name, x, *_dense(up, down))
    if x.ndim < 1:
        raise ShapeError(f"{name}: x has shape {list(x.shape)}, expected [..., d]")
    d = x.shape[-1]
    check_shape(name, "up", up, (None, d))
    check_shape(name, "down", down, (d, up.shape[0]))
    # y = down(relu2(up x))
    return linear(relu2(linear(x, up)), down)


def check_experts(name, x, idx, weights, up, down):  # -> (dtype, t, l, e, f)
    """The shape and dtype rules of the routed experts (shared with the GPU backends' launchers)."""
    dtype = check_float(name, x, weights, *_dense(up, down))
    check_shape(name, "x", x, (None, None))
    t, l = x.shape
    check_shape(name, "idx", idx, (t, None))
    check_shape(name, "weights", weights, tuple(idx.shape))
    check_shape(name, "up", up, (None, None, l))
    e, f = up.shape[:2]
    check_shape(name, "down", down, (e, l, f))
    if not np.issubdtype(idx.dtype, np.integer):
        raise DtypeError(f"{name}: idx has dtype {idx.dtype}, expected integer expert indices")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= e):
        raise InputError(f"{name}: idx holds expert ids in [{int(idx.min())}, {int(idx.max())}], expected "
                         f"[0, {e}) for the e={e} experts of up/down")
    xp = get_xp(idx)
    ordered = xp.sort(idx, axis=-1)
    if bool(xp.any(ordered[:, 1:] == ordered[:, :-1])):
        raise InputError(f"{name}: idx names one expert twice for a token; route() picks k distinct experts")
    for w, arg in ((up, "up"), (down, "down")):  # packed stacks: the codec's own rules
        if isinstance(w, NVFP4Weight):
            _check_nvfp4(f"{name} ({arg})", w.packed, w.block_scale, w.global_scale)
        elif isinstance(w, FP8Weight):
            _check_fp8(f"{name} ({arg})", w.data, w.scale)
    return dtype, t, l, e, f


def moe_experts(x, idx, weights, up, down):  # [t,l], [t,k], [t,k], [e,f,l], [e,l,f] -> [t,l]
    """The routed experts in their own width l: out[t] = sum_j w[t,j] * down[e](relu2(up[e] x[t])), e = idx[t,j].

    Like transformers' NemotronHExperts: loop over the experts that were hit, in ascending order, gather
    their tokens, run the expert, and accumulate the weighted outputs in the compute dtype.
    """
    name = "moe_experts"
    dtype, t, l, e, f = check_experts(name, x, idx, weights, up, down)
    xp = get_xp(x, idx, weights, *_dense(up, down))
    out = xp.zeros((t, l), dtype=dtype)
    for ex in xp.unique(idx).tolist():
        # the (token, slot) pairs routed to expert ex; each token at most once
        tok, slot = xp.nonzero(idx == ex)
        # out[tok] += w[tok, slot] * down[ex](relu2(up[ex] x[tok]))
        out[tok] += weights[tok, slot][:, None] * mlp(x[tok], up[ex], down[ex])
    return out


def latent_moe(x, idx, weights, up, down, fc1=None, fc2=None):  # [t,d], [t,k], [t,k], [e,f,l], [e,l,f] -> [t,d]
    """LatentMoE: squeeze to the latent width l, run the routed experts there, expand back.

    out = fc2(moe_experts(fc1(x), idx, weights, up, down)), fc1 [l,d], fc2 [d,l]; None = identity (l = d).
    The router has already read the full-width x; the shared expert is added by the caller.
    """
    name = "latent_moe"
    check_float(name, x, *_dense(fc1, fc2))
    check_shape(name, "x", x, (None, None))
    d = x.shape[1]
    if fc1 is not None:
        check_shape(name, "fc1", fc1, (None, d))
    if fc2 is not None:
        check_shape(name, "fc2", fc2, (d, up.shape[-1]))
    # u = fc1 x                                  [t, l]
    u = x if fc1 is None else linear(x, fc1)
    # r = routed experts in the latent space    [t, l]
    r = moe_experts(u, idx, weights, up, down)
    # out = fc2 r                                [t, d]
    return r if fc2 is None else linear(r, fc2)
