"""The sizes of golden vectors, known before anything is drawn: input shapes per op, element bounds, memory.

``INPUT_SHAPES[op](dims)`` is the shape of every input the op's maker (golden.py) draws; read_golden checks
a file's tensors against it, and ``check_size`` refuses dims whose inputs exceed MAX_ELEMENTS or whose
reference run would not fit in memory (nemo_scratch/memory.py), in microseconds.
"""

from __future__ import annotations

import math

from .errors import InputError

MAX_DIM = 2**24
MAX_ELEMENTS = 2**27   # input elements of one golden file (1 GiB of float64)

# op -> dims -> {input argument: shape}: what the maker draws, without drawing it (bounds, memory, checks)
INPUT_SHAPES = {
    "rms_norm": lambda d: {"x": (d["b"], d["t"], d["d"]), "weight": (d["d"],)},
    "gated_rms_norm": lambda d: {"y": (d["b"], d["t"], d["i"]), "z": (d["b"], d["t"], d["i"]), "weight": (d["i"],)},
    "causal_conv1d": lambda d: {"x": (d["b"], d["t"], d["c"]), "weight": (d["c"], d["w"]), "bias": (d["c"],),
                                "state": (d["b"], d["c"], d["w"])},
    "causal_conv1d_step": lambda d: {"x": (d["b"], d["c"]), "state": (d["b"], d["c"], d["w"]),
                                     "weight": (d["c"], d["w"]), "bias": (d["c"],)},
    "ssd_scan_chunked": lambda d: {"x": (d["b"], d["t"], d["h"], d["p"]), "dt": (d["b"], d["t"], d["h"]),
                                   "A": (d["h"],), "B": (d["b"], d["t"], d["g"], d["n"]),
                                   "C": (d["b"], d["t"], d["g"], d["n"]), "D": (d["h"],),
                                   "initial_state": (d["b"], d["h"], d["p"], d["n"])},
    "ssd_step": lambda d: {"x": (d["b"], d["h"], d["p"]), "dt": (d["b"], d["h"]), "A": (d["h"],),
                           "B": (d["b"], d["g"], d["n"]), "C": (d["b"], d["g"], d["n"]), "D": (d["h"],),
                           "state": (d["b"], d["h"], d["p"], d["n"])},
    "gqa_attention": lambda d: {"q": (d["b"], d["t"], d["q"], d["dh"]), "k": (d["b"], d["s"], d["kv"], d["dh"]),
                                "v": (d["b"], d["s"], d["kv"], d["dh"])},
    "route": lambda d: {"x": (d["t"], d["d"]), "gate_weight": (d["e"], d["d"]), "correction_bias": (d["e"],)},
    "moe_experts": lambda d: {"x": (d["t"], d["l"]), "idx": (d["t"], d["k"]), "weights": (d["t"], d["k"]),
                              "up": (d["e"], d["f"], d["l"]), "down": (d["e"], d["l"], d["f"])},
    "nvfp4_matmul": lambda d: {"x": (d["m"], d["in"]), "packed": (d["out"], d["in"] // 2),
                               "block_scale": (d["out"], d["in"] // 16), "global_scale": ()},
    "nvfp4_dequantize": lambda d: {"packed": (d["out"], d["in"] // 2), "block_scale": (d["out"], d["in"] // 16),
                                   "global_scale": ()},
}


def _intermediate_elements(op, d) -> int:
    """The largest temporaries of the reference beyond its inputs (ops/attention.py, ops/ssd.py, ...)."""
    if op == "gqa_attention":
        return 3 * d["b"] * d["q"] * d["t"] * d["s"]
    if op == "ssd_scan_chunked":
        q = min(d["chunk"], d["t"])
        nc = -(-d["t"] // q)
        return (4 * d["b"] * d["h"] * nc * q * q + 3 * d["b"] * d["h"] * (nc + 1) ** 2
                + 3 * d["b"] * (nc + 1) * d["h"] * d["p"] * d["n"] + 4 * d["b"] * nc * q * d["h"] * d["p"])
    if op == "route":
        return 4 * d["t"] * d["e"]
    if op == "moe_experts":
        return d["t"] * (2 * d["f"] + d["l"])
    if op.startswith("nvfp4"):
        return 3 * d["out"] * d["in"]
    return 0


def golden_bytes(op, dims) -> int:
    """Memory a golden write (or check) of ``op`` at ``dims`` needs: inputs in float64 and float32, both
    outputs, the reference's temporaries in float64."""
    inputs = sum(math.prod(shape) for shape in INPUT_SHAPES[op](dims).values())
    return 8 * (3 * inputs + 2 * _intermediate_elements(op, dims))


def check_size(op, dims, where="--shape"):
    """MAX_ELEMENTS and the memory estimate, before anything is drawn."""
    from .memory import check_fits

    inputs = sum(math.prod(shape) for shape in INPUT_SHAPES[op](dims).values())
    if inputs > MAX_ELEMENTS:
        raise InputError(f"{where}: dims {dims} give {op} {inputs:,} input elements, more than the "
                         f"{MAX_ELEMENTS:,} a golden file may hold")
    check_fits(golden_bytes(op, dims), f"golden {op} at {where} {dims}", "golden")
