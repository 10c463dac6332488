// The pybind11 module corral._core, one file per part.
#pragma once

#include <pybind11/pybind11.h>

namespace corral::bindings {

void register_errors(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_kv_cache(pybind11::module_& m);
void register_ops(pybind11::module_& m);

}  // namespace corral::bindings
