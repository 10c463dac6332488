// corral._core.Engine: the C++ engine, with the GIL released while it computes.
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <utility>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "corral/async_engine.h"
#include "corral/engine.h"
#include "corral/engine_core.h"

namespace py = pybind11;

namespace corral::bindings {

namespace {

py::dict config_dict(const ModelConfig& c) {
  py::dict d;
  d["vocab_size"] = c.vocab_size;
  d["hidden_size"] = c.hidden_size;
  d["num_layers"] = c.num_layers;
  d["num_heads"] = c.num_heads;
  d["num_kv_heads"] = c.num_kv_heads;
  d["head_dim"] = c.head_dim;
  d["num_experts"] = c.num_experts;
  d["top_k"] = c.top_k;
  d["attention_chunk_size"] = c.attention_chunk_size;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["bos_token_id"] = c.bos_token_id;
  d["eos_token_ids"] = c.eos_token_ids;
  d["multimodal"] = c.multimodal;
  py::list layers;
  for (const LayerSpec& s : c.layers) {
    py::dict l;
    l["use_rope"] = s.use_rope;
    l["chunked"] = s.chunked;
    l["qk_norm"] = s.qk_norm;
    l["temperature_tuning"] = s.temperature_tuning;
    l["moe"] = s.moe;
    layers.append(l);
  }
  d["layers"] = layers;
  return d;
}

using PixelArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using Images = std::vector<PixelArray>;

// An image from Python: its tiles as one float32 array [tiles, channels, size, size] (a copy).
ImageInput to_image(const PixelArray& pixels) {
  if (pixels.ndim() != 4)
    throw ShapeError("an image's pixel_values must be [tiles, channels, size, size], got " +
                     std::to_string(pixels.ndim()) + " dimensions");
  return ImageInput{std::vector<float>(pixels.data(), pixels.data() + pixels.size()), int64_t(pixels.shape(0))};
}

Prompt to_prompt(std::vector<int32_t> ids, const Images& images) {
  Prompt p(std::move(ids));
  for (const PixelArray& a : images) p.images.push_back(to_image(a));
  return p;
}

// Prompts with their images (images may be empty: no prompt has any).
std::vector<Prompt> to_prompts(const std::vector<std::vector<int32_t>>& ids, const std::vector<Images>& images) {
  if (!images.empty() && images.size() != ids.size())
    throw InvalidInputError("images lists " + std::to_string(images.size()) + " prompts' images for " +
                            std::to_string(ids.size()) + " prompts");
  std::vector<Prompt> out;
  for (size_t i = 0; i < ids.size(); ++i) out.push_back(to_prompt(ids[i], images.empty() ? Images{} : images[i]));
  return out;
}

// add_request(prompt_token_ids, params, images) of an Engine or an AsyncEngine: the prompt made
// with the GIL, the engine called without it.
template <class E>
auto add_request(E& e, std::vector<int32_t> ids, const SamplingParams& params, const Images& images) {
  const Prompt prompt = to_prompt(std::move(ids), images);
  py::gil_scoped_release release;
  return e.add_request(prompt, params);
}

py::dict vision_dict(const VisionInfo& v) {
  py::dict d;
  d["hidden_size"] = v.hidden_size;
  d["image_size"] = v.image_size;
  d["patch_size"] = v.patch_size;
  d["num_channels"] = v.num_channels;
  d["tokens_per_tile"] = v.tokens_per_tile;
  d["image_token_id"] = v.image_token_id;
  return d;
}

// An engine pass over whole prompts: run(data) fills one array of [total tokens] rows (of `width`
// values each; 0: one value) with the GIL released, and each prompt gets a view of its rows.
template <class T, class Run>
py::list per_prompt(const std::vector<std::vector<int32_t>>& prompts, py::ssize_t width, const Run& run) {
  py::ssize_t total = 0;
  for (const auto& p : prompts) total += py::ssize_t(p.size());
  py::array_t<T> all = width > 0 ? py::array_t<T>({total, width}) : py::array_t<T>(total);
  T* data = all.mutable_data();
  {
    py::gil_scoped_release release;
    run(data);
  }
  py::list out;
  py::ssize_t row = 0;
  for (const auto& p : prompts) {
    out.append(all[py::make_tuple(py::slice(row, row + py::ssize_t(p.size()), 1), py::ellipsis())]);
    row += py::ssize_t(p.size());
  }
  return out;
}

py::dict stats_dict(const EngineStats& s) {
  py::dict d;
  d["weight_bytes"] = s.weight_bytes;
  d["weight_format"] = s.weight_format;
  d["kv_blocks_total"] = s.kv_blocks_total;
  d["kv_blocks_free"] = s.kv_blocks_free;
  d["kv_blocks_cached"] = s.kv_blocks_cached;
  d["kv_global_blocks_used"] = s.kv_global_blocks_used;
  d["kv_local_blocks_used"] = s.kv_local_blocks_used;
  d["kv_global_layer_groups"] = s.kv_global_layer_groups;
  d["kv_local_layer_groups"] = s.kv_local_layer_groups;
  d["kv_block_size"] = s.kv_block_size;
  d["kv_block_bytes"] = s.kv_block_bytes;
  d["kv_bytes_per_token"] = s.kv_bytes_per_token;
  d["prefix_cache_hit_tokens"] = s.prefix_cache_hit_tokens;
  d["requests_waiting"] = s.requests_waiting;
  d["requests_running"] = s.requests_running;
  d["prefill_tokens_computed"] = s.prefill_tokens_computed;
  d["decode_tokens_computed"] = s.decode_tokens_computed;
  d["preemptions"] = s.preemptions;
  py::dict experts;  // MoE layer -> tokens routed to each expert, cumulative
  for (size_t l = 0; l < s.expert_tokens.size(); ++l)
    if (!s.expert_tokens[l].empty()) experts[py::int_(l)] = s.expert_tokens[l];
  d["moe_expert_tokens"] = experts;
  return d;
}

// Updates of many requests for one Python thread: the engine thread appends them, each tagged
// with the key its request was added with, and the Python thread takes all there are at once
// (one GIL round trip per wake-up, not one per update).
class UpdateInbox {
 public:
  void push(int64_t key, const RequestUpdate& u) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      updates_.emplace_back(key, u);
    }
    ready_.notify_one();
  }
  // Every (key, update) there, waiting up to `timeout` for one; empty on a timeout or after close().
  std::vector<std::pair<int64_t, RequestUpdate>> wait(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait_for(lock, timeout, [&] { return !updates_.empty() || closed_; });
    return std::exchange(updates_, {});
  }
  void close() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      closed_ = true;
    }
    ready_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<std::pair<int64_t, RequestUpdate>> updates_;
  bool closed_ = false;
};

