#include "corral/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "corral/error.h"
#include "json_text.h"

namespace corral {

namespace {

using json = nlohmann::json;

// Element sizes in bits of every dtype the format defines; `kernel` is Corral's type where it has one.
struct FormatDType {
  const char* name;
  unsigned bits;
  std::optional<DType> kernel;
};
constexpr FormatDType kFormatDTypes[] = {
    {"F64", 64, std::nullopt},        {"F32", 32, DType::F32},          {"F16", 16, DType::F16},
    {"BF16", 16, DType::BF16},        {"F8_E4M3", 8, DType::F8_E4M3},   {"F8_E5M2", 8, std::nullopt},
    {"F8_E4M3FNUZ", 8, std::nullopt}, {"F8_E5M2FNUZ", 8, std::nullopt}, {"F8_E8M0", 8, std::nullopt},
    {"F6_E2M3", 6, std::nullopt},     {"F6_E3M2", 6, std::nullopt},     {"F4", 4, std::nullopt},
    {"C64", 64, std::nullopt},        {"I64", 64, DType::I64},          {"I32", 32, DType::I32},
    {"I16", 16, std::nullopt},        {"I8", 8, DType::I8},          {"U64", 64, std::nullopt},
    {"U32", 32, std::nullopt},        {"U16", 16, std::nullopt},        {"U8", 8, std::nullopt},
    {"BOOL", 8, std::nullopt},
};

const FormatDType* format_dtype(const std::string& name) {
  for (const FormatDType& d : kFormatDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw CorruptCheckpointError("safetensors file " + path + " " + what);
}

uint64_t read_le64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | uint8_t(p[i]);
  return v;
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& e) {
  auto bad = [&](const std::string& why) { corrupt(path, "has a corrupt header entry for tensor '" + name + "': " + why); };
  if (!e.is_object()) bad("not an object");
  if (!e.contains("dtype") || !e.at("dtype").is_string()) bad("no dtype string");
  if (!e.contains("shape") || !e.at("shape").is_array()) bad("no shape list");
  if (!e.contains("data_offsets") || !e.at("data_offsets").is_array() || e.at("data_offsets").size() != 2)
    bad("data_offsets must be [begin, end]");
  SafetensorsEntry out;
  out.dtype_name = e.at("dtype").get<std::string>();
  const FormatDType* fd = format_dtype(out.dtype_name);
  if (!fd) bad("unknown dtype '" + out.dtype_name + "'");
  out.dtype = fd->kernel;
  // Sizes in 128-bit arithmetic: a header must not overflow its way past the size checks.
  unsigned __int128 bits = fd->bits;
  for (const json& d : e.at("shape")) {
    if (!d.is_number_unsigned()) bad("shape entries must be non-negative integers");
    const uint64_t n = d.get<uint64_t>();
    if (n > (uint64_t(1) << 62)) bad("shape entry " + std::to_string(n) + " is too large");
    bits *= n;
    if (bits > (static_cast<unsigned __int128>(1) << 70)) bad("shape is too large");
    out.shape.push_back(int64_t(n));
  }
  if (bits % 8 != 0) bad("its " + out.dtype_name + " elements do not fill whole bytes");
  for (const json& o : e.at("data_offsets"))
    if (!o.is_number_unsigned()) bad("data_offsets must be non-negative integers");
  out.begin = e.at("data_offsets")[0].get<uint64_t>();
  out.end = e.at("data_offsets")[1].get<uint64_t>();
  if (out.end < out.begin) bad("data_offsets end before they begin");
  if (static_cast<unsigned __int128>(out.end - out.begin) != bits / 8)
    bad("data_offsets span " + std::to_string(out.end - out.begin) + " bytes, which does not match its shape and dtype");
  return out;
}

}  // namespace

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw FileMissingError("safetensors file " + path + " does not exist");
    throw FileMissingError("safetensors file " + path + " cannot be opened: " + std::strerror(errno));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    corrupt(path, "is not a regular file");
  }
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->size_ = size_t(st.st_size);
  if (f->size_ > 0) {
    void* m = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      corrupt(path, std::string("cannot be memory-mapped: ") + std::strerror(err));
    }
    f->base_ = static_cast<const char*>(m);
  }
  ::close(fd);  // the mapping keeps the file alive

  if (f->size_ < 8)
    corrupt(path, "is truncated: " + std::to_string(f->size_) + " bytes, fewer than the 8-byte header length");
  const uint64_t header = read_le64(f->base_);
  if (header > kMaxHeaderBytes)
    corrupt(path, "has an oversized header: its length field says " + std::to_string(header) +
                      " bytes, over the " + std::to_string(kMaxHeaderBytes) + "-byte limit (corrupt or not a safetensors file)");
  if (8 + header > f->size_)
    corrupt(path, "is truncated: the header needs " + std::to_string(header) + " bytes but the file has only " +
                      std::to_string(f->size_ - 8) + " after the length field");
  const json root = parse_json<CorruptCheckpointError>(f->base_ + 8, f->base_ + 8 + header, "safetensors file " + path + " (its header)");
  if (!root.is_object()) corrupt(path, "has a corrupt header (not a JSON object)");
  f->data_offset_ = 8 + header;
  const uint64_t data_bytes = f->size_ - f->data_offset_;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    SafetensorsEntry e = parse_entry(path, it.key(), it.value());
    if (e.end > data_bytes)
      corrupt(path, "is truncated: tensor '" + it.key() + "' needs bytes up to " + std::to_string(e.end) +
                        " of the data section, which has only " + std::to_string(data_bytes));
    f->entries_.emplace(it.key(), std::move(e));
  }
  return f;
}

void SafetensorsFile::release_pages() const {
  if (base_) madvise(const_cast<char*>(base_), size_, MADV_DONTNEED);
}

SafetensorsFile::~SafetensorsFile() {
  if (base_) munmap(const_cast<char*>(base_), size_);
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace corral
