#include "runtime.h"

#include <cuda_runtime_api.h>

#include "check.h"

namespace corral::cuda {

int device_count(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    if (why) *why = cudaGetErrorString(err);
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device found";
  return n;
}

void set_device(int index) { CORRAL_CUDA_CHECK(cudaSetDevice(index)); }

void* malloc_device(size_t bytes) {
  void* p = nullptr;
  CORRAL_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

void free_device(void* ptr) noexcept { cudaFree(ptr); }

void copy_2d_async(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t rows, void* stream) {
  if (rows == 0 || width == 0) return;
  if (rows == 1) {  // pitches are limited (cudaDevAttrMaxPitch, about 2 GiB); plain copies are not
    CORRAL_CUDA_CHECK(cudaMemcpyAsync(dst, src, width, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)));
    return;
  }
  CORRAL_CUDA_CHECK(
      cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)));
}

void memset_async(void* dst, int value, size_t bytes, void* stream) {
  CORRAL_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, static_cast<cudaStream_t>(stream)));
}

void* malloc_host(size_t bytes) {
  void* p = nullptr;
  CORRAL_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
  return p;
}

void free_host(void* ptr) noexcept { cudaFreeHost(ptr); }

void* create_event() {
  cudaEvent_t e = nullptr;
  CORRAL_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

void destroy_event(void* event) noexcept { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

void record_event(void* event, void* stream) {
  CORRAL_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
}

void wait_event(void* event) { CORRAL_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event))); }

void memory_info(size_t* free, size_t* total) { CORRAL_CUDA_CHECK(cudaMemGetInfo(free, total)); }

void* create_stream() {
  cudaStream_t s = nullptr;
  CORRAL_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

void destroy_stream(void* stream) noexcept { cudaStreamDestroy(static_cast<cudaStream_t>(stream)); }

void synchronize(void* stream) {
  CORRAL_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

void begin_capture(void* stream) {
  CORRAL_CUDA_CHECK(cudaStreamBeginCapture(static_cast<cudaStream_t>(stream), cudaStreamCaptureModeThreadLocal));
}

void* end_capture(void* stream) {
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(static_cast<cudaStream_t>(stream), &graph);
  if (ended != cudaSuccess) {
    cudaGetLastError();  // an invalidated capture leaves its error behind; it is reported here
    if (graph) cudaGraphDestroy(graph);
    throw_error(ended, "cudaStreamEndCapture", __FILE__, __LINE__);
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  cudaGraphDestroy(graph);  // the executable graph keeps what it needs
  if (made != cudaSuccess) throw_error(made, "cudaGraphInstantiateWithFlags", __FILE__, __LINE__);
  return exec;
}

void launch_graph(void* graph, void* stream) {
  CORRAL_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph), static_cast<cudaStream_t>(stream)));
}

void destroy_graph(void* graph) noexcept { cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph)); }

}  // namespace corral::cuda
