"""Checkpoints: Hugging Face / NVIDIA Nemotron-H directories read and written with NumPy alone.

    cfg, tensors, info = load_tensors("path/to/checkpoint")   # validated logical weights, NVIDIA names
    reader = open_checkpoint("path/to/checkpoint")            # tensor-by-tensor inspection of what is stored
    make_random_checkpoint("out", preset("tiny"))             # a random, loadable test checkpoint

safetensors_io  the file format by hand (BF16 upcast exactly, F8_E4M3 kept as uint8 codes)
reader          checkpoint directories (single file, sharded with an index, or several files) and load_tensors
names           NVIDIA's names <-> transformers' names, and the check of names and shapes against the config
schema          every tensor a config implies (the single source of names and logical shapes)
writer          write_checkpoint, random_tensors, make_random_checkpoint
stream          what the writers share: headers first, then the data a slice of rows at a time (bounded memory)
convert         quantize_checkpoint (streamed) and inspect_checkpoint (headers only, tensor by tensor)
"""

from .names import check_tensor_set, from_transformers, to_transformers
from .reader import CheckpointReader, load_tensors, open_checkpoint
from .safetensors_io import SafetensorsFile, write_safetensors
from .schema import TensorSpec, expected_tensors, mtp_tensors
from .writer import make_random_checkpoint, random_tensors, write_checkpoint

__all__ = [
    "CheckpointReader", "SafetensorsFile", "TensorSpec", "check_tensor_set", "expected_tensors",
    "from_transformers", "load_tensors", "make_random_checkpoint", "mtp_tensors", "open_checkpoint",
    "random_tensors", "to_transformers", "write_checkpoint", "write_safetensors",
]
