"""Every user-facing failure of nemo_scratch is one of these exceptions.

The message always names the file, tensor, field or argument at fault and what was expected, so that the
CLI can print it as one line (no traceback) and a script can catch one class.
"""


class NemoScratchError(Exception):
    """Base class: catch this to handle any failure the package reports on purpose."""


class ConfigError(NemoScratchError, ValueError):
    """A config.json field (or preset override) is missing, malformed or inconsistent."""


class CheckpointError(NemoScratchError, ValueError):
    """A checkpoint file or tensor is missing, unexpected, misshaped, of the wrong dtype, truncated or corrupt."""


class ShapeError(NemoScratchError, ValueError):
    """An op received an array whose shape does not fit its signature."""


class DtypeError(NemoScratchError, TypeError):
    """An op received an array of an unsupported dtype (ops take float32 or float64, never silently promote)."""


class InputError(NemoScratchError, ValueError):
    """A user argument is out of range: token ids outside the vocabulary, an empty prompt, a bad option."""


class BackendError(NemoScratchError, RuntimeError):
    """A backend is unknown, or cannot run here (no GPU, missing package); the message says which."""


class PlanError(NemoScratchError, ValueError):
    """A multi-GPU placement is impossible (the weights do not fit the stated memory)."""


class DeviceError(NemoScratchError, ValueError):
    """Arrays of two devices met in one operation (only an explicit transfer moves data between devices), or a
    device index is out of range; the message names both devices."""


class DeviceMemoryError(NemoScratchError, MemoryError):
    """A device's memory budget would be exceeded; the message names the device, the request, what is in use
    and the budget."""


class MemoryBudgetError(NemoScratchError, MemoryError):
    """A call would need more memory than this machine has available (estimated before allocating); the
    message says how much it needs, how much is available and which option helps (nemo_scratch/memory.py)."""


class NonFiniteError(NemoScratchError, FloatingPointError):
    """A forward pass produced NaN or inf; the message names the first layer and tensor that went non-finite."""


class OracleFailure(NemoScratchError, AssertionError):
    """nemo_scratch.oracle.check found a case where the function under test disagrees with the reference; the
    message names the case, the output, the first bad index and where it lies, and the cause when known."""
