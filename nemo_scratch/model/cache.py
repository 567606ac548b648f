"""The decode cache: one typed state per layer (spec 3.3 for Mamba, spec 4 for attention).

- ``MambaState``: the rolling conv state [b, c, w] (the last w raw xBC inputs, oldest first) and the SSM
  state [b, h, p, n] of one Mamba layer;
- ``KVCache``: K and V [b, s, kv, dh] of every past position of one attention layer, in buffers allocated
  ahead and grown geometrically (doubling), so a decode step writes one position instead of copying the
  whole cache;
- ``Cache``: the per-layer states of a model (None for MoE / MLP layers, which keep nothing) and the number
  of tokens seen.

Prefill followed by one-token steps equals one forward over the whole sequence (tests/test_model.py). For
speculative decoding the cache *records* a multi-token continuation and then ``accept``s only a prefix of it:
attention K/V are truncated, and each Mamba layer takes the state it recorded after the last accepted token,
so the cache equals that of a model that never saw the rejected tokens.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

KV_INITIAL_CAPACITY = 64   # positions a KV buffer holds before its first doubling


class MambaState:
    """conv [b, c, w] and ssm [b, h, p, n] of one Mamba layer, and the per-token history while recording."""

    def __init__(self, conv, ssm):
        self.conv, self.ssm = conv, ssm
        self.history = None     # [(conv, ssm) after each token] while a recorded forward runs

    @classmethod
    def zeros(cls, cfg, batch, dtype, xp=np):
        return cls(xp.zeros((batch, cfg.conv_dim, cfg.conv_kernel), dtype=dtype),
                   xp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), dtype=dtype))

    @property
    def recording(self) -> bool:
        return self.history is not None

    def record(self):
        """The next forward keeps the state after each of its tokens (speculative verification)."""
        self.history = []

    def update(self, conv, ssm):
        """The state after one more token (kept in the history while recording)."""
        self.conv, self.ssm = conv, ssm
        if self.history is not None:
            self.history.append((conv, ssm))

    def accept(self, keep):
        """After a recorded forward: the state after its first ``keep`` tokens; recording ends."""
        if self.history is None:
            raise InputError("MambaState.accept: no recorded forward to accept from (call record() first)")
        self.conv, self.ssm = self.history[keep - 1]
        self.history = None


class KVCache:
    """K and V [b, s, kv, dh] of one attention layer; ``length`` positions are valid."""

    def __init__(self, batch, kv_heads, head_dim, dtype, xp=np, capacity=KV_INITIAL_CAPACITY):
        self.xp, self.length = xp, 0
        self.k = xp.zeros((batch, capacity, kv_heads, head_dim), dtype=dtype)
        self.v = xp.zeros_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def append(self, k, v):  # [b,t,kv,dh] x2 -> the whole cache, views [b,s,kv,dh] x2
        """Write the new positions after the valid ones (doubling the buffers when full)."""
        s = self.length + k.shape[1]
        if s > self.capacity:
            grown = max(s, 2 * self.capacity)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = self.xp.zeros((old.shape[0], grown, *old.shape[2:]), dtype=old.dtype)
                new[:, :self.length] = old[:, :self.length]
                setattr(self, name, new)
        self.k[:, self.length:s] = k
        self.v[:, self.length:s] = v
        self.length = s
        return self.k[:, :s], self.v[:, :s]

    def truncate(self, length):
        """Forget every position from ``length`` on (the buffers stay; the next append overwrites them)."""
        self.length = min(self.length, length)


def new_layer_state(block_type, cfg, batch, dtype, xp=np, kv_capacity=None):
    """The empty state of one layer: MambaState, KVCache, or None (MoE and MLP layers keep nothing)."""
    if block_type == "mamba":
        return MambaState.zeros(cfg, batch, dtype, xp)
    if block_type == "attention":
        return KVCache(batch, cfg.num_key_value_heads, cfg.head_dim, dtype, xp, kv_capacity or KV_INITIAL_CAPACITY)
    return None


class Cache:
    """The decode state of every layer of a stack (the backbone, or the MTP head's layers).

    ``xp`` allocates the states: one array module, or one per layer (each layer's state lives on its layer's
    device); ``kv_capacity`` preallocates every KVCache for that many positions.
    """

    def __init__(self, block_types, cfg, batch, dtype, xp=np, kv_capacity=None):
        block_types = list(block_types)
        xps = xp if isinstance(xp, (list, tuple)) else [xp] * len(block_types)
        self.layers = [new_layer_state(bt, cfg, batch, dtype, x, kv_capacity) for bt, x in zip(block_types, xps)]
        self.batch = batch
        self.length = 0  # tokens seen

    def _of(self, kind):
        return [layer for layer in self.layers if isinstance(layer, kind)]

    def record(self):
        """The next forward keeps every intermediate Mamba state (speculative verification)."""
        for layer in self._of(MambaState):
            layer.record()

    def accept(self, keep, total):
        """After a recorded forward of ``total`` tokens, keep only the first ``keep`` of them."""
        if not 1 <= keep <= total:
            raise InputError(f"Cache.accept: keep={keep} must be in [1, total={total}] (tokens of the recorded "
                             "forward to keep)")
        for layer in self._of(MambaState):
            layer.accept(keep)
        self.length -= total - keep
        for layer in self._of(KVCache):
            layer.truncate(self.length)

    def truncate(self, length):
        """Forget the tokens from ``length`` on: attention-only stacks (the MTP head); a Mamba state cannot
        be rewound (use record() / accept())."""
        if length != self.length and self._of(MambaState):
            raise InputError(f"Cache.truncate: cannot rewind from {self.length} to {length} tokens: a Mamba "
                             "state is not reversible; record() before the forward and accept() after it")
        for layer in self._of(KVCache):
            layer.truncate(length)
        self.length = min(self.length, length)