// Python drops an AsyncEngine with the GIL released: joining its thread may wait for a step
// whose structured-output matchers need the GIL.
struct DeleteWithoutGil {
  void operator()(AsyncEngine* e) const {
    py::gil_scoped_release release;
    delete e;
  }
};

// stats() of an Engine or AsyncEngine as a dict, read with the GIL released (it waits for a step).
template <class E>
py::dict stats_of(const E& e) {
  EngineStats s;
  {
    py::gil_scoped_release release;
    s = e.stats();
  }
  return stats_dict(s);
}

}  // namespace

void register_engine(py::module_& m) {
  py::class_<EngineOptions>(m, "EngineOptions")
      .def(py::init<>())
      .def_readwrite("device", &EngineOptions::device)
      .def_readwrite("tokenizer_dir", &EngineOptions::tokenizer_dir)
      .def_readwrite("block_size", &EngineOptions::block_size)
      .def_readwrite("kv_cache_bytes", &EngineOptions::kv_cache_bytes)
      .def_readwrite("kv_cache_dtype", &EngineOptions::kv_cache_dtype)
      .def_readwrite("quantization", &EngineOptions::quantization)
      .def_readwrite("dtype", &EngineOptions::dtype)
      .def_readwrite("enable_prefix_caching", &EngineOptions::enable_prefix_caching)
      .def_readwrite("enforce_eager", &EngineOptions::enforce_eager)
      .def_readwrite("max_model_len", &EngineOptions::max_model_len)
      .def_readwrite("max_num_seqs", &EngineOptions::max_num_seqs)
      .def_readwrite("max_num_batched_tokens", &EngineOptions::max_num_batched_tokens)
      .def_readwrite("num_threads", &EngineOptions::num_threads)
      .def_readwrite("max_images_per_prompt", &EngineOptions::max_images_per_prompt)
      .def_readwrite("seed", &EngineOptions::seed);

  py::class_<SamplingParams>(m, "SamplingParams")
      .def(py::init<>())
      .def_readwrite("n", &SamplingParams::n)
      .def_readwrite("temperature", &SamplingParams::temperature)
      .def_readwrite("top_k", &SamplingParams::top_k)
      .def_readwrite("top_p", &SamplingParams::top_p)
      .def_readwrite("min_p", &SamplingParams::min_p)
      .def_readwrite("repetition_penalty", &SamplingParams::repetition_penalty)
      .def_readwrite("presence_penalty", &SamplingParams::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplingParams::frequency_penalty)
      .def_readwrite("max_tokens", &SamplingParams::max_tokens)
      .def_readwrite("min_tokens", &SamplingParams::min_tokens)
      .def_readwrite("ignore_eos", &SamplingParams::ignore_eos)
      .def_readwrite("stop_token_ids", &SamplingParams::stop_token_ids)
      .def_readwrite("seed", &SamplingParams::seed)
      .def_readwrite("logprobs", &SamplingParams::logprobs)
      // Set to a callable returning a matcher (corral.structured_output); reads as whether one is set.
      .def_property(
          "constraint", [](const SamplingParams& p) { return bool(p.constraint); },
          [](SamplingParams& p, py::object factory) { p.constraint = python_constraint_factory(std::move(factory)); });

  py::class_<RequestUpdate>(m, "RequestUpdate")
      .def_readonly("request_id", &RequestUpdate::request_id)
      .def_readonly("index", &RequestUpdate::index)
      .def_readonly("new_token_ids", &RequestUpdate::new_token_ids)
      .def_readonly("logprobs", &RequestUpdate::logprobs)
      .def_readonly("error", &RequestUpdate::error)
      .def_property_readonly("finished", &RequestUpdate::finished)
      .def_property_readonly("finish_reason", [](const RequestUpdate& u) -> py::object {
        if (!u.finished()) return py::none();
        return py::str(finish_reason_name(u.finish_reason));
      });

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const std::string& dir, const EngineOptions& o) {
             py::gil_scoped_release release;
             return std::make_unique<Engine>(dir, o);
           }),
           py::arg("model_dir"), py::arg("options"))
      .def_property_readonly("config", [](const Engine& e) { return config_dict(e.core().config()); })
      .def_property_readonly("vocab_size", &Engine::vocab_size)
      .def_property_readonly("max_model_len", &Engine::max_model_len)
      .def_property_readonly("stop_token_ids", &Engine::stop_token_ids)
      .def_property_readonly("default_sampling_params", &Engine::default_sampling_params)
      // The vision encoder's settings (hidden_size 0: the model takes no images).
      .def_property_readonly("vision", [](const Engine& e) { return vision_dict(e.vision()); })
      // Calls that may wait for another thread's step release the GIL meanwhile.
      .def(
          "add_request",
          &add_request<Engine>,
          py::arg("prompt_token_ids"), py::arg("params"), py::arg("images") = Images{})
      // The vision encoder alone on one image's tiles: [tiles * tokens_per_tile, hidden_size].
      .def(
          "encode_image",
          [](Engine& e, const PixelArray& pixels) {
            const ImageInput image = to_image(pixels);
            std::vector<float> features;
            {
              py::gil_scoped_release release;
              features = e.core().encode_image(image);
            }
            const py::ssize_t H = py::ssize_t(e.core().config().hidden_size);
            py::array_t<float> out({py::ssize_t(features.size()) / H, H});
            std::copy(features.begin(), features.end(), out.mutable_data());
            return out;
          },
          py::arg("pixel_values"))
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("abort", &Engine::abort, py::arg("request_id"), py::call_guard<py::gil_scoped_release>())
      .def("finish_sample", &Engine::finish_sample, py::arg("request_id"), py::arg("index"),
           py::call_guard<py::gil_scoped_release>())
      .def("has_unfinished", &Engine::has_unfinished, py::call_guard<py::gil_scoped_release>())
      .def(
          "prompt_logits",
          [](Engine& e, const std::vector<std::vector<int32_t>>& prompts, const std::vector<Images>& images) {
            const std::vector<Prompt> inputs = to_prompts(prompts, images);
            return per_prompt<float>(prompts, py::ssize_t(e.vocab_size()),
                                     [&](float* data) { e.prompt_logits(inputs, data); });
          },
          py::arg("prompts"), py::arg("images") = std::vector<Images>{})
      .def(
          "prompt_logprobs",
          [](Engine& e, const std::vector<std::vector<int32_t>>& prompts) {
            return per_prompt<double>(prompts, 0, [&](double* data) { e.prompt_logprobs(prompts, data); });
          },
          py::arg("prompts"))
      .def("stats", &stats_of<Engine>);

  py::class_<RequestStream>(m, "RequestStream")
      .def_property_readonly("request_id", &RequestStream::request_id)
      // Waits with the GIL released; a timeout lets Python handle signals (Ctrl-C) between waits.
      .def(
          "next",
          [](RequestStream& s, double timeout_s) {
            py::gil_scoped_release release;
            return s.next_for(std::chrono::milliseconds(int64_t(timeout_s * 1000)));
          },
          py::arg("timeout_s") = 0.1)
      .def_property_readonly("finished", &RequestStream::finished);

  // Python callbacks are not offered (the engine thread would need the GIL for every update):
  // services take many requests' updates from an UpdateInbox.
  py::class_<UpdateInbox, std::shared_ptr<UpdateInbox>>(m, "UpdateInbox")
      .def(py::init<>())
      .def(
          "wait",
          [](UpdateInbox& inbox, double timeout_s) {
            py::gil_scoped_release release;
            return inbox.wait(std::chrono::milliseconds(int64_t(timeout_s * 1000)));
          },
          py::arg("timeout_s") = 0.1)
      .def("close", &UpdateInbox::close);

  py::class_<AsyncEngine, std::unique_ptr<AsyncEngine, DeleteWithoutGil>>(m, "AsyncEngine")
      .def(py::init([](const std::string& dir, const EngineOptions& o) {
             py::gil_scoped_release release;
             return std::unique_ptr<AsyncEngine, DeleteWithoutGil>(new AsyncEngine(dir, o));
           }),
           py::arg("model_dir"), py::arg("options"))
      .def_property_readonly("engine", &AsyncEngine::engine, py::return_value_policy::reference_internal)
      .def(
          "add_request",
          &add_request<AsyncEngine>,
          py::arg("prompt_token_ids"), py::arg("params"), py::arg("images") = Images{})
      // images: empty, or one list of images per prompt.
      .def(
          "add_requests",
          [](AsyncEngine& e, const std::vector<std::vector<int32_t>>& prompts, const std::vector<SamplingParams>& params,
             const std::vector<Images>& images) {
            const std::vector<Prompt> inputs = to_prompts(prompts, images);
            py::gil_scoped_release release;
            return e.add_requests(inputs, params);
          },
          py::arg("prompts"), py::arg("params"), py::arg("images") = std::vector<Images>{})
      // Its updates go to inbox (shared by many requests) tagged with key; returns the request id.
      .def(
          "add_request_to",
          [](AsyncEngine& e, std::shared_ptr<UpdateInbox> inbox, int64_t key, std::vector<int32_t> ids,
             const SamplingParams& params, const Images& images) {
            const Prompt prompt = to_prompt(std::move(ids), images);
            py::gil_scoped_release release;
            return e.add_request(prompt, params, [inbox, key](const RequestUpdate& u) { inbox->push(key, u); });
          },
          py::arg("inbox"), py::arg("key"), py::arg("prompt_token_ids"), py::arg("params"), py::arg("images") = Images{})
      .def("abort", &AsyncEngine::abort, py::arg("request_id"), py::call_guard<py::gil_scoped_release>())
      .def("finish_sample", &AsyncEngine::finish_sample, py::arg("request_id"), py::arg("index"),
           py::call_guard<py::gil_scoped_release>())
      .def("drain", &AsyncEngine::drain, py::call_guard<py::gil_scoped_release>())
      .def("stats", &stats_of<AsyncEngine>);
}

}  // namespace corral::bindings
