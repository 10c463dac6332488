#include "corral/kv_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <string>

#include "corral/error.h"

namespace corral {

namespace {

// A number read from a file (cgroup memory files), or -1 when absent or not a number ("max").
int64_t read_number(const std::string& path) {
  std::ifstream in(path);
  long long v = -1;
  if (!(in >> v) || v < 0) return -1;
  return int64_t(v);
}

// What a memory cgroup lets this process still take: the least of limit - usage over its cgroup
// and each ancestor (v2: memory.max / memory.current; v1: memory.limit_in_bytes /
// memory.usage_in_bytes). CORRAL_CGROUP_ROOT moves the cgroup mount (/sys/fs/cgroup), for tests.
size_t cgroup_headroom(size_t fallback) {
  const char* env = std::getenv("CORRAL_CGROUP_ROOT");
  const std::string root = env && *env ? env : "/sys/fs/cgroup";
  size_t room = fallback;
  std::ifstream self("/proc/self/cgroup");
  std::string line;
  while (std::getline(self, line)) {  // hierarchy-id:controllers:path
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    const bool v2 = line.compare(0, a, "0") == 0 && controllers.empty();
    if (!v2 && ("," + controllers + ",").find(",memory,") == std::string::npos) continue;
    const std::string base = v2 ? root : root + "/memory";
    const char* limit_file = v2 ? "/memory.max" : "/memory.limit_in_bytes";
    const char* usage_file = v2 ? "/memory.current" : "/memory.usage_in_bytes";
    for (std::string dir = path;; dir = dir.substr(0, dir.rfind('/'))) {
      const int64_t limit = read_number(base + dir + limit_file), usage = read_number(base + dir + usage_file);
      if (limit >= 0 && limit < (int64_t(1) << 60))  // v1 writes "no limit" as a huge number
        room = std::min(room, size_t(std::max<int64_t>(limit - std::max<int64_t>(usage, 0), 0)));
      if (dir.empty() || dir == "/") break;
    }
  }
  return room;
}

// Bytes of memory this process may still use: MemAvailable (which counts reclaimable page
// cache), within its cgroup's limit. Measured after the weights are loaded, so they count.
size_t available_memory() {
  size_t avail = size_t(sysconf(_SC_AVPHYS_PAGES)) * size_t(sysconf(_SC_PAGESIZE));
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line))
    if (line.rfind("MemAvailable:", 0) == 0) avail = size_t(std::stoull(line.substr(13))) * 1024;  // in kB
  return cgroup_headroom(avail);
}

int64_t scale_bytes(DType dtype, int64_t kv_heads) { return dtype == DType::F8_E4M3 ? 2 * kv_heads * 4 : 0; }

}  // namespace

int64_t KvLayout::num_groups(AttentionKind kind) const {
  return std::count(group_kind.begin(), group_kind.end(), kind);
}

double KvLayout::bytes_per_token() const {
  const double scales = double(scale_bytes(dtype, kv_heads)) / block_size;  // per block, per layer
  return double(num_layers()) * (double(data_bytes) / block_size + scales);
}

int64_t KvLayout::sequence_bytes(int64_t tokens, bool chunk_savings) const {
  const int64_t blocks = (tokens + block_size - 1) / block_size;
  int64_t local_blocks = blocks;
  if (chunk_savings && chunk_size > 0 && tokens > 0) {
    // Blocks covering the chunk of the last token, as the block manager keeps them.
    const int64_t last = tokens - 1;
    local_blocks = blocks - (last - last % chunk_size) / block_size;
  }
  return page_bytes * (num_groups(AttentionKind::Global) * blocks + num_groups(AttentionKind::Local) * local_blocks);
}

KvLayout make_kv_layout(const ModelConfig& c, int32_t block_size, DType dtype) {
  if (block_size < 1) throw InvalidInputError("block_size must be positive, got " + std::to_string(block_size));
  if (dtype != DType::F32 && dtype != DType::BF16 && dtype != DType::F16 && dtype != DType::F8_E4M3)
    throw DTypeError(std::string("kv_cache_dtype ") + dtype_name(dtype) +
                     " is not supported (float32, bfloat16, float16, float8_e4m3)");
  KvLayout l;
  l.block_size = block_size;
  l.dtype = dtype;
  l.kv_heads = c.num_kv_heads;
  l.head_dim = c.head_dim;
  l.chunk_size = c.attention_chunk_size;
  std::vector<int64_t> global, local;
  for (int64_t i = 0; i < c.num_layers; ++i) (c.layers[i].chunked ? local : global).push_back(i);
  const int64_t g = global.empty() || local.empty() ? std::max(global.size(), local.size())
                                                    : std::min(global.size(), local.size());
  l.layers_per_group = g;
  l.group_of_layer.assign(c.num_layers, -1);
  l.slot_of_layer.assign(c.num_layers, -1);
  for (auto [layers, kind] : {std::pair{&global, AttentionKind::Global}, std::pair{&local, AttentionKind::Local}})
    for (size_t i = 0; i < layers->size(); ++i) {
      if (i % g == 0) l.group_kind.push_back(kind);
      l.group_of_layer[(*layers)[i]] = int32_t(l.group_kind.size() - 1);
      l.slot_of_layer[(*layers)[i]] = int32_t(i % g);
    }
  l.data_bytes = 2 * l.kv_heads * block_size * l.head_dim * int64_t(dtype_size(dtype));
  l.page_bytes = (g * (l.data_bytes + scale_bytes(dtype, l.kv_heads)) + 63) / 64 * 64;
  return l;
}

