#include "corral/async_engine.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <iterator>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

namespace corral {

struct RequestStream::State {
  int64_t id = 0;
  mutable std::mutex mutex;
  std::condition_variable arrived;
  std::deque<RequestUpdate> updates;
  std::exception_ptr error;  // a failed step's exception, thrown once the updates before it are taken
  bool ended = false;        // the engine thread has pushed its last update
};

RequestStream::RequestStream(std::shared_ptr<State> state) : state_(std::move(state)) {}

int64_t RequestStream::request_id() const { return state_->id; }

namespace {

// Takes what a stream holds once wait(lock, ready) returns.
template <class Wait>
std::vector<RequestUpdate> take(RequestStream::State& s, const Wait& wait) {
  std::unique_lock<std::mutex> lock(s.mutex);
  wait(lock, [&] { return !s.updates.empty() || s.ended; });
  std::vector<RequestUpdate> out(std::make_move_iterator(s.updates.begin()), std::make_move_iterator(s.updates.end()));
  s.updates.clear();
  if (out.empty() && s.error) std::rethrow_exception(std::exchange(s.error, nullptr));
  return out;
}

}  // namespace

std::vector<RequestUpdate> RequestStream::next() {
  return take(*state_, [&](auto& lock, const auto& ready) { state_->arrived.wait(lock, ready); });
}

std::vector<RequestUpdate> RequestStream::next_for(std::chrono::milliseconds timeout) {
  return take(*state_, [&](auto& lock, const auto& ready) { state_->arrived.wait_for(lock, timeout, ready); });
}

bool RequestStream::finished() const {
  const std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->ended && state_->updates.empty() && !state_->error;
}

struct AsyncEngine::Loop {
  // Where a request's updates go, and which of its samples are still live.
  struct Sink {
    std::shared_ptr<RequestStream::State> stream;  // or
    Callback callback;
    std::vector<bool> live;
  };
  // An abort (index < 0) or a finish_sample, applied between two steps.
  struct Command {
    int64_t id;
    int32_t index;
  };

  Engine engine;
  // Held by each step and by add() from its first add_request to its sinks' registration, so that
  // no step sees a request add() may still drop, nor an update of one whose sink is not there.
  std::mutex step_gate;
  std::mutex mutex;  // over everything below; whoever holds it does not then take step_gate
  std::condition_variable wake;  // a request, a command or the stop arrived
  std::condition_variable idle;  // sinks became empty
  std::map<int64_t, std::shared_ptr<Sink>> sinks;
  int64_t delivering = 0;  // dispatches feeding sinks outside the lock: drain() waits for them
  int64_t adding = 0;      // add() calls waiting for or holding step_gate: the next step waits for them
  std::vector<Command> commands;
  bool stopping = false;
  std::thread thread;

  Loop(const std::string& model_dir, const EngineOptions& options) : engine(model_dir, options) {}

  // Queues prompts[i] with params[i], its updates going to sinks[i]: all or none.
  std::vector<int64_t> add(const std::vector<Prompt>& prompts, const std::vector<SamplingParams>& params,
                           std::vector<std::shared_ptr<Sink>> new_sinks) {
    if (params.size() != prompts.size())
      throw InvalidInputError(std::to_string(params.size()) + " sampling params for " + std::to_string(prompts.size()) +
                              " prompts");
    // A mutex is not fair: the engine thread, retaking step_gate right after each step, could
    // keep an add() out for many steps. So steps wait while adds are pending.
    {
      const std::lock_guard<std::mutex> lock(mutex);
      ++adding;
    }
    struct Added {
      Loop& loop;
      ~Added() {
        {
          const std::lock_guard<std::mutex> lock(loop.mutex);
          --loop.adding;
        }
        loop.wake.notify_all();
      }
    } added{*this};
    const std::lock_guard<std::mutex> gate(step_gate);
    std::vector<int64_t> ids;
    try {
      for (size_t i = 0; i < prompts.size(); ++i) ids.push_back(engine.add_request(prompts[i], params[i]));
    } catch (...) {
      for (int64_t id : ids) engine.abort(id);
      throw;
    }
    const std::lock_guard<std::mutex> lock(mutex);
    for (size_t i = 0; i < ids.size(); ++i) {
      new_sinks[i]->live.assign(size_t(params[i].n), true);
      sinks[ids[i]] = std::move(new_sinks[i]);
    }
    wake.notify_one();
    return ids;
  }

