"""The kernel author's harness: hold your own implementation of an op to the reference.

    from nemo_scratch import oracle

    report = oracle.check("ssd_scan_chunked", my_scan)                   # NumPy in, any array type out
    report = oracle.check("ssd_scan_chunked", my_torch_scan, convert=torch.from_numpy)
    print(report)   # ssd_scan_chunked (float32): 25 cases pass (...); worst 3.1% of the 'kernel_ssd' budget

``check`` draws Hypothesis cases (strategies.py: sizes crossing the chunk, NVFP4 block, warp and tile sizes;
the op's tie and boundary inputs of nemo_scratch/golden_cases.py), checks every output's shape, dtype and
values against the reference with the tolerance table, and on failure raises OracleFailure on the shrunk
case: its inputs, the first bad index, the chunk / block / tile it lies in, the cause when it is a known
mistake, the share of the budget used, and the ``nemo-scratch golden`` command that writes the case to a
file. The ops are the golden ops, nemo_scratch/golden.py::OPS. docs/oracle.md section 6 shows it end to end.
Needs Hypothesis (the ``harness`` extra: pip install 'nemo_scratch[harness]').
"""

from ..errors import OracleFailure
from ..golden_cases import CASES, case_names
from .check import OracleReport, case_inputs, check, to_numpy
from .strategies import DIMS, Case, cases, crossing

__all__ = ["CASES", "DIMS", "Case", "OracleFailure", "OracleReport", "case_inputs", "case_names", "cases", "check",
           "crossing", "to_numpy"]
