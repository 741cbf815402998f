"""The one exception family of mar-rt (above the ``ct`` layer, which raises ``ValueError``).

Every error names the file, engine or tensor it is about.
"""

from __future__ import annotations


class MarRtError(Exception):
    """Base class of every error mar-rt raises on purpose."""


class BadInputError(MarRtError, ValueError):
    """An input file or array is unusable (wrong shape, NaN, not CT, ...)."""


class BundleError(MarRtError):
    """A model bundle is missing files, has wrong hashes or an unsupported version."""


class BackendUnavailableError(MarRtError):
    """A requested backend (tensorrt, onnxruntime, cupy) is not installed or has no device."""


class EngineMismatchError(MarRtError):
    """A built engine belongs to another GPU, TensorRT version, ONNX file or precision."""


class OutputWriteError(MarRtError):
    """Writing a result failed after the computation; ``kept`` is where the computed volume
    was saved instead (a ``.npy``), or None when even that failed."""

    def __init__(self, message: str, kept: object = None) -> None:
        super().__init__(message)
        self.kept = kept
