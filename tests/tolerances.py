"""The tests' view of the one tolerance table, which lives in the package (nemo_scratch/tolerances.py) so that
``nemo-scratch golden`` and kernel authors using an installed package read the same entries."""

from nemo_scratch.tolerances import TOLERANCES, assert_close, tolerance  # noqa: F401
