"""Multi-device execution, phase 1: pipeline placement in one process.

The model's units (embedding, each layer, norm_f + lm_head, the MTP head) are cut into contiguous stages
balanced by bytes, one stage per device (plan.py: pure arithmetic from a config or a checkpoint's headers,
with the KV cache, Mamba states, prefill activations and a context margin reserved per device). Each layer
then runs whole on its device with the existing single-device backends, in the same order as on one device,
so only the hidden state crosses a stage boundary and a placed forward equals the single-device one bit for
bit. The runner gets its devices from devices.py, ``VirtualDevices`` (NumPy arrays tagged with a device, with
byte budgets and a ledger, so the whole thing runs on a CPU), and cupy_devices.py, ``CupyDevices`` (one CuPy
device each).
Tensor and expert parallelism (phase 2, docs/parallel.md) cut every layer over the ranks instead: shard.py
(the rules), comm.py (the collectives), tensor.py (a rank with the Model API, and all ranks in one process)
and launch.py (one spawned worker per rank, NCCL between GPUs).

    placement = plan_placement("ultra", "ultra", gpus=8, gpu_mem_gib=80, max_len=2**20)
    print(format_placement(placement))
"""

from ..errors import DeviceError, DeviceMemoryError
from .cupy_devices import CupyDevices
from .devices import DeviceArray, VirtualDevices
from .launch import LaunchedModel
from .plan import Placement, Stage, format_placement, plan_placement
from .shard import Layout
from .tensor import LocalShardedModel, RankModel
from .units import Unit

__all__ = ["CupyDevices", "DeviceArray", "DeviceError", "DeviceMemoryError", "Placement", "Stage", "Unit",
           "VirtualDevices", "format_placement", "plan_placement",
           "LaunchedModel", "Layout", "LocalShardedModel", "RankModel"]
