// Devices, device memory and streams. The CPU always works; CUDA calls need a build with the
// CUDA backend and a GPU, and otherwise fail with DeviceError (never a crash).
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "corral/kernels/types.h"

namespace corral {

bool cuda_backend_built();
// Usable CUDA devices: 0 without the backend, a driver or a GPU.
int cuda_device_count();
// One line on CUDA's state, e.g. "1 device(s)", "not built", or the driver's error.
std::string cuda_status();

// Free and total bytes of a device's memory (the CPU: MemAvailable and MemTotal are not asked
// here; DeviceError for it).
struct MemoryInfo {
  size_t free = 0;
  size_t total = 0;
};
MemoryInfo device_memory(Device device);

// Makes `device` the calling thread's current CUDA device (DeviceError if it cannot be used);
// nothing for the CPU. CUDA's current device is per thread: whoever runs work on a device calls it.
void use_device(Device device);

// Parses "cpu", "cuda" or "cuda:N" (InvalidInputError otherwise).
Device parse_device(const std::string& name);
std::string device_name(Device device);

// A block of memory on a device, freed when destroyed.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Device device, size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  Device device() const { return device_; }

 private:
  void reset() noexcept;
  Device device_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A stream of work on a device (the CPU runs work at once, so its stream is a no-op).
class StreamOwner {
 public:
  explicit StreamOwner(Device device);
  ~StreamOwner();
  StreamOwner(const StreamOwner&) = delete;
  StreamOwner& operator=(const StreamOwner&) = delete;
  const Stream& get() const { return stream_; }
  void synchronize() const;

 private:
  Stream stream_;
};

// Copies between host memory and a device buffer, ordered on `stream`.
void copy_to_device(DeviceBuffer& dst, const void* src, size_t bytes, const Stream& stream);
void copy_to_host(void* dst, const DeviceBuffer& src, size_t bytes, const Stream& stream);
// `rows` rows of `width` bytes, dst_pitch / src_pitch bytes apart, ordered on `stream`: host
// memory only on a CPU stream; on a CUDA stream either side may be host or device memory. A copy
// to pageable host memory is complete when the call returns; one from it may reuse src at once.
void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
               const Stream& stream);
// Sets `bytes` bytes at dst (memory of the stream's device) to zero, ordered on `stream`.
void fill_zero(void* dst, size_t bytes, const Stream& stream);
inline void copy(void* dst, const void* src, size_t bytes, const Stream& stream) {
  copy_rows(dst, bytes, src, bytes, bytes, 1, stream);
}

// Page-locked host memory that uploads to a GPU pass through: a copy from it runs asynchronously,
// while one from pageable memory may make the driver wait for the stream (each step's uploads of
// token ids, positions, slots and sampling settings would wait for the work queued before them).
// Before it is written again it waits for its previous copy (an event, long done by then: a step
// ends by waiting for its sampled tokens). Allocated on first use, grown by powers of two.
class HostStaging {
 public:
  HostStaging() = default;
  ~HostStaging();
  HostStaging(HostStaging&& other) noexcept;
  HostStaging& operator=(HostStaging&& other) noexcept;
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;

  // dst (memory of the GPU stream's device) = `bytes` bytes at src, ordered on `stream`; src may be
  // reused as soon as this returns.
  void upload(void* dst, const void* src, size_t bytes, const Stream& stream);

 private:
  void reset() noexcept;
  void* host_ = nullptr;
  size_t size_ = 0;
  void* copied_ = nullptr;  // the event recorded after the last copy from host_
};

// An array in one device's memory that grows on demand (its contents are not kept when it does):
// a forward pass's activations, the same code on the CPU and on a GPU.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(Device device = {}) : device_(device) {}
  // At least n elements; returns the data.
  T* reserve(size_t n) {
    if (n * sizeof(T) > buffer_.size()) buffer_ = DeviceBuffer(device_, std::max<size_t>(n, 1) * sizeof(T));
    return data();
  }
  T* data() const { return static_cast<T*>(buffer_.data()); }
  // Grows to hold `values` and copies them in, ordered on `stream` (on a GPU through page-locked
  // memory; values may be reused at once); returns the data.
  T* assign(const T* values, size_t n, const Stream& stream) {
    reserve(n);
    if (n == 0) return data();
    if (stream.device.type == DeviceType::CPU) copy(data(), values, n * sizeof(T), stream);
    else staging_.upload(data(), values, n * sizeof(T), stream);
    return data();
  }

 private:
  Device device_;
  DeviceBuffer buffer_;
  HostStaging staging_;
};

// Host values as kernels on `stream` read them: v.data() itself on the CPU, else a copy in
// `staging` (device memory, valid until staging's next use).
template <class T>
const T* on_device(DeviceArray<T>& staging, const std::vector<T>& v, const Stream& stream) {
  if (stream.device.type == DeviceType::CPU) return v.data();
  return staging.assign(v.data(), v.size(), stream);
}

// Waits for the work queued on `stream` (nothing to wait for on the CPU).
void synchronize(const Stream& stream);

// A CUDA graph: the work a function queues on a GPU stream, recorded once and replayed as one
// launch (the same kernels on the same addresses). Empty until captured; destroyed with it.
class CudaGraph {
 public:
  CudaGraph() = default;
  ~CudaGraph();
  CudaGraph(CudaGraph&& other) noexcept;
  CudaGraph& operator=(CudaGraph&& other) noexcept;
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  // Records what `record` queues on `stream` (a GPU's) without running it; the calling thread's
  // other CUDA calls must not wait on the stream meanwhile. DeviceError when the capture fails;
  // an exception of `record` ends the capture and passes on.
  static CudaGraph capture(const Stream& stream, const std::function<void()>& record);
  void launch(const Stream& stream) const;
  explicit operator bool() const { return graph_ != nullptr; }

 private:
  void* graph_ = nullptr;
};

}  // namespace corral
