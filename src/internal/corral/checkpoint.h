// A Hugging Face checkpoint folder: config.json plus model.safetensors, or shards listed by
// model.safetensors.index.json. Shards are opened (memory-mapped) on first use.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "corral/safetensors.h"

namespace corral {

// A tensor found in a checkpoint, with the file that holds it (for messages).
struct TensorRecord {
  const SafetensorsEntry* entry = nullptr;
  std::shared_ptr<const SafetensorsFile> file;
  const void* data() const { return file->data(*entry); }
};

class Checkpoint {
 public:
  // Throws FileMissingError when the folder has neither model.safetensors nor an index, and
  // CorruptCheckpointError for an unreadable index.
  explicit Checkpoint(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::string config_path() const { return dir_ + "/config.json"; }
  bool contains(const std::string& name) const;
  // Throws MissingTensorError naming the tensor and where it was looked for.
  TensorRecord get(const std::string& name) const;
  // Every file opened so far (they stay mapped while a model uses them).
  std::vector<std::shared_ptr<const SafetensorsFile>> open_files() const;

 private:
  std::shared_ptr<const SafetensorsFile> shard(const std::string& file) const;
  std::string dir_;
  std::string index_path_;                       // empty for a single model.safetensors
  std::map<std::string, std::string> weight_map_;  // tensor name -> shard file name
  mutable std::map<std::string, std::shared_ptr<const SafetensorsFile>> shards_;
};

}  // namespace corral
