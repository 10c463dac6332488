#include "corral/checkpoint.h"

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "corral/error.h"
#include "json_text.h"

namespace corral {

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw FileMissingError("model folder " + dir + " does not exist");
  const std::string single = dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  if (is_file(single)) {
    shards_["model.safetensors"] = SafetensorsFile::open(single);
    return;
  }
  if (!is_file(index))
    throw FileMissingError("model folder " + dir + " has neither model.safetensors nor model.safetensors.index.json");
  index_path_ = index;
  const std::string text = read_text_file(index, "index");
  const nlohmann::json root = parse_json<CorruptCheckpointError>(text.data(), text.data() + text.size(), "index " + index);
  if (!root.is_object() || !root.contains("weight_map") || !root.at("weight_map").is_object())
    throw CorruptCheckpointError("index " + index + " has no 'weight_map' object");
  for (auto it = root.at("weight_map").begin(); it != root.at("weight_map").end(); ++it) {
    if (!it.value().is_string() || it.value().get<std::string>().find('/') != std::string::npos)
      throw CorruptCheckpointError("index " + index + " maps tensor '" + it.key() + "' to " + describe_json(it.value()) +
                                   ", not a file name in the folder");
    weight_map_[it.key()] = it.value().get<std::string>();
  }
}

std::shared_ptr<const SafetensorsFile> Checkpoint::shard(const std::string& file) const {
  auto it = shards_.find(file);
  if (it != shards_.end()) return it->second;
  const std::string path = dir_ + "/" + file;
  if (!is_file(path))
    throw FileMissingError("safetensors shard " + path + " (listed in " + index_path_ + ") does not exist");
  auto f = SafetensorsFile::open(path);
  shards_[file] = f;
  return f;
}

bool Checkpoint::contains(const std::string& name) const {
  if (index_path_.empty()) return shards_.begin()->second->find(name) != nullptr;
  return weight_map_.count(name) != 0;
}

TensorRecord Checkpoint::get(const std::string& name) const {
  if (index_path_.empty()) {
    const auto& f = shards_.begin()->second;
    const SafetensorsEntry* e = f->find(name);
    if (!e) throw MissingTensorError("tensor '" + name + "' is missing from " + f->path());
    return TensorRecord{e, f};
  }
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) throw MissingTensorError("tensor '" + name + "' is missing from " + index_path_);
  auto f = shard(it->second);
  const SafetensorsEntry* e = f->find(name);
  if (!e)
    throw MissingTensorError("tensor '" + name + "' is missing from " + f->path() + " (where " + index_path_ +
                             " says it is)");
  return TensorRecord{e, f};
}

std::vector<std::shared_ptr<const SafetensorsFile>> Checkpoint::open_files() const {
  std::vector<std::shared_ptr<const SafetensorsFile>> out;
  for (const auto& [name, f] : shards_) out.push_back(f);
  return out;
}

}  // namespace corral
