// CUDA device plumbing: device discovery, memory, copies, streams. Used by the runtime's device
// layer (src/device.cpp); only compiled when the CUDA backend is built.
#pragma once

#include <cstddef>
#include <string>

namespace corral::cuda {

// Number of usable devices; 0 (never an exception) when there is no driver or no GPU, with the
// reason in *why.
int device_count(std::string* why);
void set_device(int index);
void* malloc_device(size_t bytes);
void free_device(void* ptr) noexcept;
enum class CopyKind { HostToDevice, DeviceToHost, DeviceToDevice };
void copy_async(void* dst, const void* src, size_t bytes, CopyKind kind, void* stream);
void* create_stream();
void destroy_stream(void* stream) noexcept;
void synchronize(void* stream);

}  // namespace corral::cuda
