// Structured output from Python: SamplingParams.constraint takes a callable that returns a
// matcher object (fill_bitmask(mask: int32 array), accept_token(token)); corral.structured_output
// builds them with llguidance. The engine calls them on the thread that steps, taking the GIL.
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <pybind11/numpy.h>

#include "bindings.h"
#include "corral/error.h"

namespace py = pybind11;

namespace corral::bindings {

namespace {

// A Python object shared with C++ threads: copies of the pointer need no GIL, and the last one
// drops the object with the GIL taken.
std::shared_ptr<py::object> hold(py::object o) {
  return std::shared_ptr<py::object>(new py::object(std::move(o)), [](py::object* p) {
    py::gil_scoped_acquire gil;
    delete p;
  });
}

// Runs f with the GIL held; a Python exception comes out as a C++ one (its message kept), so
// that it can be caught on a thread without the GIL.
template <class F>
auto with_gil(const F& f) {
  py::gil_scoped_acquire gil;
  try {
    return f();
  } catch (py::error_already_set& e) {
    throw InvalidInputError(std::string(py::str(e.type().attr("__name__"))) + ": " + std::string(py::str(e.value())));
  }
}

class PythonConstraint final : public TokenConstraint {
 public:
  explicit PythonConstraint(std::shared_ptr<py::object> matcher) : matcher_(std::move(matcher)) {}

  void fill_bitmask(uint32_t* mask, int64_t words) override {
    with_gil([&] {
      // A view of the engine's buffer, valid during the call only.
      py::array_t<int32_t> view({py::ssize_t(words)}, {py::ssize_t(sizeof(int32_t))},
                                reinterpret_cast<int32_t*>(mask), py::capsule(mask, [](void*) {}));
      matcher_->attr("fill_bitmask")(view);
      return 0;
    });
  }

  void accept_token(int32_t token) override {
    with_gil([&] {
      matcher_->attr("accept_token")(token);
      return 0;
    });
  }

 private:
  std::shared_ptr<py::object> matcher_;
};

}  // namespace

TokenConstraintFactory python_constraint_factory(py::object factory) {
  if (factory.is_none()) return nullptr;
  if (!PyCallable_Check(factory.ptr()))
    throw InvalidInputError("SamplingParams.constraint must be a callable that returns a matcher");
  return [held = hold(std::move(factory))]() -> std::unique_ptr<TokenConstraint> {
    return std::make_unique<PythonConstraint>(with_gil([&] { return hold((*held)()); }));
  };
}

}  // namespace corral::bindings
