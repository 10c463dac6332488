"""Corral: a runtime for Llama 4 class mixture-of-experts models.

The C++ core (corral._core) loads Hugging Face checkpoints and runs them; this package is the thin
Python layer over it.
"""

from corral._core import (
    ConfigError,
    CorralError,
    CorruptCheckpointError,
    DeviceError,
    DTypeError,
    InvalidInputError,
    MissingTensorError,
    ModelFileNotFoundError,
    NotSupportedError,
    OutOfKVCacheError,
    ShapeError,
)
from corral.devices import devices
from corral.llm import LLM
from corral.outputs import CompletionOutput, RequestOutput
from corral.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "devices",
    "CorralError",
    "ConfigError",
    "CorruptCheckpointError",
    "DeviceError",
    "DTypeError",
    "InvalidInputError",
    "MissingTensorError",
    "ModelFileNotFoundError",
    "NotSupportedError",
    "OutOfKVCacheError",
    "ShapeError",
]
