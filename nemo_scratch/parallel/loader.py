"""The streaming loader: a checkpoint's tensors read in plan order, each straight to the device that owns it.

    placement = plan_placement(Path("ckpt/"), gpus=4, gpu_mem_gib=20, weights="stored")
    model = load_placed("ckpt/", placement, VirtualDevices(4, placement.budget_bytes))   # or CupyDevices(4)

1. The checkpoint is opened lazily (checkpoint/reader.py::load_tensors with weights="stored"): headers are
   parsed and validated against the config, the same one-line errors as a single-device load, and every tensor
   is a memory-mapped view of its file, nothing read yet.
2. The units are placed in execution order (embedding, layers, head, MTP), each on its planned device, tensor
   by tensor: a tensor is copied ``chunk_bytes`` of rows at a time from the file into a buffer that already sits
   on its device, so the host never holds more than one chunk (two while a CUDA copy is in flight: pinned
   double buffers) plus the headers. Packed NVFP4/FP8 weights stay packed; BF16 stays BF16 in the "stored"
   weight mode and is decoded chunk by chunk to float32 in the "float32" one (and on the GPU backends, whose
   kernels read float32 or packed codes). Routed experts are copied expert by expert: an ExpertBank of device
   arrays, or, on a GPU backend, one stacked [e, out, in] device weight filled slot by slot.
3. A progress bar counts the bytes placed; its total is the plan's weight bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint.reader import load_tensors
from ..errors import InputError
from ..model.tokenizer import load_tokenizer
from ..model.weights import build_params, map_tree
from ..ops.formats import BF16Weight, ExpertBank, is_packed, map_arrays
from ..ops.quant import bf16_decode
from ..progress import progress_bar
from .pipeline import PipelinePlace, PlacedModel, unit_params

STAGING_BYTES = 64 * 2**20   # host bytes of one staged chunk


class StreamingLoader:
    """Copies host (memory-mapped) arrays to devices a chunk at a time, counting the host bytes in flight."""

    def __init__(self, devices, weights, gpu, chunk_bytes=STAGING_BYTES, bar=None):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise InputError(f"load_placed: chunk_bytes must be a positive integer, got {chunk_bytes!r}")
        self.devices, self.weights, self.gpu, self.chunk_bytes = devices, weights, gpu, chunk_bytes
        self.bar = bar
        self.in_flight = self.peak_in_flight = 0
        self.placed_bytes = {}

    def place(self, leaf, k):
        """One leaf of the parameter tree on device k, in the run's weight mode (see the module docstring)."""
        if isinstance(leaf, ExpertBank):
            experts = [self.place(w, k) for w in leaf.experts] if not self.gpu else None
            return ExpertBank(experts) if experts is not None else self._stacked(leaf, k)
        if isinstance(leaf, BF16Weight):
            if self.weights == "float32" or self.gpu:
                return self._copy(leaf.bits, k, decode=True)
            return BF16Weight(self._copy(leaf.bits, k))
        if is_packed(leaf):
            return map_arrays(leaf, lambda a: self._copy(a, k))
        return self._copy(leaf, k)

    def _stacked(self, bank, k):
        """A bank as one stacked device weight [e, out, in], each expert copied into its slot."""
        first = bank[0]
        decode = isinstance(first, BF16Weight)
        arrays = [first.bits] if decode else [a for a in vars(first).values() if a is not None] \
            if is_packed(first) else [first]
        slots = [self._empty(k, (len(bank), *np.shape(a)), np.float32 if decode else a.dtype) for a in arrays]
        for x, w in enumerate(bank.experts):
            parts = [w.bits] if decode else [a for a in vars(w).values() if a is not None] if is_packed(w) else [w]
            for slot, part in zip(slots, parts):
                self._fill(slot[x:x + 1], np.asarray(part)[None], k, decode)
        if decode or not is_packed(first):
            return slots[0]
        names = [name for name, a in vars(first).items() if a is not None]
        return type(first)(**dict(zip(names, slots)))

    def _empty(self, k, shape, dtype):
        return self.devices.namespace(k).empty(shape, dtype=dtype)

    def _copy(self, src, k, decode=False):  # host [...] -> device [...] (BF16 bits -> float32 when decode)
        shape = np.shape(src)
        out = self._empty(k, shape or (1,), np.float32 if decode else np.asarray(src).dtype)
        self._fill(out, np.reshape(src, shape or (1,)), k, decode)
        return out.reshape(shape)

    def _fill(self, dest, src, k, decode):
        """dest (on device k) <- src (host, memory-mapped), ``chunk_bytes`` of rows at a time."""
        src = np.asarray(src)
        rows = src.shape[0] if src.ndim else 1
        row_bytes = max(1, dest.nbytes // max(rows, 1))
        step = max(1, self.chunk_bytes // row_bytes)
        for r0 in range(0, rows, step):
            part = src[r0:r0 + step] if src.ndim else src
            # the staged chunk: read from the file, decoded when BF16 becomes float32 (the one host copy)
            staged = bf16_decode(np.ascontiguousarray(part)) if decode else np.array(part, copy=True)
            self.in_flight += staged.nbytes
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.devices.write(k, dest, r0, r0 + step, staged)
            self.in_flight -= staged.nbytes
            self.placed_bytes[k] = self.placed_bytes.get(k, 0) + staged.nbytes
            if self.bar is not None:
                self.bar.update(staged.nbytes)


def load_placed(path, placement, devices, *, backend="numpy", dtype="float32", dt_floor="config", with_mtp=True,
                chunk_bytes=STAGING_BYTES, progress=None, quiet=False):
    """A PlacedModel of the checkpoint at ``path``, its units on ``devices`` as ``placement`` (plan.py) says.

    backend   "numpy" (VirtualDevices, or the reference on CuPy arrays), "cupy" or "numba" (CupyDevices)
    progress  an object with update(n_bytes) and close() to report to (default: a byte progress bar on
              stderr, quiet under ``quiet`` and when stderr is not a terminal)
    """
    path = Path(path)
    if placement.gpus != devices.n:
        raise InputError(f"load_placed: the placement is for {placement.gpus} devices, the device set has "
                         f"{devices.n}")
    gpu = backend in ("cupy", "numba")
    if gpu and placement.weights != "float32":
        raise InputError(f"load_placed: the {backend} backend holds BF16 weights as float32 (its kernels read "
                         "float32 or packed codes): plan with weights='float32' (--weights float32)")
    cfg, tensors, info = load_tensors(path, dtype=dtype, weights="stored")   # headers; views of the files
    params = build_params(cfg, tensors, with_mtp=with_mtp, dtype=np.dtype(info["dtype"]))
    bar = progress if progress is not None else progress_bar(placement.weight_bytes, f"loading {path.name}",
                                                            quiet=quiet)
    loader = StreamingLoader(devices, placement.weights, gpu, chunk_bytes, bar)
    unit_device = {unit.name: placement.device_of(unit.name) for unit in placement.units}
    placed = {"layers": [None] * cfg.num_hidden_layers, "mtp": None}
    try:
        for unit in placement.units:
            k = unit_device[unit.name]
            with devices.use(k):
                subtree = map_tree(unit_params(params, unit.name), lambda leaf, k=k: loader.place(leaf, k))
            _assign(placed, unit.name, subtree)
    finally:
        bar.close()
    if params.get("mtp") is None:
        placed["mtp"] = None
    info = {**info, "weights": placement.weights, "placement": placement.to_dict(),
            "loader": {"host_peak_bytes": loader.peak_in_flight, "chunk_bytes": chunk_bytes,
                       "placed_bytes": dict(loader.placed_bytes)}}
    place = PipelinePlace(devices, unit_device, backend)
    return PlacedModel(cfg, placed, place, placement, dt_floor=dt_floor, info=info,
                       tokenizer=load_tokenizer(path, cfg), path=path)


def _assign(placed, unit, subtree):
    if unit == "embedding":
        placed["embeddings"] = subtree
    elif unit == "head":
        placed.update(subtree)
    elif unit == "mtp":
        placed["mtp"] = subtree
    else:
        placed["layers"][int(unit.split()[1])] = subtree
