// The runtime's device switch: memory, copies and streams on the CPU, or through csrc/cuda.
#include "corral/device.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "corral/error.h"
#if CORRAL_WITH_CUDA
#include "cuda/runtime.h"
#endif

namespace corral {

namespace {

#if !CORRAL_WITH_CUDA
[[noreturn]] void no_backend() { throw DeviceError("this build of Corral has no CUDA backend"); }
#endif

void use_cuda_device(Device d) {
#if CORRAL_WITH_CUDA
  std::string why;
  const int n = cuda::device_count(&why);
  if (d.index < 0 || d.index >= n)
    throw DeviceError("CUDA device " + std::to_string(d.index) + " is not available (" +
                      (n == 0 ? why : std::to_string(n) + " device(s)") + ")");
  cuda::set_device(d.index);
#else
  (void)d;
  no_backend();
#endif
}

}  // namespace

void use_device(Device d) {
  if (d.type == DeviceType::CUDA) use_cuda_device(d);
}

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device{};
  if (name == "cuda") return Device{DeviceType::CUDA, 0};
  const std::string prefix = "cuda:";
  if (name.compare(0, prefix.size(), prefix) == 0 && name.size() > prefix.size() && name.size() <= prefix.size() + 4 &&
      name.find_first_not_of("0123456789", prefix.size()) == std::string::npos)
    return Device{DeviceType::CUDA, std::stoi(name.substr(prefix.size()))};
  throw InvalidInputError("device='" + name + "' is not 'cpu', 'cuda' or 'cuda:N'");
}

std::string device_name(Device d) {
  return d.type == DeviceType::CPU ? "cpu" : "cuda:" + std::to_string(d.index);
}

MemoryInfo device_memory(Device d) {
  if (d.type == DeviceType::CPU) throw DeviceError("device_memory: the CPU's memory is not a device's");
  use_cuda_device(d);
  MemoryInfo m;
#if CORRAL_WITH_CUDA
  cuda::memory_info(&m.free, &m.total);
#endif
  return m;
}

bool cuda_backend_built() { return CORRAL_WITH_CUDA != 0; }

int cuda_device_count() {
#if CORRAL_WITH_CUDA
  return cuda::device_count(nullptr);
#else
  return 0;
#endif
}

std::string cuda_status() {
#if CORRAL_WITH_CUDA
  std::string why;
  const int n = cuda::device_count(&why);
  return n > 0 ? std::to_string(n) + " device(s)" : why;
#else
  return "not built";
#endif
}

DeviceBuffer::DeviceBuffer(Device device, size_t bytes) : device_(device), size_(bytes) {
  if (device.type == DeviceType::CPU) {
    data_ = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!data_ && bytes) throw std::bad_alloc();
    return;
  }
  use_cuda_device(device);
#if CORRAL_WITH_CUDA
  data_ = cuda::malloc_device(bytes);
#endif
}

