// Errors thrown by every layer of Corral. Each message names the file, tensor or field at fault;
// the Python bindings map each class to a Python exception of the same name.
#pragma once

#include <stdexcept>
#include <string>

namespace corral {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A config.json field is missing, has the wrong type or an unsupported value.
struct ConfigError : Error {
  using Error::Error;
};

// A file the model needs does not exist.
struct FileMissingError : Error {
  using Error::Error;
};

// A safetensors file is truncated, corrupt, or its header is oversized.
struct CorruptCheckpointError : Error {
  using Error::Error;
};

// A tensor the model needs is not in the checkpoint.
struct MissingTensorError : Error {
  using Error::Error;
};

// A tensor (or an argument array) has the wrong shape.
struct ShapeError : Error {
  using Error::Error;
};

// A dtype that the code path cannot handle.
struct DTypeError : Error {
  using Error::Error;
};

// Bad request input: token id out of range, prompt longer than the context, bad option value.
struct InvalidInputError : Error {
  using Error::Error;
};

// No free KV-cache blocks for the request.
struct OutOfKVCacheError : Error {
  using Error::Error;
};

// A device is missing or a device call failed.
struct DeviceError : Error {
  using Error::Error;
};

// The operation has no implementation for the requested device or dtype.
struct NotSupportedError : Error {
  using Error::Error;
};

}  // namespace corral
