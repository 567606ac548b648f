"""The causal depthwise conv1d of the Mamba-2 mixer, over a sequence and one token at a time. Spec 3.1, 3.3.

The conv runs on xBC only (pitfall 2), one filter of width w per channel. The model squeezes
``conv1d.weight`` [c, 1, w] to [c, w]. The state is the last w RAW inputs (before bias and activation),
oldest first, exactly the ``conv_state`` transformers keeps in its cache.
"""

from .common import get_xp
from .contracts import check_causal_conv1d, check_causal_conv1d_step
from .norm import silu


def _activation(activation):
    """The conv activation as a function: ``"silu"`` (mamba_hidden_act) or None (the raw convolution)."""
    return silu if activation == "silu" else (lambda y: y)


def causal_conv1d(x, weight, bias, state=None, activation="silu"):  # [b,t,c], [c,w], [c]|None, [b,c,w]|None
    """Causal depthwise conv over the sequence -> (y [b,t,c], new_state [b,c,w]).

    ``state`` (the cache's conv_state) supplies its last w-1 columns as left context; None means zeros
    (spec 3.1: x[<0] = 0). new_state holds the last w raw inputs, left zero-padded when t < w.
    """
    dtype, b, t, c, w = check_causal_conv1d(x, weight, bias, state, activation)
    xp = get_xp(x, weight, bias, state)
    if state is None:
        state = xp.zeros((b, c, w), dtype=dtype)
    # full = concat(state, x^T) along time: [b, c, w + t], oldest first
    full = xp.concatenate([state, xp.swapaxes(x, 1, 2)], axis=2)
    # xpad = concat(state[:, :, 1:], x^T): the w-1 columns of left context, then the sequence
    xpad = full[:, :, 1:]
    # y[:, :, t] = bias + sum_j weight[:, j] * xpad[:, :, t + j]
    y = sum(weight[None, :, j, None] * xpad[:, :, j:j + t] for j in range(w))                      # [b,c,t]
    if bias is not None:
        y = y + bias[None, :, None]
    y = xp.ascontiguousarray(xp.swapaxes(y, 1, 2))                                                  # [b,t,c]
    # new_state = the last w columns of concat(state, x^T)
    new_state = xp.ascontiguousarray(full[:, :, -w:])
    return _activation(activation)(y), new_state


def causal_conv1d_step(x, state, weight, bias, activation="silu", out_state=None):  # [b,c], [b,c,w], [c,w], [c]|None
    """One decode step -> (y [b,c], new_state [b,c,w]) (spec 3.3).

    Roll the state left by one, write x as the newest column, convolve the window with the filter. The new
    state is a new array, or is written into ``out_state`` when given (``out_state=state``: in place).
    """
    check_causal_conv1d_step(x, state, weight, bias, activation, out_state)
    xp = get_xp(x, state, weight, bias)
    # new_state = roll(state, -1, axis=-1) with new_state[..., -1] = x
    new_state = xp.concatenate([state[:, :, 1:], x[:, :, None]], axis=2)
    # y = bias + sum_j weight[:, j] * new_state[:, :, j]
    y = xp.sum(new_state * weight[None], axis=2)
    if bias is not None:
        y = y + bias
    if out_state is not None:
        out_state[...] = new_state
        new_state = out_state
    return _activation(activation)(y), new_state
