// Assertions for the C++ unit tests, with no test framework: a failed check prints where and
// what, the test goes on, and main returns check::result(), non-zero when any check failed.
#pragma once

#include <cstdio>
#include <exception>
#include <string>

namespace check {

inline int& failures() {
  static int n = 0;
  return n;
}

inline void fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  ++failures();
}

inline int result() {
  if (failures()) std::fprintf(stderr, "%d check(s) failed\n", failures());
  return failures() ? 1 : 0;
}

}  // namespace check

#define CHECK(cond)                                           \
  do {                                                        \
    if (!(cond)) check::fail(__FILE__, __LINE__, #cond);      \
  } while (0)

// `expr` throws `Type` (or a subclass of it) whose message contains `fragment`.
#define CHECK_THROWS(Type, expr, fragment)                                                             \
  do {                                                                                                 \
    try {                                                                                              \
      (void)(expr);                                                                                    \
      check::fail(__FILE__, __LINE__, #expr " did not throw " #Type);                                  \
    } catch (const Type& e) {                                                                          \
      if (std::string(e.what()).find(fragment) == std::string::npos)                                   \
        check::fail(__FILE__, __LINE__, std::string(#Type " lacks '") + (fragment) + "': " + e.what()); \
    } catch (const std::exception& e) {                                                                \
      check::fail(__FILE__, __LINE__, std::string(#expr " threw another exception: ") + e.what());     \
    }                                                                                                  \
  } while (0)
