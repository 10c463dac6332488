// C++ error classes become Python exceptions that also derive from the built-in exception a
// Python user would catch (ValueError, FileNotFoundError, MemoryError, ...).
#include <exception>

#include "bindings.h"
#include "corral/error.h"

namespace py = pybind11;

namespace corral::bindings {

namespace {

struct PyErrors {
  py::object base, config, file, corrupt, missing, shape, dtype, input, kv, device, unsupported;
};

PyErrors& errors() {
  static PyErrors* e = new PyErrors();  // lives as long as the interpreter
  return *e;
}

py::object make(py::module_& m, const char* name, py::tuple bases, const char* doc) {
  const std::string full = std::string("corral.") + name;
  PyObject* t = PyErr_NewExceptionWithDoc(full.c_str(), doc, bases.ptr(), nullptr);
  if (!t) throw py::error_already_set();
  py::object cls = py::reinterpret_steal<py::object>(t);
  m.attr(name) = cls;
  return cls;
}

}  // namespace

void register_errors(py::module_& m) {
  PyErrors& e = errors();
  e.base = make(m, "CorralError", py::make_tuple(py::handle(PyExc_Exception)), "Base class of Corral's errors.");
  auto with = [&](PyObject* builtin) { return py::make_tuple(e.base, py::handle(builtin)); };
  e.config = make(m, "ConfigError", with(PyExc_ValueError), "A config.json field is missing or invalid.");
  e.file = make(m, "ModelFileNotFoundError", with(PyExc_FileNotFoundError), "A file of the model is missing.");
  e.corrupt = make(m, "CorruptCheckpointError", with(PyExc_ValueError),
                   "A safetensors file is truncated, corrupt, or has an oversized header.");
  e.missing = make(m, "MissingTensorError", with(PyExc_LookupError), "A tensor is missing from the checkpoint.");
  e.shape = make(m, "ShapeError", with(PyExc_ValueError), "A tensor or array has the wrong shape.");
  e.dtype = make(m, "DTypeError", with(PyExc_ValueError), "A dtype is not supported.");
  e.input = make(m, "InvalidInputError", with(PyExc_ValueError), "Bad request input or option.");
  e.kv = make(m, "OutOfKVCacheError", with(PyExc_MemoryError), "The KV cache has no room for the request.");
  e.device = make(m, "DeviceError", with(PyExc_RuntimeError), "A device is missing or a device call failed.");
  e.unsupported = make(m, "NotSupportedError", with(PyExc_NotImplementedError),
                       "The operation has no implementation for this device or dtype.");

  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    const PyErrors& e = errors();
    try {
      std::rethrow_exception(p);
    } catch (const ConfigError& x) {
      PyErr_SetString(e.config.ptr(), x.what());
    } catch (const FileMissingError& x) {
      PyErr_SetString(e.file.ptr(), x.what());
    } catch (const CorruptCheckpointError& x) {
      PyErr_SetString(e.corrupt.ptr(), x.what());
    } catch (const MissingTensorError& x) {
      PyErr_SetString(e.missing.ptr(), x.what());
    } catch (const ShapeError& x) {
      PyErr_SetString(e.shape.ptr(), x.what());
    } catch (const DTypeError& x) {
      PyErr_SetString(e.dtype.ptr(), x.what());
    } catch (const InvalidInputError& x) {
      PyErr_SetString(e.input.ptr(), x.what());
    } catch (const OutOfKVCacheError& x) {
      PyErr_SetString(e.kv.ptr(), x.what());
    } catch (const DeviceError& x) {
      PyErr_SetString(e.device.ptr(), x.what());
    } catch (const NotSupportedError& x) {
      PyErr_SetString(e.unsupported.ptr(), x.what());
    } catch (const Error& x) {
      PyErr_SetString(e.base.ptr(), x.what());
    }
  });
}

}  // namespace corral::bindings
