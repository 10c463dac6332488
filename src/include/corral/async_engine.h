// AsyncEngine: an Engine stepped by a thread of its own, for services. Any thread adds and
// aborts requests; each request's tokens arrive through a stream object or a callback as they
// are generated. The Python LLM runs on it too.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "corral/engine.h"

namespace corral {

// One request's updates, in order, as the engine thread produces them. A handle: copies share
// the same stream; any thread may read it.
class RequestStream {
 public:
  struct State;  // the queue the engine thread fills (async_engine.cpp)
  explicit RequestStream(std::shared_ptr<State> state);

  int64_t request_id() const;
  // Waits until at least one update is there or the request has ended, and takes every update
  // there. Empty only once the request has ended and every update has been taken. If a step
  // failed, throws its exception (the corral::Error subclass) after the updates before it.
  std::vector<RequestUpdate> next();
  // The same, waiting at most `timeout`: empty also when nothing arrived in time.
  std::vector<RequestUpdate> next_for(std::chrono::milliseconds timeout);
  // Every sample has ended and every update has been taken.
  bool finished() const;

 private:
  std::shared_ptr<State> state_;
};

class AsyncEngine {
 public:
  // Called on the engine thread for each update of a request, in order; the update with
  // finished() true for each of its samples is the sample's last. It must return quickly (the
  // next step waits for it) and may call add_request, abort and finish_sample.
  using Callback = std::function<void(const RequestUpdate& update)>;

  // Loads the model (see Engine) and starts the engine thread, which steps while any request
  // added here is unfinished and sleeps otherwise. Its OpenMP team has options.num_threads
  // threads (0: all cores).
  explicit AsyncEngine(const std::string& model_dir, const EngineOptions& options = EngineOptions{});
  // Aborts every unfinished request (their streams and callbacks get FinishReason::Abort for
  // each live sample) and joins the engine thread. Call drain() first to let them finish.
  ~AsyncEngine();
  AsyncEngine(const AsyncEngine&) = delete;
  AsyncEngine& operator=(const AsyncEngine&) = delete;

  // Queues a request, checked as Engine::add_request does (its exceptions are thrown here),
  // its updates going to the returned stream.
  RequestStream add_request(const Prompt& prompt, const SamplingParams& params);
  // The same, its updates going to on_update. Returns the request's id.
  int64_t add_request(const Prompt& prompt, const SamplingParams& params, Callback on_update);
  // Several requests at once, params[i] for prompts[i]: all join the same next step, or, if one
  // is refused, none is queued (its exception is thrown; no step has seen the others).
  std::vector<RequestStream> add_requests(const std::vector<Prompt>& prompts,
                                          const std::vector<SamplingParams>& params);
  // Ends a request between two steps: each live sample gets a last update with
  // FinishReason::Abort. Unknown or finished ids are ignored.
  void abort(int64_t request_id);
  // Ends one sample between two steps (e.g. on a stop string): it gets a last update with
  // FinishReason::Stop. Unknown or finished ones are ignored.
  void finish_sample(int64_t request_id, int32_t index);
  // Waits until every request added so far has ended.
  void drain();

  // The engine it steps, for what is not a request: stop_token_ids, default_sampling_params,
  // prompt_logits, stats (its calls are thread-safe). Requests added to it directly are not
  // stepped by this thread.
  Engine& engine();
  EngineStats stats() const;

 private:
  struct Loop;  // the engine thread and what it serves (async_engine.cpp)
  std::unique_ptr<Loop> loop_;
};

}  // namespace corral
