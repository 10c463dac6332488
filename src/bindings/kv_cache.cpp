// corral._core.BlockManager and corral._core.KvCache: the paged KV cache on its own, for tests
// (property tests drive the block manager; memory tests append through the real kernels).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings.h"
#include "corral/block_manager.h"
#include "corral/config.h"
#include "corral/error.h"
#include "corral/kernels/attention.h"
#include "corral/kv_cache.h"

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

DType parse_kv_dtype(const std::string& name) {
  if (name == "float32") return DType::F32;
  if (name == "bfloat16") return DType::BF16;
  if (name == "float16") return DType::F16;
  if (name == "fp8" || name == "float8_e4m3") return DType::F8_E4M3;
  throw DTypeError("KV dtype '" + name + "' is not one of float32, bfloat16, float16, fp8");
}

}  // namespace

void register_kv_cache(py::module_& m) {
  using SeqId = BlockManager::SeqId;
  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init([](int64_t num_pages, int32_t block_size, const std::vector<std::string>& groups, int64_t chunk_size,
                       bool prefix_caching, int64_t max_blocks) {
             return std::make_unique<BlockManager>(BlockManager::Options{num_pages, block_size, parse_kinds(groups),
                                                                         chunk_size, prefix_caching, max_blocks});
           }),
           py::arg("num_pages"), py::arg("block_size"), py::arg("groups"), py::arg("chunk_size") = 0,
           py::arg("prefix_caching") = true, py::arg("max_blocks") = 0)
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
      .def("row", &BlockManager::row, py::arg("seq"))
      .def_property_readonly("num_rows", &BlockManager::num_rows)
      .def(
          "take_table_changes",
          [](BlockManager& b) {
            py::list out;
            for (const TableEntry& e : b.take_table_changes()) out.append(py::make_tuple(e.group, e.row, e.block, e.page));
            return out;
          },
          "[(group, row, block, page)] table entries changed since the last call, oldest first")
      .def("sequences", &BlockManager::sequences)
      .def_property_readonly("num_groups", &BlockManager::num_groups)
      .def("available_pages", &BlockManager::available_pages)
      .def("refcount", &BlockManager::refcount, py::arg("page"))
      .def("is_cached", &BlockManager::is_cached, py::arg("page"))
      .def("stats", [](const BlockManager& b) { return stats_dict(b.stats()); });

  py::class_<KvLayout>(m, "KvLayout")
      .def_static(
          "from_config",
          [](const std::string& config_json, int32_t block_size, const std::string& dtype) {
            return make_kv_layout(load_config(config_json), block_size, parse_kv_dtype(dtype));
          },
          py::arg("config_json"), py::arg("block_size") = 16, py::arg("dtype") = "bfloat16",
          "The page layout Corral would use for the model of a config.json (no weights needed)")
      .def_readonly("block_size", &KvLayout::block_size)
      .def_readonly("layers_per_group", &KvLayout::layers_per_group)
      .def_readonly("page_bytes", &KvLayout::page_bytes)
      .def_property_readonly("bytes_per_token", &KvLayout::bytes_per_token)
      .def_property_readonly("global_groups", [](const KvLayout& l) { return l.num_groups(AttentionKind::Global); })
      .def_property_readonly("local_groups", [](const KvLayout& l) { return l.num_groups(AttentionKind::Local); })
      .def("sequence_bytes", &KvLayout::sequence_bytes, py::arg("tokens"), py::arg("chunk_savings") = true);

  py::class_<KvCache>(m, "KvCache")
      .def(py::init<const KvLayout&, size_t, bool, int64_t, int64_t>(), py::arg("layout"), py::arg("bytes"),
           py::arg("prefix_caching") = true, py::arg("max_len") = int64_t(1) << 20, py::arg("max_seqs") = 4)
      .def(
          "table_pool_row",
          [](KvCache& kv, BlockManager::SeqId id, int64_t group) {
            // The sequence's row of the persistent block tables, after writing the pending changes.
            const BlockTables& t = kv.sync_tables();
            if (group < 0 || group >= kv.blocks().num_groups()) throw InvalidInputError("no group " + std::to_string(group));
            const int32_t* row = t.group(group) + int64_t(kv.blocks().row(id)) * t.max_blocks();
            return std::vector<int32_t>(row, row + t.max_blocks());
          },
          py::arg("seq"), py::arg("group"))
      .def_property_readonly("table_pool_rows", [](const KvCache& kv) { return kv.tables().rows(); })
      .def_property_readonly("blocks", py::overload_cast<>(&KvCache::blocks), py::return_value_policy::reference_internal)
      .def_property_readonly("num_pages", &KvCache::num_pages)
      .def("append", &KvCache::append, py::arg("seq"), py::arg("n"))
      .def(
          "write",
          [](KvCache& kv, BlockManager::SeqId id, int64_t start,
             py::array_t<float, py::array::c_style | py::array::forcecast> k,
             py::array_t<float, py::array::c_style | py::array::forcecast> v) {
            // K/V rows of positions start.. of `id`, written to every layer through the KV-write kernel.
            const KvLayout& l = kv.layout();
            const int64_t width = l.kv_heads * l.head_dim, n = k.ndim() == 2 ? k.shape(0) : -1;
            if (n < 0 || k.shape(1) != width || v.ndim() != 2 || v.shape(0) != n || v.shape(1) != width)
              throw ShapeError("k and v must be (tokens, " + std::to_string(width) + ")");
            if (start < 0 || start + n > kv.blocks().num_tokens(id))
              throw InvalidInputError("positions " + std::to_string(start) + ".." + std::to_string(start + n) +
                                      " have no room appended in sequence " + std::to_string(id));
            const int64_t bs = l.block_size;
            std::vector<std::vector<int64_t>> slots(kv.blocks().num_groups());
            for (int64_t g = 0; g < kv.blocks().num_groups(); ++g) {
              const auto& table = kv.blocks().table(id, g);
              for (int64_t p = start; p < start + n; ++p) {
                if (table[size_t(p / bs)] < 0)
                  throw InvalidInputError("position " + std::to_string(p) + " of sequence " + std::to_string(id) +
                                          " lies in a block its local layer group " + std::to_string(g) +
                                          " has released");
                slots[g].push_back(int64_t(table[size_t(p / bs)]) * bs + p % bs);
              }
            }
            for (int64_t layer = 0; layer < l.num_layers(); ++layer)
              kernels::kv_cache_write(Stream{}, kv.layer(layer), k.data(), v.data(), width, n,
                                      slots[l.group_of_layer[layer]].data());
          },
          py::arg("seq"), py::arg("start"), py::arg("k"), py::arg("v"))
      .def(
          "attend",
          [](KvCache& kv, BlockManager::SeqId id, int64_t layer,
             py::array_t<float, py::array::c_style | py::array::forcecast> q, float scale) {
            // Attention of one query token at the sequence's last position, through the layer's
            // pages (a decode step of one layer), as the model runs it.
            const KvLayout& l = kv.layout();
            if (layer < 0 || layer >= l.num_layers()) throw InvalidInputError("no layer " + std::to_string(layer));
            if (q.ndim() != 2 || q.shape(1) != l.head_dim || q.shape(0) % l.kv_heads != 0)
              throw ShapeError("q must be (heads, " + std::to_string(l.head_dim) + ") with heads a multiple of " +
                               std::to_string(l.kv_heads));
            const int64_t group = l.group_of_layer[layer], n = kv.blocks().num_tokens(id);
            if (n < 1) throw InvalidInputError("sequence " + std::to_string(id) + " holds no tokens");
            const BlockTables& tables = kv.sync_tables();
            const int32_t starts[2] = {0, 1}, position = int32_t(n - 1), row = kv.blocks().row(id);
            const AttentionBatch batch{starts, 1, &position, tables.group(group), &row, tables.max_blocks()};
            const bool local = kv.blocks().group_kind(group) == AttentionKind::Local;
            py::array_t<float> out({q.shape(0), q.shape(1)});
            float* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              kernels::paged_attention(Stream{}, o, q.data(), q.shape(0), kv.layer(layer), batch, scale,
                                       local ? l.chunk_size : 0);
            }
            return out;
          },
          py::arg("seq"), py::arg("layer"), py::arg("q"), py::arg("scale"));
}

}  // namespace corral::bindings
