// The pybind11 module corral._core, one file per part.
#pragma once

#include <pybind11/pybind11.h>

#include "corral/engine.h"

namespace corral::bindings {

void register_errors(pybind11::module_& m);
void register_engine(pybind11::module_& m);
void register_kv_cache(pybind11::module_& m);
void register_ops(pybind11::module_& m);

// SamplingParams.constraint from a Python callable returning a matcher (None: unconstrained).
TokenConstraintFactory python_constraint_factory(pybind11::object factory);

}  // namespace corral::bindings
