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
// `rows` rows of `width` bytes, rows dpitch / spitch bytes apart; either side host or device
// (unified addressing tells which).
void copy_2d_async(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t rows, void* stream);
void memset_async(void* dst, int value, size_t bytes, void* stream);
// Page-locked host memory: a GPU copies from it asynchronously (from pageable memory the driver
// stages the copy and may wait for the stream first).
void* malloc_host(size_t bytes);
void free_host(void* ptr) noexcept;
// Events (no timing) marking the point a stream has reached: record_event at the work queued so
// far, wait_event until it is done (the host waits; errors of that work are reported).
void* create_event();
void destroy_event(void* event) noexcept;
void record_event(void* event, void* stream);
void wait_event(void* event);
// The current device's free and total memory in bytes.
void memory_info(size_t* free, size_t* total);
void* create_stream();
void destroy_stream(void* stream) noexcept;
void synchronize(void* stream);

// CUDA graphs: the work queued on `stream` between begin_capture and end_capture (thread-local
// mode: other threads' CUDA calls go on as usual) is recorded, not run; end_capture returns it
// instantiated (a cudaGraphExec_t), or throws DeviceError when the capture failed (it always
// ends the capture, so the stream runs work again).
void begin_capture(void* stream);
void* end_capture(void* stream);
void launch_graph(void* graph, void* stream);
void destroy_graph(void* graph) noexcept;

}  // namespace corral::cuda
