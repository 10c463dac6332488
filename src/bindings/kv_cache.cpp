// corral._core.BlockManager and corral._core.KvCache: the paged KV cache on its own, for tests
// (property tests drive the block manager; memory tests append through the real kernels).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings.h"
#include "corral/block_manager.h"
#include "corral/error.h"

namespace py = pybind11;

namespace corral::bindings {

namespace {

std::vector<AttentionKind> parse_kinds(const std::vector<std::string>& names) {
  std::vector<AttentionKind> kinds;
  for (const std::string& n : names) {
    if (n == "global")
      kinds.push_back(AttentionKind::Global);
    else if (n == "local")
      kinds.push_back(AttentionKind::Local);
    else
      throw InvalidInputError("layer group kind must be 'global' or 'local', got '" + n + "'");
  }
  return kinds;
}

py::dict stats_dict(const BlockManager::Stats& s) {
  py::dict d;
  d["pages_total"] = s.pages_total;
  d["pages_free"] = s.pages_free;
  d["pages_cached"] = s.pages_cached;
  d["pages_used_global"] = s.pages_used_global;
  d["pages_used_local"] = s.pages_used_local;
  d["prefix_hit_tokens"] = s.prefix_hit_tokens;
  return d;
}

}  // namespace

void register_kv_cache(py::module_& m) {
  using SeqId = BlockManager::SeqId;
  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init([](int64_t num_pages, int32_t block_size, const std::vector<std::string>& groups, int64_t chunk_size,
                       bool prefix_caching) {
             return std::make_unique<BlockManager>(
                 BlockManager::Options{num_pages, block_size, parse_kinds(groups), chunk_size, prefix_caching});
           }),
           py::arg("num_pages"), py::arg("block_size"), py::arg("groups"), py::arg("chunk_size") = 0,
           py::arg("prefix_caching") = true)
      .def("add", &BlockManager::add, py::arg("seq"), py::arg("prompt"), py::arg("reuse") = true)
      .def(
          "append",
          [](BlockManager& b, SeqId id, int64_t n) {
            std::vector<PageCopy> copies;
            const bool ok = b.append(id, n, &copies);
            py::list out;
            for (const PageCopy& c : copies) out.append(py::make_tuple(c.src, c.dst));
            return py::make_tuple(ok, out);
          },
          py::arg("seq"), py::arg("n"), "Returns (ok, [(src page, dst page) copies to make])")
      .def("pages_needed", &BlockManager::pages_needed, py::arg("seq"), py::arg("n"))
      .def(
          "commit",
          [](BlockManager& b, SeqId id, const std::vector<int32_t>& tokens) {
            b.commit(id, tokens.data(), int64_t(tokens.size()));
          },
          py::arg("seq"), py::arg("tokens"))
      .def("fork", &BlockManager::fork, py::arg("parent"), py::arg("child"))
      .def("free", &BlockManager::free, py::arg("seq"))
      .def("contains", &BlockManager::contains, py::arg("seq"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq"))
      .def("num_computed", &BlockManager::num_computed, py::arg("seq"))
      .def("table", &BlockManager::table, py::arg("seq"), py::arg("group"))
      .def("sequences", &BlockManager::sequences)
      .def_property_readonly("num_groups", &BlockManager::num_groups)
      .def("available_pages", &BlockManager::available_pages)
      .def("refcount", &BlockManager::refcount, py::arg("page"))
      .def("is_cached", &BlockManager::is_cached, py::arg("page"))
      .def("stats", [](const BlockManager& b) { return stats_dict(b.stats()); });
}

}  // namespace corral::bindings
