// A memory-mapped .safetensors file: an 8-byte little-endian header length, a JSON header, then
// the tensor data. Opening validates the whole header against the file's size.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "corral/kernels/types.h"

namespace corral {

// A shape as messages print it, e.g. "[64, 3]".
std::string shape_string(const std::vector<int64_t>& shape);

struct SafetensorsEntry {
  std::string dtype_name;      // as written in the header, e.g. "BF16"
  std::optional<DType> dtype;  // empty when Corral has no kernel type for it
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range within the data section
};

class SafetensorsFile {
 public:
  // Throws FileMissingError, or CorruptCheckpointError for a truncated file, a header that is
  // oversized, not JSON, or inconsistent with the tensors' shapes and dtypes.
  static std::shared_ptr<const SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsEntry* find(const std::string& name) const;
  const void* data(const SafetensorsEntry& e) const { return base_ + data_offset_ + e.begin; }
  std::vector<std::string> names() const;
  // Drops this process's pages of the mapping (once the weights are packed into memory of their
  // own): later reads fault them back in from the page cache.
  void release_pages() const;

  // Largest header accepted, as in the safetensors library.
  static constexpr uint64_t kMaxHeaderBytes = 100'000'000;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const char* base_ = nullptr;
  size_t size_ = 0;
  size_t data_offset_ = 0;
  std::unordered_map<std::string, SafetensorsEntry> entries_;
};

}  // namespace corral