DeviceBuffer::~DeviceBuffer() { reset(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : device_(o.device_), data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    device_ = o.device_;
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void DeviceBuffer::reset() noexcept {
  if (!data_) return;
  if (device_.type == DeviceType::CPU) std::free(data_);
#if CORRAL_WITH_CUDA
  else cuda::free_device(data_);
#endif
  data_ = nullptr;
}

StreamOwner::StreamOwner(Device device) {
  stream_.device = device;
  if (device.type == DeviceType::CUDA) {
    use_cuda_device(device);
#if CORRAL_WITH_CUDA
    stream_.handle = cuda::create_stream();
#endif
  }
}

StreamOwner::~StreamOwner() {
#if CORRAL_WITH_CUDA
  if (stream_.handle) cuda::destroy_stream(stream_.handle);
#endif
}

void StreamOwner::synchronize() const { corral::synchronize(stream_); }

void synchronize(const Stream& stream) {
  if (stream.device.type == DeviceType::CPU) return;
#if CORRAL_WITH_CUDA
  cuda::synchronize(stream.handle);
#endif
}

CudaGraph::~CudaGraph() {
#if CORRAL_WITH_CUDA
  if (graph_) cuda::destroy_graph(graph_);
#endif
}

CudaGraph::CudaGraph(CudaGraph&& other) noexcept : graph_(std::exchange(other.graph_, nullptr)) {}

CudaGraph& CudaGraph::operator=(CudaGraph&& other) noexcept {
  if (this != &other) {
    CudaGraph old(std::move(*this));
    graph_ = std::exchange(other.graph_, nullptr);
  }
  return *this;
}

CudaGraph CudaGraph::capture(const Stream& stream, const std::function<void()>& record) {
  if (stream.device.type != DeviceType::CUDA) throw DeviceError("CUDA graphs need a GPU stream");
#if CORRAL_WITH_CUDA
  cuda::begin_capture(stream.handle);
  try {
    record();
  } catch (...) {
    try {
      cuda::destroy_graph(cuda::end_capture(stream.handle));
    } catch (const DeviceError&) {  // the capture was invalid anyway: record's error is the one to see
    }
    throw;
  }
  CudaGraph g;
  g.graph_ = cuda::end_capture(stream.handle);
  return g;
#else
  (void)record;
  no_backend();
#endif
}

void CudaGraph::launch(const Stream& stream) const {
#if CORRAL_WITH_CUDA
  cuda::launch_graph(graph_, stream.handle);
#else
  (void)stream;
  no_backend();
#endif
}

HostStaging::~HostStaging() { reset(); }

HostStaging::HostStaging(HostStaging&& o) noexcept
    : host_(std::exchange(o.host_, nullptr)), size_(std::exchange(o.size_, 0)), copied_(std::exchange(o.copied_, nullptr)) {}

HostStaging& HostStaging::operator=(HostStaging&& o) noexcept {
  if (this != &o) {
    reset();
    host_ = std::exchange(o.host_, nullptr);
    size_ = std::exchange(o.size_, 0);
    copied_ = std::exchange(o.copied_, nullptr);
  }
  return *this;
}

void HostStaging::reset() noexcept {
#if CORRAL_WITH_CUDA
  if (copied_) {
    try {
      cuda::wait_event(copied_);  // a copy may still read host_
    } catch (const DeviceError&) {  // the device failed: nothing reads host_ any more
    }
    cuda::destroy_event(copied_);
  }
  if (host_) cuda::free_host(host_);
#endif
  host_ = copied_ = nullptr;
  size_ = 0;
}

void HostStaging::upload(void* dst, const void* src, size_t bytes, const Stream& stream) {
  if (stream.device.type != DeviceType::CUDA) throw DeviceError("HostStaging uploads to a GPU stream");
#if CORRAL_WITH_CUDA
  if (bytes == 0) return;
  if (copied_) cuda::wait_event(copied_);  // the previous copy from host_ is done
  else copied_ = cuda::create_event();
  if (bytes > size_) {
    if (host_) cuda::free_host(std::exchange(host_, nullptr));
    size_t size = 4096;
    while (size < bytes) size *= 2;
    host_ = cuda::malloc_host(size);
    size_ = size;
  }
  std::memcpy(host_, src, bytes);
  copy(dst, host_, bytes, stream);
  cuda::record_event(copied_, stream.handle);
#else
  (void)dst, (void)src, (void)bytes;
  no_backend();
#endif
}

namespace {
void check_copy(const DeviceBuffer& b, size_t bytes) {
  if (bytes > b.size())
    throw InvalidInputError("copy of " + std::to_string(bytes) + " bytes overflows a buffer of " +
                            std::to_string(b.size()));
}
}  // namespace

void copy_to_device(DeviceBuffer& dst, const void* src, size_t bytes, const Stream& stream) {
  check_copy(dst, bytes);
  copy(dst.data(), src, bytes, dst.device().type == DeviceType::CPU ? Stream{} : stream);
}

void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
               const Stream& stream) {
  if (stream.device.type == DeviceType::CPU) {
    for (size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
    return;
  }
#if CORRAL_WITH_CUDA
  cuda::copy_2d_async(dst, dst_pitch, src, src_pitch, width, rows, stream.handle);
#else
  no_backend();
#endif
}

void fill_zero(void* dst, size_t bytes, const Stream& stream) {
  if (stream.device.type == DeviceType::CPU) {
    std::memset(dst, 0, bytes);
    return;
  }
#if CORRAL_WITH_CUDA
  cuda::memset_async(dst, 0, bytes, stream.handle);
#else
  no_backend();
#endif
}

void copy_to_host(void* dst, const DeviceBuffer& src, size_t bytes, const Stream& stream) {
  check_copy(src, bytes);
  copy(dst, src.data(), bytes, src.device().type == DeviceType::CPU ? Stream{} : stream);
}

}  // namespace corral