  void command(int64_t id, int32_t index) {
    const std::lock_guard<std::mutex> lock(mutex);
    commands.push_back({id, index});
    wake.notify_one();
  }

  // Hands updates to their sinks, in order. Liveness is kept under the lock; streams and
  // callbacks are fed outside it (a callback may call add_request).
  void dispatch(std::vector<RequestUpdate> updates) {
    std::vector<std::pair<std::shared_ptr<Sink>, bool>> to;  // per update: its sink, and whether it is the last
    {
      const std::lock_guard<std::mutex> lock(mutex);
      for (const RequestUpdate& u : updates) {
        const auto it = sinks.find(u.request_id);
        Sink* s = it == sinks.end() ? nullptr : it->second.get();
        if (!s || u.index < 0 || size_t(u.index) >= s->live.size() || !s->live[u.index]) {
          to.emplace_back(nullptr, false);  // a request ended already (abort, finish_sample)
          continue;
        }
        bool last = false;
        if (u.finished()) {
          s->live[u.index] = false;
          last = std::none_of(s->live.begin(), s->live.end(), [](bool live) { return live; });
        }
        to.emplace_back(it->second, last);
        if (last) sinks.erase(it);
      }
      ++delivering;
    }
    for (size_t i = 0; i < updates.size(); ++i)
      if (to[i].first) deliver(*to[i].first, std::move(updates[i]), to[i].second);
    const std::lock_guard<std::mutex> lock(mutex);
    if (--delivering == 0 && sinks.empty()) idle.notify_all();
  }

  void deliver(Sink& s, RequestUpdate u, bool last) {
    if (s.callback) {
      const int64_t id = u.request_id;
      try {
        s.callback(u);
      } catch (...) {
        if (!last) command(id, -1);  // a callback that throws aborts its request
      }
      return;
    }
    {
      const std::lock_guard<std::mutex> lock(s.stream->mutex);
      s.stream->updates.push_back(std::move(u));
      s.stream->ended = last;
    }
    s.stream->arrived.notify_all();
  }

  static RequestUpdate final_update(int64_t id, int32_t index, FinishReason why, const std::string& error = "") {
    RequestUpdate u;
    u.request_id = id;
    u.index = index;
    u.finish_reason = why;
    u.error = error;
    return u;
  }

  // A last update for each sample of each of `ids` still served (dispatch drops the ended ones).
  std::vector<RequestUpdate> end_requests(const std::vector<int64_t>& ids, FinishReason why) {
    std::vector<RequestUpdate> out;
    const std::lock_guard<std::mutex> lock(mutex);
    for (int64_t id : ids) {
      const auto it = sinks.find(id);
      if (it == sinks.end()) continue;
      for (size_t i = 0; i < it->second->live.size(); ++i) out.push_back(final_update(id, int32_t(i), why));
    }
    return out;
  }

  void apply(const std::vector<Command>& cmds) {
    std::vector<RequestUpdate> out;
    for (const Command& c : cmds) {
      if (c.index < 0) {
        engine.abort(c.id);
        for (RequestUpdate& u : end_requests({c.id}, FinishReason::Abort)) out.push_back(std::move(u));
      } else {
        engine.finish_sample(c.id, c.index);
        out.push_back(final_update(c.id, c.index, FinishReason::Stop));
      }
    }
    dispatch(std::move(out));
  }

  std::vector<int64_t> live_ids() {
    const std::lock_guard<std::mutex> lock(mutex);
    std::vector<int64_t> ids;
    for (const auto& [id, sink] : sinks) ids.push_back(id);
    return ids;
  }

