// Devices, device memory and streams. The CPU always works; CUDA calls need a build with the
// CUDA backend and a GPU, and otherwise fail with DeviceError (never a crash).
#pragma once

#include <cstddef>
#include <string>

#include "corral/kernels/types.h"

namespace corral {

bool cuda_backend_built();
// Usable CUDA devices: 0 without the backend, a driver or a GPU.
int cuda_device_count();
// One line on CUDA's state, e.g. "1 device(s)", "not built", or the driver's error.
std::string cuda_status();

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

}  // namespace corral
