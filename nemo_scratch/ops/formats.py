"""The formats a weight may be stored in, beside a plain float array. Spec section 9.2.

These are containers only (the codecs live in quant.py, the argument rules in contracts.py): a stored weight
travels through the model as one object, memory-mapped from its checkpoint, and ``linear`` decodes it inside
the matmul, a tile at a time. ``ExpertBank`` holds the routed experts of one layer as the file has them.
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


@dataclass
class BF16Weight:
    """A bfloat16 weight as stored: bits uint16 [..., out, in], the top half of each float32 (decoded exactly
    by ``bits << 16``). What the "stored" weight mode keeps of every BF16 matrix: half the bytes of float32."""

    bits: object

    @property
    def shape(self):
        return tuple(self.bits.shape)

    def __getitem__(self, e):
        return BF16Weight(self.bits[e])

    @property
    def nbytes(self):
        return int(self.bits.nbytes)


class ExpertBank:
    """The e routed experts of one layer, each a weight [out, in] in one format, kept where the checkpoint has
    them (per-expert tensors in NVIDIA's layout; views into one stacked [e, out, in] tensor in transformers'):
    ``bank[x]`` is expert x's weight; nothing is copied or stacked on the host. ``shape`` is (e, out, in)."""

    def __init__(self, experts):
        self.experts = list(experts)
        first = self.experts[0]
        if any(type(w) is not type(first) or tuple(w.shape) != tuple(first.shape) for w in self.experts):
            raise ValueError("ExpertBank: every expert must have one format and one shape")

    @property
    def shape(self):
        return (len(self.experts), *self.experts[0].shape)

    @property
    def format(self):
        """The experts' container type (an ndarray type for plain float arrays)."""
        return type(self.experts[0])

    def __len__(self):
        return len(self.experts)

    def __getitem__(self, x):
        return self.experts[x]

    @property
    def nbytes(self):
        return sum(int(w.nbytes) for w in self.experts)


PACKED = (NVFP4Weight, FP8Weight, BF16Weight, ExpertBank)


def is_packed(w) -> bool:
    """True for a weight that is not a plain float array: a stored format the matmul decodes (NVFP4, FP8,
    BF16) or an expert bank."""
    return isinstance(w, PACKED)


def map_arrays(obj, fn):
    """Apply ``fn`` to a plain array, or to every array of a stored weight or bank (e.g. host -> device)."""
    if isinstance(obj, ExpertBank):
        return ExpertBank([map_arrays(w, fn) for w in obj.experts])
    if is_packed(obj):
        fields = {k: (None if v is None else fn(v)) for k, v in vars(obj).items()}
        return replace(obj, **fields)
    return fn(obj)


def arrays_of(obj):
    """Every array a weight holds: the array itself, a packed weight's fields, each expert's arrays of a bank."""
    out = []
    map_arrays(obj, lambda a: out.append(a) or a)
    return out


def stack_bank(bank, xp):
    """The bank as one stacked weight [e, out, in] of ``xp`` arrays, field by field (a GPU backend's upload:
    its grouped expert kernels read one stacked array). Packed fields stay packed."""
    first = bank[0]
    if not is_packed(first):
        return xp.stack([xp.asarray(w) for w in bank.experts])
    fields = {k: None if v is None else xp.stack([xp.asarray(getattr(w, k)) for w in bank.experts])
              for k, v in vars(first).items()}
    return replace(first, **fields)
