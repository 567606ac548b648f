"""The decode cache: per layer a rolling conv state and a float32 SSM state (Mamba) or K/V (attention).

Prefill followed by one-token steps equals one forward over the whole sequence (tests/test_model.py).
For speculative decoding the cache can *record* a multi-token continuation and then ``accept`` only a
prefix of it: attention K/V are truncated, Mamba conv/SSM states are taken from the recorded history,
so the state equals that of a model that never saw the rejected tokens.
"""

from __future__ import annotations

from .blocks import new_layer_cache


class Cache:
    def __init__(self, block_types, cfg, batch, dtype, xp):
        self.block_types = list(block_types)
        self.layers = [new_layer_cache(bt, cfg, batch, dtype, xp) for bt in self.block_types]
        self.batch = batch
        self.length = 0  # tokens seen

    def record(self):
        """The next forward keeps every intermediate Mamba state (speculative verification)."""
        for bt, layer in zip(self.block_types, self.layers):
            if bt == "mamba":
                layer["record"] = True

    def accept(self, keep, total):
        """After a recorded forward of ``total`` tokens, keep only the first ``keep`` of them."""
        if not 1 <= keep <= total:
            raise ValueError(f"accept: keep={keep} must be in [1, total={total}]")
        drop = total - keep
        for bt, layer in zip(self.block_types, self.layers):
            if bt == "mamba" and layer.get("record"):
                layer["conv"] = layer.pop("conv_history")[keep - 1]
                layer["ssm"] = layer.pop("ssm_history")[keep - 1]
                del layer["record"]
            elif bt == "attention" and drop and layer["k"] is not None:
                layer["k"], layer["v"] = layer["k"][:, :-drop], layer["v"][:, :-drop]
        self.length -= drop

    def truncate(self, length):
        """Drop attention K/V past ``length`` tokens (for caches with attention layers only, e.g. MTP)."""
        for bt, layer in zip(self.block_types, self.layers):
            if bt == "mamba" and length != self.length:
                raise ValueError("truncate: a Mamba state cannot be rewound; use record()/accept()")
            if bt == "attention" and layer["k"] is not None:
                layer["k"], layer["v"] = layer["k"][:, :length], layer["v"][:, :length]
        self.length = min(self.length, length)
