"""The formats a linear weight may be stored in, beside a plain float array. Spec section 9.2.

These are containers only (the codecs live in quant.py, the argument rules in contracts.py): a packed weight
travels through the model as one object, and ``linear`` decodes it inside the matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class NVFP4Weight:
    """A packed NVFP4 linear weight W[..., out, in] as ModelOpt stores it.

    packed       uint8   [..., out, in/2]   two E2M1 codes per byte, low nibble = even element
    block_scale  uint8   [..., out, in/16]  FP8 E4M3FN bit patterns, one per 16-element block
    global_scale float32 [...]              weight_scale_2 (one per tensor; per expert when stacked)
    input_scale  float32 [...] or None      activation scale (W4A4 calibration; unused by W4A16)
    A leading [e] dimension stacks routed experts; ``w[e]`` is expert e's weight.
    """

    packed: object
    block_scale: object
    global_scale: object
    input_scale: object = None

    @property
    def shape(self):
        *lead, out, half = self.packed.shape
        return (*lead, out, 2 * half)

    def __getitem__(self, e):
        return NVFP4Weight(self.packed[e], self.block_scale[e], self.global_scale[e],
                           None if self.input_scale is None else self.input_scale[e])

    @property
    def nbytes(self):
        return sum(int(a.nbytes) for a in (self.packed, self.block_scale, self.global_scale))


@dataclass
class FP8Weight:
    """A per-tensor FP8 E4M3FN linear weight: W = e4m3(data) * scale.

    data   uint8 [..., out, in]  E4M3FN bit patterns
    scale  float32 [...]          weight_scale (amax / 448)
    """

    data: object
    scale: object
    input_scale: object = None

    @property
    def shape(self):
        return tuple(self.data.shape)

    def __getitem__(self, e):
        return FP8Weight(self.data[e], self.scale[e], None if self.input_scale is None else self.input_scale[e])

    @property
    def nbytes(self):
        return int(self.data.nbytes) + int(self.scale.nbytes)


PACKED = (NVFP4Weight, FP8Weight)


def is_packed(w) -> bool:
    """True for a weight the matmul must decode (NVFP4 or FP8), False for a plain float array."""
    return isinstance(w, PACKED)


def map_arrays(obj, fn):
    """Apply ``fn`` to a plain array, or to every array field of a packed weight (e.g. host -> device)."""
    if is_packed(obj):
        fields = {k: (None if v is None else fn(v)) for k, v in vars(obj).items()}
        return replace(obj, **fields)
    return fn(obj)
