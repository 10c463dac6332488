// JSON read from checkpoint files (config.json, the shard index, safetensors headers), with
// bounds: a hostile or corrupt file may nest without end or hold megabytes in one value, and
// neither may exhaust the stack of whatever walks the document nor flood an error message.
#pragma once

#include <sys/stat.h>

#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "corral/error.h"

namespace corral {

// Deeper than any real checkpoint file nests (config.json: 3 levels).
constexpr int kMaxJsonDepth = 64;

// The text between begin and end parsed, or Error("<source> is not valid JSON: ...") for bad
// syntax and Error("<source> nests JSON deeper than 64 levels") past the depth limit.
template <class Error>
nlohmann::json parse_json(const char* begin, const char* end, const std::string& source) {
  const auto limit = [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    if (depth > kMaxJsonDepth) throw Error(source + " nests JSON deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    return true;
  };
  try {
    return nlohmann::json::parse(begin, end, limit);
  } catch (const nlohmann::json::exception& e) {
    std::string what = e.what();
    // It quotes the last bytes read, which need not be UTF-8, and messages must be (Python decodes
    // them as UTF-8): non-ASCII bytes become '?', which also makes any cut below safe.
    for (char& ch : what)
      if (static_cast<unsigned char>(ch) >= 0x80) ch = '?';
    throw Error(source + " is not valid JSON: " + (what.size() > 200 ? what.substr(0, 200) + "..." : what));
  }
}

// A value for an error message: as written, cut after 80 characters; a list or object of more
// than 16 elements by its size (not written out at all). parse_json bounds the depth.
inline std::string describe_json(const nlohmann::json& v) {
  if (v.is_array() && v.size() > 16) return "a list of " + std::to_string(v.size()) + " items";
  if (v.is_object() && v.size() > 16) return "an object with " + std::to_string(v.size()) + " fields";
  // ASCII (\uXXXX escapes): a cut inside a UTF-8 character would make the message invalid UTF-8.
  const std::string text = v.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  return text.size() > 80 ? text.substr(0, 80) + "..." : text;
}

// Whether `path` is a regular file (following links).
inline bool is_file(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// The bytes of the file at `path`; FileMissingError("<what> <path> does not exist ...") when it
// is not a readable regular file.
inline std::string read_text_file(const std::string& path, const std::string& what) {
  if (!is_file(path))
    throw FileMissingError(what + " " + path + " does not exist or is not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileMissingError(what + " " + path + " cannot be read");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// read_text_file, then parse_json (errors name the file).
template <class Error>
nlohmann::json read_json_file(const std::string& path, const std::string& what) {
  const std::string text = read_text_file(path, what);
  return parse_json<Error>(text.data(), text.data() + text.size(), path);
}

}  // namespace corral
