"""NCCL on a real GPU (tools/gpu_check.sh runs this file): a 1-rank NcclComm is the identity on device buffers,
its NCCL is the pip wheel's, and the tiny model under --tp 1 through the NCCL path (spawned worker, NcclComm)
equals the single-device model. One GPU allows one rank only: NCCL refuses two ranks on one device."""

from pathlib import Path

import gpu_harness
import numpy as np
import pytest
from tolerances import assert_close

import nemo_scratch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_harness.cupy_available(),
                                                  reason="no CUDA GPU" if not gpu_harness.gpu_available()
                                                  else "no CUDA GPU for cupy: cupy is not installed")]
PROMPT = [[5, 77, 3, 201, 18, 9]]


def loaded_libraries():
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}


def test_one_rank_nccl_is_the_identity_and_comes_from_the_wheel():
    import cupy

    from nemo_scratch.parallel.comm import NcclComm, nccl_module

    nccl = nccl_module()
    comm = NcclComm(0, 1, nccl.get_unique_id())
    try:
        x = cupy.arange(4096, dtype=cupy.float32) * cupy.float32(0.37)
        y = comm.all_reduce(x)
        assert isinstance(y, cupy.ndarray) and y.shape == x.shape and y.dtype == x.dtype
        assert bool((y == x).all()) and y.data.ptr != x.data.ptr
        assert bool((comm.all_gather(x[None], axis=0) == x[None]).all())
        assert bool((comm.broadcast(x.astype(cupy.float64)) == x.astype(cupy.float64)).all())
        host = np.linspace(0, 1, 7)
        np.testing.assert_array_equal(comm.all_reduce(host), host)          # host arrays are staged
        version = comm.version
        print(f"NCCL version {version // 10000}.{version // 100 % 100}.{version % 100}")
        assert version >= 22700, version
        libs = [p for p in loaded_libraries() if "libnccl" in p]
        print("libnccl:", libs)
        assert libs and all("/nvidia/nccl/" in p for p in libs), f"libnccl not from the pip wheel: {libs}"
        assert comm.counts == {"all_reduce": 2, "all_gather": 1, "broadcast": 1}
    finally:
        comm.close()


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_tiny_model_tp1_through_nccl_equals_one_device(backend):
    from nemo_scratch.parallel.launch import LaunchedModel

    dtype = "float64" if backend == "numpy" else "float32"
    launched = LaunchedModel(None, tp=1, backend=backend, dtype=dtype, comm="nccl")
    ref = nemo_scratch.load(None, backend=backend, dtype=dtype, weights="stored")
    got, want = launched.forward(PROMPT), ref.forward(PROMPT)
    rank = launched.last_run["ranks"][0]
    print(f"--tp 1 {backend}: {rank['counts']} per forward, NCCL {rank['nccl_version']}, "
          f"{launched.last_run['seconds']:.1f} s with spawn and load")
    assert_close(got, want, "sharded_model" if backend == "numpy" else "kernel_model", what=f"--tp 1 {backend}")
    np.testing.assert_array_equal(launched.generate(PROMPT[0], 8).ids, ref.generate(PROMPT[0], 8).ids)
