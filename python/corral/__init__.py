"""Corral: a runtime for Llama 4 class mixture-of-experts models.

The C++ core (corral._core) loads Hugging Face checkpoints and runs them; this package is the thin
Python layer over it: tokenizer and chat template, text generation and streaming, the CLI.
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
from corral.cuda_libs import point_to_pip_cublaslt
from corral.detokenize import IncrementalDetokenizer
from corral.devices import devices, memory_info
from corral.llm import LLM, demo_model_path
from corral.outputs import CompletionOutput, RequestOutput
from corral.perplexity import Perplexity, perplexity
from corral.sampling_params import SamplingParams
from corral.tokenizer import NoTokenizerError, Tokenizer

point_to_pip_cublaslt()  # where the C++ core finds cuBLASLt, if nvidia-cublas is installed

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "demo_model_path",
    "perplexity",
    "Perplexity",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Tokenizer",
    "IncrementalDetokenizer",
    "devices",
    "memory_info",
    "CorralError",
    "ConfigError",
    "CorruptCheckpointError",
    "DeviceError",
    "DTypeError",
    "InvalidInputError",
    "MissingTensorError",
    "ModelFileNotFoundError",
    "NoTokenizerError",
    "NotSupportedError",
    "OutOfKVCacheError",
    "ShapeError",
]