int64_t KvCache::pages_for(const KvLayout& layout, size_t bytes, Device device) {
  const bool gpu = device.type == DeviceType::CUDA;
  // On the CPU pages are committed as they are first written: a budget beyond the memory this
  // process may use would end with the kernel killing it mid-request rather than an
  // OutOfKVCacheError now.
  const size_t available = gpu ? device_memory(device).free : available_memory();
  const std::string where = gpu ? "bytes free on " + device_name(device)
                                : "bytes this process may still use (MemAvailable within its cgroup's limit)";
  if (bytes > available)
    throw OutOfKVCacheError("kv_cache_bytes=" + std::to_string(bytes) + " is more than the " + std::to_string(available) +
                            " " + where);
  const size_t budget = bytes != 0 ? bytes : gpu ? size_t(double(available) * kGpuDefaultShare) : available / 2;
  const int64_t pages = std::min<int64_t>(int64_t(budget / size_t(layout.page_bytes)), 0x7fffffff);
  if (pages < 1 && bytes == 0)
    throw OutOfKVCacheError("no memory for a KV cache: the default budget, " + std::string(gpu ? "a share" : "half") +
                            " of the " + std::to_string(available) + " " + where + ", is less than one block of " +
                            std::to_string(layout.page_bytes) + " bytes");
  if (pages < 1)
    throw InvalidInputError("kv_cache_bytes=" + std::to_string(bytes) + " cannot hold one KV block of " +
                            std::to_string(layout.page_bytes) + " bytes (block_size " +
                            std::to_string(layout.block_size) + ")");
  return pages;
}

int64_t KvCache::table_width(const KvLayout& layout, int64_t num_pages, int64_t max_len) {
  if (max_len < 1) throw InvalidInputError("the KV cache needs a positive max_len, got " + std::to_string(max_len));
  const int64_t blocks = (max_len + layout.block_size - 1) / layout.block_size;
  // A global group's table holds distinct pages, all groups' pages come from one pool.
  const int64_t global = layout.num_groups(AttentionKind::Global);
  return global > 0 ? std::min(blocks, std::max<int64_t>(num_pages / global, 1)) : blocks;
}

KvCache::KvCache(const KvLayout& layout, size_t bytes, bool prefix_caching, int64_t max_len, int64_t max_seqs,
                 const Stream& stream)
    : layout_(layout),
      stream_(stream),
      num_pages_(pages_for(layout, bytes, stream.device)),
      blocks_(BlockManager::Options{num_pages_, layout.block_size, layout.group_kind, layout.chunk_size,
                                    prefix_caching, table_width(layout, num_pages_, max_len)}),
      tables_(int64_t(layout.group_kind.size()), blocks_.max_blocks(), 2 * max_seqs, stream.device),
      copies_(stream.device) {
  const size_t size = size_t(num_pages_) * size_t(layout_.page_bytes);
  if (stream.device.type == DeviceType::CUDA) {
    on_gpu_ = DeviceBuffer(stream.device, size);
    pool_ = static_cast<char*>(on_gpu_.data());
    fill_zero(pool_, size, stream_);  // as the CPU's fresh pages are (fp8 scales of unwritten blocks)
    return;
  }
  // Anonymous, uncommitted memory: a large budget costs nothing until pages are written.
  void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED)
    throw OutOfKVCacheError("cannot reserve " + std::to_string(size) + " bytes of address space for the KV cache");
  pool_ = static_cast<char*>(m);
  mapped_ = size;
}

KvCache::~KvCache() {
  if (mapped_) munmap(pool_, mapped_);
}

PagedKv KvCache::layer(int64_t l) const {
  const KvLayout& y = layout_;
  const int64_t slot = y.slot_of_layer.at(l);
  PagedKv p;
  p.k = pool_ + slot * y.data_bytes;
  p.v = static_cast<char*>(p.k) + y.data_bytes / 2;
  if (y.dtype == DType::F8_E4M3) {
    char* scales = pool_ + y.layers_per_group * y.data_bytes + slot * scale_bytes(y.dtype, y.kv_heads);
    p.k_scale = reinterpret_cast<float*>(scales);
    p.v_scale = p.k_scale + y.kv_heads;
  }
  p.block_stride = y.page_bytes;
  p.dtype = y.dtype;
  p.num_blocks = num_pages_;
  p.block_size = y.block_size;
  p.kv_heads = int32_t(y.kv_heads);
  p.head_dim = int32_t(y.head_dim);
  return p;
}

const BlockTables& KvCache::sync_tables() {
  tables_.sync(blocks_, stream_);
  return tables_;
}

bool KvCache::append(BlockManager::SeqId id, int64_t n) {
  std::vector<PageCopy> copies;
  if (!blocks_.append(id, n, &copies)) return false;
  if (!copies.empty()) {
    // The sources, then the destinations: one list, as the kernel reads it (a copy on a GPU).
    const int64_t m = int64_t(copies.size());
    std::vector<int32_t> pages(size_t(2 * m));
    for (int64_t i = 0; i < m; ++i) {
      pages[size_t(i)] = copies[size_t(i)].src;
      pages[size_t(m + i)] = copies[size_t(i)].dst;
    }
    use_device(stream_.device);
    const int32_t* lists = on_device(copies_, pages, stream_);
    kernels::kv_cache_copy_pages(stream_, pool_, layout_.page_bytes, lists, lists + m, m);
  }
  return true;
}

}  // namespace corral
