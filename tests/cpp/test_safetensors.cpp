// SafetensorsFile::open on files this test writes: a valid one reads back, and every kind of
// damage throws the documented error (CorruptCheckpointError, FileMissingError) naming the file.
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "check.h"
#include "corral/error.h"
#include "corral/safetensors.h"

using corral::SafetensorsFile;

namespace {

std::string g_dir;

std::string write_file(const std::string& name, const std::string& bytes) {
  const std::string path = g_dir + "/" + name;
  std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
  return path;
}

std::string le64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char((v >> (8 * i)) & 0xff);
  return out;
}

// A safetensors file: the header's length, the header, the data section.
std::string safetensors(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// The open of `bytes` (written to `name`) throws CorruptCheckpointError naming the file and `fragment`.
void check_corrupt(const std::string& name, const std::string& bytes, const std::string& fragment) {
  const std::string path = write_file(name, bytes);
  CHECK_THROWS(corral::CorruptCheckpointError, SafetensorsFile::open(path), path);
  CHECK_THROWS(corral::CorruptCheckpointError, SafetensorsFile::open(path), fragment);
}

// A one-tensor header with the given entry for tensor "w".
std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"w": {"dtype": ")" + dtype + R"(", "shape": )" + shape + R"(, "data_offsets": )" + offsets + "}}";
}

void valid_file() {
  const float a[6] = {1, 2, 3, 4, 5, -6};
  const uint16_t b[4] = {0x3f80, 0x4000, 0x4040, 0xbf80};  // bf16 1, 2, 3, -1
  std::string data(reinterpret_cast<const char*>(a), sizeof a);
  data.append(reinterpret_cast<const char*>(b), sizeof b);
  data.append(16, '\x7f');  // c: 2 F64
  const std::string header = R"({"__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    "c": {"dtype": "F64", "shape": [2], "data_offsets": [32, 48]},
    "empty": {"dtype": "I8", "shape": [0, 5], "data_offsets": [48, 48]}})";
  const std::string path = write_file("valid.safetensors", safetensors(header, data));
  auto f = SafetensorsFile::open(path);
  CHECK(f->path() == path);
  CHECK(f->names().size() == 4);  // __metadata__ is no tensor
  CHECK(f->find("__metadata__") == nullptr && f->find("d") == nullptr);
  const corral::SafetensorsEntry* ea = f->find("a");
  CHECK(ea && ea->dtype == corral::DType::F32 && ea->dtype_name == "F32");
  CHECK(ea && ea->shape == std::vector<int64_t>({2, 3}) && ea->begin == 0 && ea->end == 24);
  CHECK(ea && std::memcmp(f->data(*ea), a, sizeof a) == 0);
  const corral::SafetensorsEntry* eb = f->find("b");
  CHECK(eb && eb->dtype == corral::DType::BF16 && std::memcmp(f->data(*eb), b, sizeof b) == 0);
  const corral::SafetensorsEntry* ec = f->find("c");
  CHECK(ec && ec->dtype_name == "F64" && !ec->dtype.has_value());  // a format dtype with no kernel type
  const corral::SafetensorsEntry* ee = f->find("empty");
  CHECK(ee && ee->shape == std::vector<int64_t>({0, 5}) && ee->begin == ee->end);
  CHECK(corral::shape_string(ea->shape) == "[2, 3]");
}

void missing_file() {
  CHECK_THROWS(corral::FileMissingError, SafetensorsFile::open(g_dir + "/absent.safetensors"), "does not exist");
  CHECK_THROWS(corral::CorruptCheckpointError, SafetensorsFile::open(g_dir), "not a regular file");
}

void truncated() {
  const std::string good = safetensors(entry("F32", "[4]", "[0, 16]"), std::string(16, '\1'));
  check_corrupt("empty.safetensors", "", "truncated");
  check_corrupt("five.safetensors", good.substr(0, 5), "truncated");
  check_corrupt("length-only.safetensors", good.substr(0, 8), "truncated");
  check_corrupt("header-cut.safetensors", good.substr(0, 20), "truncated");
  check_corrupt("data-cut.safetensors", good.substr(0, good.size() - 1), "'w' needs bytes up to 16");
}

void bad_header_length() {
  const std::string header = entry("F32", "[1]", "[0, 4]"), data(4, '\0');
  check_corrupt("oversized.safetensors", le64(SafetensorsFile::kMaxHeaderBytes + 1) + header + data, "oversized");
  check_corrupt("max.safetensors", le64(~uint64_t(0)) + header + data, "oversized");
  check_corrupt("at-limit.safetensors", le64(SafetensorsFile::kMaxHeaderBytes) + header + data, "truncated");
  check_corrupt("short.safetensors", le64(header.size() - 3) + header + data, "not valid JSON");
}

void header_not_an_object() {
  check_corrupt("not-json.safetensors", safetensors("this is not json", ""), "not valid JSON");
  check_corrupt("array.safetensors", safetensors("[1, 2, 3]", ""), "not a JSON object");
  check_corrupt("string.safetensors", safetensors(R"("w")", ""), "not a JSON object");
  check_corrupt("entry-array.safetensors", safetensors(R"({"w": [1]})", ""), "'w': not an object");
}

void bad_entries() {
  const std::string data(16, '\0');
  auto bad = [&](const std::string& name, const std::string& header, const std::string& fragment) {
    check_corrupt(name + ".safetensors", safetensors(header, data), "'w'");
    check_corrupt(name + ".safetensors", safetensors(header, data), fragment);
  };
  bad("past-end", entry("F32", "[4]", "[1000000, 1000016]"), "truncated");
  bad("reversed", entry("F32", "[0]", "[16, 0]"), "end before they begin");
  bad("span", entry("F32", "[2]", "[0, 16]"), "does not match its shape and dtype");
  bad("unknown-dtype", entry("Q4_K", "[4]", "[0, 16]"), "unknown dtype 'Q4_K'");
  bad("dtype-number", R"({"w": {"dtype": 32, "shape": [4], "data_offsets": [0, 16]}})", "no dtype string");
  bad("negative-shape", entry("F32", "[-4]", "[0, 16]"), "non-negative integers");
  bad("float-shape", entry("F32", "[4.0]", "[0, 16]"), "non-negative integers");
  bad("no-shape", R"({"w": {"dtype": "F32", "data_offsets": [0, 16]}})", "no shape list");
  bad("three-offsets", entry("F32", "[4]", "[0, 8, 16]"), "data_offsets must be [begin, end]");
  bad("negative-offset", entry("F32", "[4]", "[-16, 0]"), "non-negative integers");
  bad("huge-entry", entry("F32", "[4611686018427387905]", "[0, 16]"), "shape entry 4611686018427387905 is too large");
  bad("huge-product", entry("I64", "[1099511627776, 1099511627776]", "[0, 16]"), "shape is too large");
  bad("partial-bytes", entry("F4", "[3]", "[0, 2]"), "whole bytes");
}

}  // namespace

int main() {
  char dir[] = "/tmp/corral-test-safetensors-XXXXXX";
  if (!mkdtemp(dir)) return 2;
  g_dir = dir;
  valid_file();
  missing_file();
  truncated();
  bad_header_length();
  header_not_an_object();
  bad_entries();
  std::filesystem::remove_all(g_dir);
  return check::result();
}