  // A step threw: every request in flight ends. Streams throw its exception; callbacks get
  // FinishReason::Error with its message.
  void fail(const std::exception_ptr& error) {
    std::string message = "unknown error";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      message = e.what();
    } catch (...) {
    }
    const std::vector<int64_t> ids = live_ids();
    for (int64_t id : ids) engine.abort(id);
    std::vector<RequestUpdate> out;
    std::vector<std::shared_ptr<RequestStream::State>> streams;
    {
      const std::lock_guard<std::mutex> lock(mutex);
      for (auto it = sinks.begin(); it != sinks.end();) {
        if (!it->second->stream) {
          for (size_t i = 0; i < it->second->live.size(); ++i)
            if (it->second->live[i]) out.push_back(final_update(it->first, int32_t(i), FinishReason::Error, message));
          ++it;
          continue;
        }
        streams.push_back(it->second->stream);
        it = sinks.erase(it);
      }
    }
    for (const auto& st : streams) {
      {
        const std::lock_guard<std::mutex> lock(st->mutex);
        st->error = error;
        st->ended = true;
      }
      st->arrived.notify_all();
    }
    dispatch(std::move(out));
  }

  void run() {
    for (;;) {
      std::vector<Command> cmds;
      {
        std::unique_lock<std::mutex> lock(mutex);
        wake.wait(lock, [&] { return stopping || !commands.empty() || !sinks.empty(); });
        if (stopping) break;
        cmds.swap(commands);
      }
      if (!cmds.empty()) apply(cmds);
      {
        std::unique_lock<std::mutex> lock(mutex);
        if (sinks.empty()) continue;
        wake.wait(lock, [&] { return stopping || adding == 0; });  // requests being added go first
        if (stopping) continue;
      }
      std::vector<RequestUpdate> updates;
      try {
        const std::lock_guard<std::mutex> gate(step_gate);
        updates = engine.step();
      } catch (...) {
        fail(std::current_exception());
        continue;
      }
      dispatch(std::move(updates));
    }
    const std::vector<int64_t> ids = live_ids();
    for (int64_t id : ids) engine.abort(id);
    dispatch(end_requests(ids, FinishReason::Abort));
  }
};

AsyncEngine::AsyncEngine(const std::string& model_dir, const EngineOptions& options)
    : loop_(std::make_unique<Loop>(model_dir, options)) {
  loop_->thread = std::thread([loop = loop_.get()] { loop->run(); });
}

AsyncEngine::~AsyncEngine() {
  {
    const std::lock_guard<std::mutex> lock(loop_->mutex);
    loop_->stopping = true;
  }
  loop_->wake.notify_all();
  loop_->thread.join();
}

std::vector<RequestStream> AsyncEngine::add_requests(const std::vector<Prompt>& prompts,
                                                     const std::vector<SamplingParams>& params) {
  std::vector<std::shared_ptr<Loop::Sink>> sinks(prompts.size());
  std::vector<std::shared_ptr<RequestStream::State>> states(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    sinks[i] = std::make_shared<Loop::Sink>();
    sinks[i]->stream = states[i] = std::make_shared<RequestStream::State>();
  }
  const std::vector<int64_t> ids = loop_->add(prompts, params, std::move(sinks));
  std::vector<RequestStream> streams;
  for (size_t i = 0; i < ids.size(); ++i) {
    states[i]->id = ids[i];
    streams.emplace_back(std::move(states[i]));
  }
  return streams;
}

RequestStream AsyncEngine::add_request(const Prompt& prompt, const SamplingParams& params) {
  return add_requests({prompt}, {params}).front();
}

int64_t AsyncEngine::add_request(const Prompt& prompt, const SamplingParams& params,
                                 Callback on_update) {
  if (!on_update) throw InvalidInputError("add_request: on_update is empty");
  auto sink = std::make_shared<Loop::Sink>();
  sink->callback = std::move(on_update);
  return loop_->add({prompt}, {params}, {std::move(sink)}).front();
}

void AsyncEngine::abort(int64_t request_id) { loop_->command(request_id, -1); }

void AsyncEngine::finish_sample(int64_t request_id, int32_t index) {
  if (index >= 0) loop_->command(request_id, index);
}

void AsyncEngine::drain() {
  std::unique_lock<std::mutex> lock(loop_->mutex);
  loop_->idle.wait(lock, [&] { return loop_->sinks.empty() && loop_->delivering == 0; });
}

Engine& AsyncEngine::engine() { return loop_->engine; }

EngineStats AsyncEngine::stats() const { return loop_->engine.stats(); }

}  // namespace corral
