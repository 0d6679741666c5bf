#include "tensorstream/engine/engine.hpp"

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <map>
#include <mutex>
#include <system_error>
#include <thread>

#include <set>

#include "tensorstream/block_naming.hpp"
#include "tensorstream/checksum.hpp"
#include "tensorstream/detail/file.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/io/block_window.hpp"
#include "tensorstream/safetensors.hpp"
#include "tensorstream/shim/cufile.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream::engine {
namespace {

using Clock = std::chrono::steady_clock;

constexpr unsigned kFillWorkers = 2;

std::uint64_t align_4k(std::uint64_t n) { return (n + 4095) / 4096 * 4096; }

double seconds_since(std::int64_t start_ns) {
  return static_cast<double>(now_ns() - start_ns) / 1e9;
}

// Parses "cpu", "cuda", "cuda:N"; returns -1 for the CPU.
int parse_device(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0) {
    const auto rest = device.substr(5);
    if (!rest.empty() && std::all_of(rest.begin(), rest.end(), ::isdigit) && rest.size() < 6) {
      return std::stoi(rest);
    }
  }
  throw std::invalid_argument(
      detail::concat("device '", device, "' is not 'cpu', 'cuda' or 'cuda:N'"));
}

// MemAvailable of /proc/meminfo: what the kernel estimates can be allocated without
// swapping, page cache that can be dropped included.
std::optional<std::uint64_t> mem_available_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib) {
    std::getline(meminfo, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

// Pinned host memory for the RAM tier and staging when the device is a GPU, so that every
// host-to-device copy is a DMA from page-locked memory.
class PinnedAllocator final : public cache::HostAllocator {
 public:
  explicit PinnedAllocator(const cuda::Device& device) : device_(device) {}
  void* allocate(std::size_t bytes) override {
    cuda::PinnedHostBuffer buffer(device_, bytes);
    void* p = buffer.data();
    std::lock_guard lock(mutex_);
    buffers_.emplace(p, std::move(buffer));
    return p;
  }
  void deallocate(void* pointer, std::size_t) noexcept override {
    std::lock_guard lock(mutex_);
    buffers_.erase(pointer);
  }

 private:
  const cuda::Device& device_;
  std::mutex mutex_;
  std::map<void*, cuda::PinnedHostBuffer> buffers_;
};

// A fill's failure, kept as data: each waiter gets a fresh exception of the same type, so no
// exception object is ever shared between threads.
struct FillError {
  enum class Kind { kError, kIo, kFormat, kChecksum, kCuda, kArgument } kind = Kind::kError;
  std::string message;
  int code = 0;

  static FillError capture() {
    try {
      throw;
    } catch (const ChecksumError& e) {
      return {Kind::kChecksum, e.what(), 0};
    } catch (const FormatError& e) {
      return {Kind::kFormat, e.what(), 0};
    } catch (const IoError& e) {
      return {Kind::kIo, e.what(), e.code()};
    } catch (const CudaError& e) {
      return {Kind::kCuda, e.what(), 0};
    } catch (const std::invalid_argument& e) {
      return {Kind::kArgument, e.what(), 0};
    } catch (const std::exception& e) {
      return {Kind::kError, e.what(), 0};
    } catch (...) {
      return {Kind::kError, "unknown error", 0};
    }
  }

  [[noreturn]] void raise() const {
    switch (kind) {
      case Kind::kChecksum:
        throw ChecksumError(message);
      case Kind::kFormat:
        throw FormatError(message);
      case Kind::kIo:
        throw IoError(message, code);
      case Kind::kCuda:
        throw CudaError(message);
      case Kind::kArgument:
        throw std::invalid_argument(message);
      case Kind::kError:
        break;
    }
    throw Error(message);
  }
};

// ---- layout: what the engine streams, independent of the source's format ----------------

// One read of a block: `length` bytes at `file_offset` of files[file], landing at
// `buffer_offset` + skip of the block's buffer (buffer_offset is 4096-aligned).
struct Extent {
  std::uint32_t file = 0;
  std::uint64_t file_offset = 0;
  std::uint64_t length = 0;
  std::uint64_t buffer_offset = 0;        // start of the aligned read region
  std::uint64_t skip = 0;                 // where the bytes start inside the region
  std::string label;                      // tensor(s) read, for messages; empty for a store block
  std::optional<std::uint64_t> checksum;  // stored checksum (store), else none
};

struct BlockLayout {
  std::string name;
  std::uint64_t size = 0;  // bytes in memory (view size, slot size)
  std::vector<Extent> extents;
  std::vector<TensorPlacement> tensors;
};

struct Layout {
  std::filesystem::path source;  // for messages
  std::string kind;              // "store", "checkpoint"
  std::vector<std::filesystem::path> files;
  std::vector<BlockLayout> blocks;
};

Layout layout_of_store(const std::filesystem::path& path) {
  const auto store = Store::open(path);
  Layout layout;
  layout.source = store.path();
  layout.kind = "store";
  layout.files.push_back(store.path());
  for (std::size_t i = 0; i < store.blocks().size(); ++i) {
    const auto& info = store.blocks()[i];
    BlockLayout block;
    block.name = info.name;
    block.size = info.raw_size;
    block.extents.push_back(Extent{0, info.offset, info.stored_size, 0, 0, {}, info.checksum});
    for (const auto& t : store.block_tensors(i)) {
      block.tensors.push_back(
          TensorPlacement{t.name, t.dtype, t.shape, t.offset_in_block, t.nbytes});
    }
    layout.blocks.push_back(std::move(block));
  }
  return layout;
}

Layout layout_of_safetensors(const std::filesystem::path& path, const TensorGroups& given) {
  const auto checkpoint = SafetensorsCheckpoint::open(path);
  Layout layout;
  layout.source = path;
  layout.kind = "checkpoint";
  for (const auto& f : checkpoint.files()) layout.files.push_back(f.path());
  TS_EXPECT(!checkpoint.entries().empty(), FormatError, "safetensors checkpoint '", path.string(),
            "' holds no tensor");
  TensorGroups groups = given;
  if (groups.empty()) {
    std::vector<std::string> names;
    for (const auto& e : checkpoint.entries()) names.push_back(e.tensor->name);
    for (auto& g : group_into_blocks(names)) groups.emplace_back(g.name, std::move(g.tensors));
  }
  std::set<std::string, std::less<>> block_names;
  std::set<std::string, std::less<>> seen;
  for (const auto& [name, tensor_names] : groups) {
    TS_EXPECT(!tensor_names.empty(), std::invalid_argument, "block '", name, "' lists no tensor");
    TS_EXPECT(block_names.insert(name).second, std::invalid_argument, "block '", name,
              "' is given twice");
    std::vector<const SafetensorsCheckpoint::Entry*> entries;
    for (const auto& t : tensor_names) {
      const auto* entry = checkpoint.find(t);
      TS_EXPECT(entry != nullptr, std::invalid_argument, "block '", name, "' lists tensor '", t,
                "', which checkpoint '", path.string(), "' does not hold");
      TS_EXPECT(seen.insert(t).second, std::invalid_argument, "tensor '", t,
                "' is listed in two blocks (the second: '", name, "')");
      entries.push_back(entry);
    }
    // Read order: file, then offset; tensors contiguous in a file share one extent.
    std::vector<std::size_t> order(entries.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return std::pair(entries[a]->file, entries[a]->tensor->offset) <
             std::pair(entries[b]->file, entries[b]->tensor->offset);
    });
    BlockLayout block;
    block.name = name;
    std::vector<std::uint64_t> offset_of(entries.size(), 0);
    std::vector<std::size_t> run;  // indices into entries of the current extent
    auto flush = [&] {
      if (run.empty()) return;
      const auto* first = entries[run.front()];
      const auto* last = entries[run.back()];
      Extent extent;
      extent.file = static_cast<std::uint32_t>(first->file);
      extent.file_offset = first->tensor->offset;
      extent.length = last->tensor->offset + last->tensor->nbytes - extent.file_offset;
      const auto read = io::plan_read(extent.file_offset, extent.length);
      extent.buffer_offset = block.size;  // a multiple of 4096: the sum of aligned sizes
      extent.skip = read.skip;
      extent.label = first->tensor->name;
      if (run.size() > 1) extent.label += detail::concat(" .. ", last->tensor->name);
      for (const auto i : run) {
        offset_of[i] =
            extent.buffer_offset + extent.skip + entries[i]->tensor->offset - extent.file_offset;
      }
      block.size += read.aligned_size;
      if (extent.length > 0) block.extents.push_back(std::move(extent));
      run.clear();
    };
    for (const auto i : order) {
      if (!run.empty()) {
        const auto* prev = entries[run.back()];
        const bool contiguous =
            prev->file == entries[i]->file &&
            prev->tensor->offset + prev->tensor->nbytes == entries[i]->tensor->offset;
        if (!contiguous) flush();
      }
      run.push_back(i);
    }
    flush();
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const auto& t = *entries[i]->tensor;
      block.tensors.push_back(TensorPlacement{t.name, t.dtype, t.shape, offset_of[i], t.nbytes});
    }
    layout.blocks.push_back(std::move(block));
  }
  return layout;
}

// How a CPU engine reads its blocks: in place through the page cache, or with a backend.
struct ReadPath {
  bool in_place = false;
  std::string note;  // why (for kAuto), or why kMmap could not read in place
};

ReadPath choose_cpu_read_path(const EngineOptions& options, const Layout& layout) {
  using io::BackendType;
  if (options.backend != BackendType::kAuto && options.backend != BackendType::kMmap) return {};
  const auto unsupported = io::block_windows_unsupported_reason();
  if (!unsupported.empty()) return {false, unsupported};
  if (options.ram_cache_bytes > 0) {
    // The page cache would duplicate the tier: read into the tier instead.
    return {false, "a RAM tier is configured: blocks are copied into it"};
  }
  if (options.backend == BackendType::kMmap) return {true, ""};
  if (options.io.fault_injector) return {false, "auto: fault injection needs a backend"};
  std::uint64_t source_bytes = 0;
  for (const auto& b : layout.blocks) source_bytes += b.size;
  const auto available = mem_available_bytes();
  if (!available) return {false, "auto: available memory unknown (no /proc/meminfo)"};
  // Three quarters: the rest of the process (activations, KV cache, resident weights) and
  // everything else on the machine keep room, so the source stays cached between passes.
  if (source_bytes > *available / 4 * 3) {
    return {false, detail::concat("auto: the ", layout.kind, " (", source_bytes,
                                  " bytes) is more than three quarters of the available memory (",
                                  *available,
                                  " bytes): reading with O_DIRECT, not through the "
                                  "page cache")};
  }
  return {true, detail::concat("auto: the ", layout.kind, " (", source_bytes,
                               " bytes) fits in the page cache (", *available,
                               " bytes available): reading in place")};
}

}  // namespace

std::string_view prefetch_strategy_name(PrefetchStrategy strategy) noexcept {
  switch (strategy) {
    case PrefetchStrategy::kNone:
      return "none";
    case PrefetchStrategy::kNextLayer:
      return "next_layer";
    case PrefetchStrategy::kAdaptive:
      return "adaptive";
  }
  return "";
}

std::string_view gds_mode_name(GdsMode mode) noexcept {
  switch (mode) {
    case GdsMode::kAuto:
      return "auto";
    case GdsMode::kOn:
      return "on";
    case GdsMode::kOff:
      return "off";
  }
  return "";
}

GdsMode parse_gds_mode(std::string_view name) {
  for (const auto m : {GdsMode::kAuto, GdsMode::kOn, GdsMode::kOff}) {
    if (gds_mode_name(m) == name) return m;
  }
  throw std::invalid_argument(detail::concat("gds mode '", name, "' is not one of auto, on, off"));
}

PrefetchStrategy parse_prefetch_strategy(std::string_view name) {
  for (const auto s :
       {PrefetchStrategy::kNone, PrefetchStrategy::kNextLayer, PrefetchStrategy::kAdaptive}) {
    if (prefetch_strategy_name(s) == name) return s;
  }
  throw std::invalid_argument(
      detail::concat("prefetch strategy '", name, "' is not one of none, next_layer, adaptive"));
}

// ---------------------------------------------------------------------------------------
class Engine::Impl {
 public:
  Impl(Layout layout, EngineOptions options);
  ~Impl() { close(); }

  BlockView acquire(std::uint32_t block, cuda::StreamHandle stream);
  void release(std::uint32_t block, cuda::StreamHandle stream);
  void prefetch(std::uint32_t block);
  void close();
  EngineStats stats() const;
  std::string trace_json() const {
    return trace_.to_chrome_json([this](std::uint32_t b) {
      return b < layout_.blocks.size() ? layout_.blocks[b].name : std::to_string(b);
    });
  }

  Layout layout_;
  ResidencyPlan plan_;

 private:
  enum class State { kEmpty, kFilling, kReady, kFailed };

  // A resident block's buffer or a streaming slot.
  struct Buffer {
    io::AlignedBuffer host;                 // device "cpu": the block's bytes
    cuda::DevicePtr dev_ptr = 0;            // GPU: the block's bytes
    std::optional<cuda::DeviceBuffer> dev;  // GPU: owned memory (unset if provided)
    std::shared_ptr<void> provided;         // GPU: gives provided memory back when reset
    std::optional<cuda::Event> ready;       // GPU: recorded after the fill's copy
    std::optional<cuda::Event> done;        // GPU: recorded by release()
    // GDS: the slot registered with cuFile; declared after the memory so it goes first.
    std::optional<cuda::CuFileBufferRegistration> gds_registration;
    bool done_recorded = false;
    std::optional<cache::BlockHandle> source_pin;  // GPU: keeps a copy's source alive
    std::int64_t block = -1;
    State state = State::kEmpty;
    std::optional<FillError> error;
    int pins = 0;
    bool resident = false;
    bool prefetched_unused = false;
    bool demanded = false;
    std::uint64_t generation = 0;
    std::int64_t last_release_ns = 0;
  };

  struct Job {
    std::size_t buffer;
    std::uint32_t block;
    std::uint64_t generation;
    // Taken under the lock when the job starts, so the fill reads no shared state unlocked.
    bool demand = false;
    bool wait_for_release = false;
  };

  // A pinned (on GPU) host buffer that a fill reads into before the copy to the device.
  struct Staging {
    io::AlignedBuffer host;
    std::optional<cuda::Event> copied;
    bool busy = false;
  };

  void check_open() const;
  void schedule_fill(std::size_t buffer, std::uint32_t block, bool demand);
  std::optional<std::size_t> pick_slot(bool for_demand);
  std::optional<std::size_t> cancel_queued_prefetch();
  void assign(std::size_t buffer, std::uint32_t block);
  void prefetch_locked(std::uint32_t block);
  void prefetch_after(std::uint32_t block);
  unsigned current_depth() const;
  void worker_loop();
  void run_fill(const Job& job);
  void read_block(std::uint32_t block, std::span<std::byte> dest, bool demand);
  void set_up_gds();
  void read_block_gds(std::uint32_t block, const Buffer& buffer);
  void read_block_in_place(std::uint32_t block);
  std::string describe_extent(std::uint32_t block, std::size_t extent) const;
  void verify_extent(std::uint32_t block, std::size_t extent, std::span<const std::byte> data);
  void open_windows();
  BlockView view_of(const Buffer& buffer, std::uint32_t block) const;
  Staging& take_staging();

  EngineOptions options_;
  int device_ordinal_ = -1;
  std::optional<cuda::Device> cuda_device_;
  std::optional<cuda::Stream> copy_stream_;
  std::unique_ptr<io::Backend> backend_;
  std::vector<io::FileId> files_;
  // GDS: per source file its registered handle (unset: the host path reads it), per block
  // whether cuFileRead fills it, and the outcome stats() reports.
  std::vector<std::optional<cuda::CuFileHandle>> gds_handles_;
  std::vector<bool> gds_block_;
  std::vector<GdsFileInfo> gds_info_;
  std::string gds_reason_;
  std::uint64_t gds_request_size_ = 0;
  unsigned gds_threads_ = 1;
  // Reading in place (device "cpu"): one window per block over descriptors of our own.
  bool in_place_ = false;
  std::string backend_name_;  // kept after close()
  std::string backend_note_;
  std::vector<tensorstream::detail::FileDescriptor> window_files_;
  std::vector<io::BlockWindow> windows_;
  // verify_checksums without stored checksums: per block, per extent, the first read's.
  std::mutex checksum_mutex_;
  std::vector<std::vector<std::optional<std::uint64_t>>> first_checksums_;
  std::shared_ptr<cache::HostAllocator> host_allocator_;
  std::unique_ptr<cache::BlockCache> cache_;
  TraceLog trace_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;            // buffer states, pins
  std::condition_variable jobs_ready_;         // job queues, closing
  std::vector<Buffer> buffers_;                // resident buffers, then slots
  std::vector<std::int64_t> buffer_of_block_;  // -1: not in device memory
  std::vector<std::int64_t> resident_buffer_;  // per block: its resident buffer or -1
  std::vector<std::size_t> slots_;             // indices of slot buffers
  std::deque<Job> demand_jobs_;
  std::deque<Job> prefetch_jobs_;
  std::vector<std::thread> workers_;
  std::vector<Staging> staging_;
  std::mutex staging_mutex_;
  std::condition_variable staging_free_;
  bool closed_ = false;

  // kAdaptive: the order of acquires of the first pass.
  std::vector<std::uint32_t> order_;
  std::vector<std::int64_t> order_position_;
  bool order_learned_ = false;
  std::vector<std::int64_t> acquired_at_ns_;
  double compute_ema_ = 0;  // seconds a block is held
  double fill_ema_ = 0;     // seconds a fill takes

  EngineStats stats_;
};

Engine::Impl::Impl(Layout layout, EngineOptions options)
    : layout_(std::move(layout)), options_(std::move(options)), trace_(options_.trace_capacity) {
  TS_EXPECT(options_.slots >= 2, std::invalid_argument, "slots must be at least 2, got ",
            options_.slots);
  device_ordinal_ = parse_device(options_.device);
  if (options_.gds == GdsMode::kOn) {
    TS_EXPECT(device_ordinal_ >= 0, std::invalid_argument, "gds=on needs a CUDA device, but ",
              "device is '", options_.device,
              "': GPUDirect Storage reads into GPU memory only (use gds=auto or gds=off)");
    TS_EXPECT(options_.ram_cache_bytes == 0, std::invalid_argument,
              "gds=on cannot be combined with a RAM tier (ram_cache_bytes = ",
              options_.ram_cache_bytes, "): the tier is filled by reads into host memory");
    TS_EXPECT(!options_.verify_checksums, std::invalid_argument,
              "gds=on cannot be combined with verify_checksums: blocks are checked in host "
              "memory, so they are read there");
    TS_EXPECT(options_.io.direct, std::invalid_argument,
              "gds=on cannot be combined with io.direct = false: cuFile reads bypass the page "
              "cache");
  }
  std::vector<std::uint64_t> sizes;
  std::uint64_t largest_block = 0;
  for (const auto& b : layout_.blocks) {
    sizes.push_back(b.size);
    largest_block = std::max(largest_block, b.size);
  }
  try {
    plan_ = plan_residency(sizes, options_.device_budget, options_.slots);
  } catch (const BudgetTooSmall& e) {
    throw BudgetTooSmall(detail::concat(layout_.kind, " '", layout_.source.string(), "' on ",
                                        options_.device, ": ", e.what()),
                         e.minimum_budget());
  }

  if (device_ordinal_ >= 0) {
    cuda_device_.emplace(device_ordinal_);
    copy_stream_.emplace(*cuda_device_);
    host_allocator_ = std::make_shared<PinnedAllocator>(*cuda_device_);
  } else {
    host_allocator_ = cache::default_host_allocator();
  }
  if (!cuda_device_) {
    auto path = choose_cpu_read_path(options_, layout_);
    in_place_ = path.in_place;
    backend_note_ = std::move(path.note);
  }
  if (in_place_) {
    open_windows();
    backend_name_ = "mmap";
  } else {
    // kMmap on a CPU that cannot read in place still reads (copies) through the mapping.
    backend_ = io::make_backend(options_.backend, options_.io);
    for (const auto& f : layout_.files) files_.push_back(backend_->open(f));
    backend_name_ = backend_->name();
    if (backend_note_.empty())
      backend_note_ = backend_->selection_note();
    else if (!backend_->selection_note().empty())
      backend_note_ += "; " + backend_->selection_note();
  }
  set_up_gds();
  first_checksums_.resize(layout_.blocks.size());
  for (std::size_t i = 0; i < layout_.blocks.size(); ++i) {
    first_checksums_[i].resize(layout_.blocks[i].extents.size());
  }
  if (options_.ram_cache_bytes > 0) {
    cache_ = std::make_unique<cache::BlockCache>(options_.ram_cache_bytes, options_.cache_policy,
                                                 host_allocator_);
  }

  const auto n = layout_.blocks.size();
  buffer_of_block_.assign(n, -1);
  resident_buffer_.assign(n, -1);
  order_position_.assign(n, -1);
  acquired_at_ns_.assign(n, 0);
  stats_.block_load_seconds.assign(n, 0.0);
  const auto& provider = options_.device_memory;
  TS_EXPECT(!provider || (provider->allocate && provider->release), std::invalid_argument,
            "device_memory needs both allocate and release");
  auto make_buffer = [&](std::uint64_t bytes, bool resident) {
    Buffer b;
    b.resident = resident;
    std::uint64_t address = 0;
    if (in_place_) {
      // The block's window is its memory; the budget still counts the slot.
      stats_.device_bytes_in_use += bytes;
      buffers_.push_back(std::move(b));
      return;
    }
    if (provider) {
      address = provider->allocate(bytes);
      TS_EXPECT(address != 0, Error, "device_memory.allocate(", bytes, ") returned null");
    }
    if (cuda_device_) {
      if (provider) {
        TS_EXPECT(address % 256 == 0, std::invalid_argument, "device_memory.allocate returned ",
                  "an address not aligned to 256 bytes");
        b.dev_ptr = address;
        auto release = provider->release;
        b.provided = std::shared_ptr<void>(
            nullptr, [release, address, bytes](void*) { release(address, bytes); });
      } else {
        b.dev.emplace(*cuda_device_, bytes);
        b.dev_ptr = b.dev->ptr();
      }
      b.ready.emplace(*cuda_device_);
      b.done.emplace(*cuda_device_);
    } else if (provider) {
      auto release = provider->release;
      b.host = io::AlignedBuffer::adopt(reinterpret_cast<std::byte*>(address), bytes,
                                        [release](std::byte* data, std::size_t size) {
                                          release(reinterpret_cast<std::uint64_t>(data), size);
                                        });
    } else {
      b.host = io::AlignedBuffer(bytes);
      // Fault slots in now: a slot's first fill would otherwise pay for allocating (and, for
      // huge pages, compacting) its memory inside the streaming path (measured: the first
      // two 256 MiB fills ran at a third of the speed of the rest).
      if (!resident) std::memset(b.host.data(), 0, bytes);
    }
    stats_.device_bytes_in_use += bytes;
    buffers_.push_back(std::move(b));
  };
  for (std::size_t i = 0; i < n; ++i) {
    if (plan_.resident[i]) {
      resident_buffer_[i] = static_cast<std::int64_t>(buffers_.size());
      make_buffer(align_4k(std::max<std::uint64_t>(layout_.blocks[i].size, 1)), true);
    }
  }
  for (unsigned s = 0; s < plan_.slots; ++s) {
    slots_.push_back(buffers_.size());
    make_buffer(plan_.slot_size, false);
  }
  stats_.device_bytes_peak = stats_.device_bytes_in_use;
  stats_.device_budget = options_.device_budget;
  const bool any_gds = std::find(gds_block_.begin(), gds_block_.end(), true) != gds_block_.end();
  const bool any_host = std::find(gds_block_.begin(), gds_block_.end(), false) != gds_block_.end();
  if (any_gds) {
    // Slots are read into again and again: registered, cuFile DMAs straight into them instead
    // of through its own bounce buffers. Optional: reads work without it.
    for (const auto s : slots_) {
      try {
        buffers_[s].gds_registration.emplace(*cuda_device_, buffers_[s].dev_ptr, plan_.slot_size);
      } catch (const std::exception&) {
        break;  // out of BAR1 space or not supported: the next ones would fail alike
      }
    }
  }
  if (cuda_device_ && any_host) {
    // Staging for reads that do not go into a RAM-tier entry: one per fill worker.
    const auto largest = align_4k(std::max<std::uint64_t>(largest_block, 1));
    for (unsigned w = 0; w < kFillWorkers; ++w) {
      Staging s;
      void* p = host_allocator_->allocate(largest);
      auto allocator = host_allocator_;
      s.host = io::AlignedBuffer::adopt(
          static_cast<std::byte*>(p), largest,
          [allocator](std::byte* data, std::size_t size) { allocator->deallocate(data, size); });
      s.copied.emplace(*cuda_device_);
      staging_.push_back(std::move(s));
    }
  }
  for (unsigned w = 0; w < kFillWorkers; ++w) workers_.emplace_back([this] { worker_loop(); });
}

void Engine::Impl::check_open() const {
  if (closed_) {
    throw Error(detail::concat("engine for '", layout_.source.string(), "' is closed"));
  }
}

BlockView Engine::Impl::view_of(const Buffer& buffer, std::uint32_t block) const {
  BlockView view;
  view.block = block;
  view.size = layout_.blocks[block].size;
  view.resident = buffer.resident;
  if (cuda_device_) {
    view.device = buffer.dev_ptr;
  } else if (in_place_) {
    view.host = windows_[block].data();
  } else {
    view.host = buffer.host.data();
  }
  return view;
}

void Engine::Impl::assign(std::size_t buffer, std::uint32_t block) {
  Buffer& b = buffers_[buffer];
  if (b.block >= 0 &&
      buffer_of_block_[static_cast<std::size_t>(b.block)] == static_cast<std::int64_t>(buffer)) {
    buffer_of_block_[static_cast<std::size_t>(b.block)] = -1;
  }
  if (b.prefetched_unused) ++stats_.prefetches_wasted;
  if (in_place_ && !b.resident && b.block >= 0 && b.block != static_cast<std::int64_t>(block)) {
    // The slot's old block leaves the process's memory (the page cache keeps it).
    windows_[static_cast<std::size_t>(b.block)].drop();
  }
  b.block = block;
  b.state = State::kEmpty;
  b.error.reset();
  b.prefetched_unused = false;
  b.demanded = false;
  ++b.generation;
  buffer_of_block_[block] = static_cast<std::int64_t>(buffer);
}

// A slot that may take a new block: empty, or holding a block that is neither held, nor
// being filled, nor prefetched and still unused (a demand may take those last, oldest first).
std::optional<std::size_t> Engine::Impl::pick_slot(bool for_demand) {
  std::optional<std::size_t> best;
  std::int64_t best_time = 0;
  int best_rank = 3;
  for (const auto s : slots_) {
    const Buffer& b = buffers_[s];
    if (b.pins > 0 || b.state == State::kFilling) continue;
    int rank = 2;
    if (b.block < 0 || b.state == State::kEmpty || b.state == State::kFailed) {
      rank = 0;
    } else if (!b.prefetched_unused) {
      rank = 1;
    } else if (!for_demand) {
      continue;
    }
    if (rank < best_rank || (rank == best_rank && b.last_release_ns < best_time)) {
      best = s;
      best_rank = rank;
      best_time = b.last_release_ns;
    }
  }
  return best;
}

// A demand found no free slot: take one whose prefetch has not started yet (the newest, as
// it is needed last). Its job is dropped; a read in flight is never interrupted.
std::optional<std::size_t> Engine::Impl::cancel_queued_prefetch() {
  for (auto it = prefetch_jobs_.rbegin(); it != prefetch_jobs_.rend(); ++it) {
    Buffer& b = buffers_[it->buffer];
    if (b.resident || b.pins > 0 || b.generation != it->generation) continue;
    const auto buffer = it->buffer;
    prefetch_jobs_.erase(std::next(it).base());
    ++stats_.prefetches_cancelled;
    b.prefetched_unused = false;  // not wasted: it was never read
    b.state = State::kEmpty;
    return buffer;
  }
  return std::nullopt;
}

void Engine::Impl::schedule_fill(std::size_t buffer, std::uint32_t block, bool demand) {
  Buffer& b = buffers_[buffer];
  b.state = State::kFilling;
  b.demanded = demand;
  (demand ? demand_jobs_ : prefetch_jobs_).push_back({buffer, block, b.generation});
  jobs_ready_.notify_one();
}

unsigned Engine::Impl::current_depth() const {
  const unsigned max_depth = plan_.slots > 0 ? plan_.slots - 1 : 0;
  if (options_.prefetch_depth) return std::min(*options_.prefetch_depth, max_depth);
  if (compute_ema_ <= 0 || fill_ema_ <= 0) return max_depth;
  // Enough blocks in flight that a block's fill finishes while the ones before it compute.
  const auto wanted = static_cast<unsigned>(std::ceil(fill_ema_ / compute_ema_));
  return std::clamp(wanted, 1u, std::max(max_depth, 1u));
}

void Engine::Impl::prefetch_locked(std::uint32_t block) {
  if (buffer_of_block_[block] >= 0) return;  // present or on its way
  if (resident_buffer_[block] >= 0) {
    const auto buffer = static_cast<std::size_t>(resident_buffer_[block]);
    assign(buffer, block);
    buffers_[buffer].prefetched_unused = true;
    ++stats_.prefetches_issued;
    schedule_fill(buffer, block, false);
    return;
  }
  const auto slot = pick_slot(/*for_demand=*/false);
  if (!slot) return;
  assign(*slot, block);
  buffers_[*slot].prefetched_unused = true;
  ++stats_.prefetches_issued;
  schedule_fill(*slot, block, false);
}

void Engine::Impl::prefetch_after(std::uint32_t block) {
  if (options_.prefetch == PrefetchStrategy::kNone) return;
  const auto n = static_cast<std::uint32_t>(layout_.blocks.size());
  const unsigned depth = current_depth();
  stats_.prefetch_depth = depth;
  const bool along_order = options_.prefetch == PrefetchStrategy::kAdaptive && order_learned_ &&
                           order_position_[block] >= 0;
  std::uint32_t cursor = block;
  unsigned issued = 0;
  // Walk ahead over resident blocks too (they cost nothing once loaded) but count only
  // streamed blocks against the depth.
  for (std::uint32_t step = 0; step < n && issued < depth; ++step) {
    if (along_order) {
      const auto pos = static_cast<std::size_t>(order_position_[cursor]);
      cursor = order_[(pos + 1) % order_.size()];
    } else {
      cursor = (cursor + 1) % n;
    }
    if (cursor == block) break;
    prefetch_locked(cursor);
    if (resident_buffer_[cursor] < 0) ++issued;
  }
}

BlockView Engine::Impl::acquire(std::uint32_t block, cuda::StreamHandle stream) {
  std::unique_lock lock(mutex_);
  check_open();
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range (",
            layout_.blocks.size(), " blocks in '", layout_.source.string(), "')");
  ++stats_.acquires;
  if (!order_learned_ && options_.prefetch == PrefetchStrategy::kAdaptive) {
    if (order_position_[block] >= 0) {
      order_learned_ = true;  // the first block seen again: one full pass recorded
    } else {
      order_position_[block] = static_cast<std::int64_t>(order_.size());
      order_.push_back(block);
    }
  }
  const auto deadline = Clock::now() + options_.wait_timeout;
  const std::int64_t start = now_ns();
  bool waited = false;
  std::size_t buffer = 0;
  while (true) {
    if (buffer_of_block_[block] < 0) {
      std::optional<std::size_t> target;
      if (resident_buffer_[block] >= 0) {
        target = static_cast<std::size_t>(resident_buffer_[block]);
      } else {
        target = pick_slot(/*for_demand=*/true);
        if (!target) target = cancel_queued_prefetch();
      }
      if (!target) {
        waited = true;
        if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
          throw Error(detail::concat("acquire of block '", layout_.blocks[block].name,
                                     "' timed out: all ", plan_.slots,
                                     " streaming slots stay held; release blocks first"));
        }
        check_open();
        continue;
      }
      assign(*target, block);
      schedule_fill(*target, block, /*demand=*/true);
    }
    buffer = static_cast<std::size_t>(buffer_of_block_[block]);
    Buffer& b = buffers_[buffer];
    if (b.state == State::kFilling && !b.demanded) {
      // A prefetch in the queue becomes a demand: move it ahead of other prefetches.
      for (auto it = prefetch_jobs_.begin(); it != prefetch_jobs_.end(); ++it) {
        if (it->buffer == buffer && it->generation == b.generation) {
          demand_jobs_.push_back(*it);
          prefetch_jobs_.erase(it);
          break;
        }
      }
      b.demanded = true;
    }
    ++b.pins;
    while (b.state == State::kFilling) {
      waited = true;
      if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
        --b.pins;
        changed_.notify_all();
        throw Error(detail::concat("block '", layout_.blocks[block].name, "' of '",
                                   layout_.source.string(), "' was not loaded within ",
                                   options_.wait_timeout.count(), " ms"));
      }
    }
    if (closed_) {
      --b.pins;
      check_open();
    }
    if (b.state == State::kFailed) {
      const FillError error = *b.error;
      --b.pins;
      // Forget the failed fill so that the next acquire reads the block again.
      if (in_place_ && !b.resident) windows_[block].drop();
      buffer_of_block_[block] = -1;
      b.block = -1;
      b.state = State::kEmpty;
      b.error.reset();
      changed_.notify_all();
      error.raise();
    }
    if (b.state == State::kReady && b.block == static_cast<std::int64_t>(block)) break;
    --b.pins;  // the buffer was reassigned while we waited; start over
  }
  Buffer& b = buffers_[buffer];
  if (b.prefetched_unused) {
    b.prefetched_unused = false;
    ++stats_.prefetches_used;
  }
  if (waited) {
    ++stats_.device_misses;
    const auto end = now_ns();
    stats_.stall_seconds += static_cast<double>(end - start) / 1e9;
    trace_.record({SpanKind::kStall, block, 0, start, end});
  } else {
    ++stats_.device_hits;
  }
  acquired_at_ns_[block] = now_ns();
  const BlockView view = view_of(b, block);
  if (b.ready && stream != nullptr) {
    cuda::stream_wait_event(*cuda_device_, stream, *b.ready);
  } else if (b.ready) {
    cuda::stream_wait_event(*cuda_device_, nullptr, *b.ready);
  }
  prefetch_after(block);
  return view;
}

void Engine::Impl::release(std::uint32_t block, cuda::StreamHandle stream) {
  std::lock_guard lock(mutex_);
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range");
  const auto index = buffer_of_block_[block];
  TS_EXPECT(index >= 0 && buffers_[static_cast<std::size_t>(index)].pins > 0, std::logic_error,
            "release of block '", layout_.blocks[block].name, "' that is not acquired");
  Buffer& b = buffers_[static_cast<std::size_t>(index)];
  --b.pins;
  const auto now = now_ns();
  b.last_release_ns = now;
  if (!b.resident && acquired_at_ns_[block] > 0) {
    const double held = static_cast<double>(now - acquired_at_ns_[block]) / 1e9;
    compute_ema_ = compute_ema_ == 0 ? held : 0.8 * compute_ema_ + 0.2 * held;
    trace_.record({SpanKind::kCompute, block, 0, acquired_at_ns_[block], now});
  }
  if (b.done) {
    b.done->record(stream);
    b.done_recorded = true;
  }
  changed_.notify_all();
}

void Engine::Impl::prefetch(std::uint32_t block) {
  std::lock_guard lock(mutex_);
  check_open();
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range");
  prefetch_locked(block);
}

void Engine::Impl::worker_loop() {
  while (true) {
    Job job{};
    {
      std::unique_lock lock(mutex_);
      jobs_ready_.wait(lock,
                       [&] { return closed_ || !demand_jobs_.empty() || !prefetch_jobs_.empty(); });
      if (closed_) return;
      auto& queue = demand_jobs_.empty() ? prefetch_jobs_ : demand_jobs_;
      job = queue.front();
      queue.pop_front();
      const Buffer& b = buffers_[job.buffer];
      if (b.generation != job.generation) continue;  // cancelled
      job.demand = b.demanded;
      job.wait_for_release = b.done_recorded;
    }
    run_fill(job);
  }
}

Engine::Impl::Staging& Engine::Impl::take_staging() {
  std::unique_lock lock(staging_mutex_);
  while (true) {
    for (auto& s : staging_) {
      if (!s.busy) {
        s.busy = true;
        return s;
      }
    }
    staging_free_.wait(lock);  // one staging buffer per worker: never waits long
  }
}

// Reads every extent of `block` into `dest` (all submitted, then all waited for; the first
// error wins and the other reads are cancelled when their tickets go).
void Engine::Impl::read_block(std::uint32_t block, std::span<std::byte> dest, bool demand) {
  const auto& info = layout_.blocks[block];
  const std::int64_t start = now_ns();
  const auto deadline = Clock::now() + options_.wait_timeout;
  std::vector<io::ReadTicket> tickets;
  tickets.reserve(info.extents.size());
  std::uint64_t bytes = 0;
  for (const auto& e : info.extents) {
    io::SubmitOptions submit;
    submit.priority = demand ? io::Priority::kHigh : io::Priority::kNormal;
    tickets.push_back(backend_->submit(files_[e.file], e.file_offset, e.length,
                                       dest.subspan(e.buffer_offset), std::move(submit)));
    bytes += e.length;
  }
  for (std::size_t i = 0; i < tickets.size(); ++i) {
    const auto& e = info.extents[i];
    const auto where = [&] { return describe_extent(block, i); };
    std::span<std::byte> data;
    try {
      const auto left = deadline - Clock::now();
      if (!tickets[i].wait_for(std::max<Clock::duration>(left, Clock::duration::zero()))) {
        tickets[i].cancel();
        throw Error(detail::concat("read of ", where(), " did not finish within ",
                                   options_.wait_timeout.count(), " ms"));
      }
      data = tickets[i].wait();
    } catch (const IoError& err) {
      if (e.label.empty()) throw;
      throw IoError(detail::concat("read of ", where(), " failed: ", err.what()), err.code());
    } catch (const FormatError& err) {
      if (e.label.empty()) throw;
      throw FormatError(detail::concat("read of ", where(), " failed: ", err.what()));
    } catch (const io::Cancelled& err) {
      if (e.label.empty()) throw;
      throw Error(detail::concat("read of ", where(), " failed: ", err.what()));
    }
    if (options_.verify_checksums) verify_extent(block, i, data);
  }
  const auto end = now_ns();
  trace_.record({SpanKind::kRead, block, bytes, start, end});
  std::lock_guard lock(mutex_);
  stats_.bytes_from_storage += bytes;
  stats_.io_seconds += static_cast<double>(end - start) / 1e9;
}

// What a failure names: the block, the tensor(s), the file and the offset.
std::string Engine::Impl::describe_extent(std::uint32_t block, std::size_t extent) const {
  const auto& info = layout_.blocks[block];
  const auto& e = info.extents[extent];
  const auto& file = layout_.files[e.file];
  return e.label.empty()
             ? detail::concat("block '", info.name, "' (", e.length, " bytes at offset ",
                              e.file_offset, " of '", file.string(), "')")
             : detail::concat("block '", info.name, "', tensor '", e.label, "' (", e.length,
                              " bytes at offset ", e.file_offset, " of '", file.string(), "')");
}

void Engine::Impl::verify_extent(std::uint32_t block, std::size_t extent,
                                 std::span<const std::byte> data) {
  const auto& e = layout_.blocks[block].extents[extent];
  const auto actual = checksum64(data);
  std::optional<std::uint64_t> expected = e.checksum;
  if (!expected) {
    std::lock_guard lock(checksum_mutex_);
    auto& first = first_checksums_[block][extent];
    if (!first) first = actual;
    expected = first;
  }
  TS_EXPECT(actual == *expected, ChecksumError, "checksum mismatch in ",
            describe_extent(block, extent), ": ", e.checksum ? "stored " : "first read ", std::hex,
            *expected, ", computed ", actual);
}

// One window per block, each extent's aligned read region mapped where the copying paths
// would have read it (see Layout), so placements are the same on every path.
void Engine::Impl::open_windows() {
  std::vector<std::uint64_t> sizes;
  for (const auto& f : layout_.files) {
    window_files_.emplace_back(f, O_RDONLY | O_CLOEXEC);
    sizes.push_back(window_files_.back().size());
  }
  windows_.reserve(layout_.blocks.size());
  for (const auto& info : layout_.blocks) {
    std::vector<io::WindowRegion> regions;
    for (const auto& e : info.extents) {
      const auto plan = io::plan_read(e.file_offset, e.length);
      regions.push_back(io::WindowRegion{window_files_[e.file].get(), &layout_.files[e.file],
                                         sizes[e.file], plan.aligned_offset, plan.aligned_size,
                                         e.buffer_offset});
    }
    windows_.emplace_back(std::max<std::uint64_t>(info.size, 1), regions);
  }
}

// Decides, per source file, whether cuFileRead reads it (see "GPUDirect Storage" in
// engine.hpp): opens the cuFile driver and registers the files, or records why not. With
// gds=on every failure is the constructor's error.
void Engine::Impl::set_up_gds() {
  const GdsMode mode = options_.gds;
  stats_.gds_mode = mode;
  gds_handles_.resize(layout_.files.size());
  gds_block_.assign(layout_.blocks.size(), false);
  std::string common;  // a cause that keeps every file off GDS
  if (!cuda_device_) {
    common = detail::concat("device '", options_.device,
                            "': GPUDirect Storage reads into GPU memory only");
  } else if (mode == GdsMode::kOff) {
    common = "gds is off";  // and libcufile is never loaded
  } else if (options_.ram_cache_bytes > 0) {
    common = "a RAM tier is configured (ram_cache_bytes > 0): blocks are read into it";
  } else if (options_.verify_checksums) {
    common = "verify_checksums is on: blocks are checked in host memory, so they are read there";
  } else if (!options_.io.direct) {
    common = "io.direct is off: reads go through the page cache, which cuFile bypasses";
  } else {
    auto status = cuda::cufile_status();  // loads the library, does not open the driver
    if (!status.library_loaded) {
      common = status.reason;
    } else if (mode == GdsMode::kAuto && !status.nvidia_fs) {
      // Without the kernel module cuFile reads through its own small bounce buffers
      // ("compatibility mode"): slower than the host path's large requests in flight.
      common =
          "the nvidia-fs kernel module is not loaded (no /proc/driver/nvidia-fs): cuFile would "
          "run in compatibility mode, no faster than the host path (gds=on uses it anyway)";
    } else {
      status = cuda::cufile_open_driver(*cuda_device_);
      if (!status.driver_opened) common = status.reason;
    }
  }
  if (!common.empty()) {
    // gds=on with a CPU device or a conflicting option was refused before; this is cuFile.
    TS_EXPECT(mode != GdsMode::kOn || !cuda_device_, CudaError,
              "gds=on: GPUDirect Storage cannot read '", layout_.files.front().string(),
              "' (nor any file of ", layout_.kind, " '", layout_.source.string(), "'): ", common);
    for (const auto& f : layout_.files) gds_info_.push_back(GdsFileInfo{f, false, common});
    gds_reason_ = common;
    return;
  }
  std::vector<std::string> failures;
  for (std::size_t i = 0; i < layout_.files.size(); ++i) {
    const auto& path = layout_.files[i];
    GdsFileInfo info{path, false, {}};
    try {
      if (options_.io.fault_injector) {
        // The test hook of the backends, consulted here as where they open with O_DIRECT.
        const io::FaultContext context{io::FaultPoint::kOpenDirect, 0, &path, 0, 0, true};
        if (const int code = options_.io.fault_injector(context).error; code != 0) {
          detail::throw_errno(detail::concat("cannot open '", path.string(),
                                             "' with O_DIRECT for GPUDirect Storage"),
                              code);
        }
      }
      gds_handles_[i].emplace(*cuda_device_, path);
      info.used = true;
    } catch (const IoError& e) {
      if (mode == GdsMode::kOn) {
        throw IoError(detail::concat("gds=on: GPUDirect Storage cannot read '", path.string(),
                                     "': ", e.what()),
                      e.code());
      }
      info.reason = e.what();
    } catch (const std::exception& e) {
      TS_EXPECT(mode != GdsMode::kOn, CudaError, "gds=on: GPUDirect Storage cannot read '",
                path.string(), "': ", e.what());
      info.reason = e.what();
    }
    if (info.used) {
      ++stats_.gds_files;
    } else {
      failures.push_back(info.reason);
    }
    gds_info_.push_back(std::move(info));
  }
  for (std::size_t b = 0; b < layout_.blocks.size(); ++b) {
    const auto& extents = layout_.blocks[b].extents;
    gds_block_[b] = std::all_of(extents.begin(), extents.end(),
                                [&](const Extent& e) { return gds_handles_[e.file].has_value(); });
  }
  // One line: the causes, each once (a checkpoint's shards on tmpfs all fail alike).
  std::sort(failures.begin(), failures.end());
  failures.erase(std::unique(failures.begin(), failures.end()), failures.end());
  for (const auto& f : failures) gds_reason_ += (gds_reason_.empty() ? "" : "; ") + f;
  const auto io = options_.io.normalized();
  gds_request_size_ = io.request_size;
  gds_threads_ = io.num_threads;
}

// A fill with GPUDirect Storage: each extent's aligned read region (the same one the host path
// reads, clipped at the end of the file) goes straight into the buffer at its offset, in
// requests of request_size run on up to num_threads threads, this one included. cuFileRead
// is synchronous, so when this returns the bytes are in device memory.
void Engine::Impl::read_block_gds(std::uint32_t block, const Buffer& buffer) {
  const auto& info = layout_.blocks[block];
  const std::int64_t start = now_ns();
  const auto deadline = Clock::now() + options_.wait_timeout;
  struct Request {
    std::size_t extent;
    std::uint64_t file_offset;
    std::uint64_t size;
    std::uint64_t buffer_offset;
  };
  std::vector<Request> requests;
  std::uint64_t bytes = 0;
  // cuFileRead writes device memory unchecked: every region must fit the buffer.
  const std::uint64_t capacity =
      buffer.resident ? align_4k(std::max<std::uint64_t>(info.size, 1)) : plan_.slot_size;
  for (std::size_t i = 0; i < info.extents.size(); ++i) {
    const auto& e = info.extents[i];
    const auto& handle = *gds_handles_[e.file];
    TS_EXPECT(e.file_offset + e.length <= handle.size(), FormatError, "read of ",
              describe_extent(block, i), " failed: the file ends at byte ", handle.size());
    const auto plan = io::plan_read(e.file_offset, e.length);
    const auto end = std::min(plan.aligned_offset + plan.aligned_size, handle.size());
    TS_EXPECT(e.buffer_offset + (end - plan.aligned_offset) <= capacity, Error, "read of ",
              describe_extent(block, i), ": its read region does not fit the block's ", capacity,
              "-byte buffer");
    for (auto offset = plan.aligned_offset; offset < end; offset += gds_request_size_) {
      requests.push_back(Request{i, offset,
                                 std::min<std::uint64_t>(gds_request_size_, end - offset),
                                 e.buffer_offset + (offset - plan.aligned_offset)});
    }
    bytes += e.length;
  }
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr first_error;
  const auto fail = [&](std::exception_ptr error) {
    std::lock_guard lock(error_mutex);
    if (!first_error) first_error = std::move(error);
    failed = true;
  };
  const auto work = [&] {
    while (!failed) {
      const std::size_t k = next++;
      if (k >= requests.size()) return;
      const auto& r = requests[k];
      const auto& e = info.extents[r.extent];
      const auto& handle = *gds_handles_[e.file];
      try {
        // A request not started by the deadline is not started at all (one in flight
        // cannot be interrupted).
        TS_EXPECT(Clock::now() < deadline, Error, "read of ", describe_extent(block, r.extent),
                  " with GPUDirect Storage did not finish within ", options_.wait_timeout.count(),
                  " ms");
        for (std::uint64_t done = 0; done < r.size;) {
          const auto n = handle.read(buffer.dev_ptr, static_cast<std::size_t>(r.size - done),
                                     r.file_offset + done, r.buffer_offset + done);
          // cuFile may stop early; nothing at all means the file has become shorter.
          TS_EXPECT(n > 0, FormatError, "read of ", describe_extent(block, r.extent),
                    " with GPUDirect Storage failed: '", handle.path().string(), "' ended at byte ",
                    r.file_offset + done, " (truncated since it was opened?)");
          done += n;
        }
      } catch (const IoError& err) {
        fail(std::make_exception_ptr(
            IoError(detail::concat("read of ", describe_extent(block, r.extent),
                                   " with GPUDirect Storage failed: ", err.what()),
                    err.code())));
      } catch (...) {
        fail(std::current_exception());
      }
    }
  };
  std::vector<std::thread> helpers;
  const auto wanted = std::min<std::size_t>(gds_threads_, requests.size());
  try {
    while (helpers.size() + 1 < wanted) helpers.emplace_back(work);
  } catch (const std::system_error&) {
    // fewer threads than asked: the ones started (and this one) do all the requests
  }
  work();
  for (auto& t : helpers) t.join();
  if (first_error) std::rethrow_exception(first_error);
  const auto end = now_ns();
  trace_.record({SpanKind::kGdsRead, block, bytes, start, end});
  std::lock_guard lock(mutex_);
  stats_.bytes_from_storage += bytes;
  stats_.gds_bytes += bytes;
  stats_.io_seconds += static_cast<double>(end - start) / 1e9;
}

// A fill in place: fault the block's pages in (storage → page cache → this process), then
// check them like a read.
void Engine::Impl::read_block_in_place(std::uint32_t block) {
  const auto& info = layout_.blocks[block];
  const auto& window = windows_[block];
  const std::int64_t start = now_ns();
  std::uint64_t from_storage = 0;
  try {
    from_storage = window.populate();
  } catch (const IoError& err) {
    throw IoError(detail::concat("block '", info.name, "': ", err.what()), err.code());
  } catch (const FormatError& err) {
    throw FormatError(detail::concat("block '", info.name, "': ", err.what()));
  }
  std::uint64_t bytes = 0;
  for (std::size_t i = 0; i < info.extents.size(); ++i) {
    const auto& e = info.extents[i];
    bytes += e.length;
    if (options_.verify_checksums) {
      verify_extent(block, i, {window.data() + e.buffer_offset + e.skip, e.length});
    }
  }
  from_storage = std::min(from_storage, bytes);
  const auto end = now_ns();
  trace_.record({SpanKind::kRead, block, bytes, start, end});
  std::lock_guard lock(mutex_);
  stats_.bytes_from_storage += from_storage;
  stats_.bytes_from_page_cache += bytes - from_storage;
  stats_.io_seconds += static_cast<double>(end - start) / 1e9;
}

void Engine::Impl::run_fill(const Job& job) {
  const auto& info = layout_.blocks[job.block];
  const std::int64_t start = now_ns();
  std::optional<FillError> error;
  std::optional<cache::BlockHandle> source_pin;
  Staging* staging = nullptr;
  Buffer& buffer = buffers_[job.buffer];  // stable: buffers_ never resizes after construction
  try {
    if (buffer.source_pin) {
      // The previous fill's copy may still read from this pinned source: let it finish.
      buffer.ready->synchronize();
      buffer.source_pin.reset();
    }
    if (gds_block_[job.block]) {
      // cuFileRead writes the slot from the host side, so its previous users must be done
      // with it first: the consumer that released it and the last copy into it. Waiting on
      // the host is fine here, on a fill worker.
      if (job.wait_for_release) buffer.done->synchronize();
      buffer.ready->synchronize();
      read_block_gds(job.block, buffer);
      buffer.ready->record(copy_stream_->handle());
    } else {
      const cache::BlockKey key{0, job.block};
      const std::byte* source = nullptr;
      if (cache_) source_pin = cache_->lookup(key);
      if (in_place_) {
        read_block_in_place(job.block);
        source = windows_[job.block].data();
      } else if (source_pin) {
        source = source_pin->data();
        std::lock_guard lock(mutex_);
        stats_.bytes_from_ram_tier += info.size;
      } else {
        std::span<std::byte> dest;
        std::optional<cache::BlockHandle> filler;
        if (cache_) filler = cache_->insert(key, align_4k(std::max<std::uint64_t>(info.size, 1)));
        if (filler) {
          dest = filler->mutable_bytes();
        } else if (cuda_device_) {
          staging = &take_staging();
          if (staging->copied) staging->copied->synchronize();  // its last copy has finished
          dest = staging->host.span();
        } else {
          dest = buffer.host.span();
        }
        read_block(job.block, dest, job.demand);
        source = dest.data();
        if (filler) {
          filler->publish();
          source_pin = std::move(filler);
        }
      }
      const std::int64_t copy_start = now_ns();
      if (cuda_device_) {
        if (job.wait_for_release) {
          cuda::stream_wait_event(*cuda_device_, copy_stream_->handle(), *buffer.done);
        }
        cuda::memcpy_htod_async(*cuda_device_, buffer.dev_ptr, source, info.size,
                                copy_stream_->handle());
        buffer.ready->record(copy_stream_->handle());
        if (staging) staging->copied->record(copy_stream_->handle());
      } else if (!in_place_ && source != buffer.host.data()) {
        std::memcpy(buffer.host.data(), source, info.size);
      }
      trace_.record({SpanKind::kCopy, job.block, info.size, copy_start, now_ns()});
    }
  } catch (...) {
    error = FillError::capture();
  }
  if (staging) {
    std::lock_guard lock(staging_mutex_);
    staging->busy = false;
    staging_free_.notify_one();
  }
  std::lock_guard lock(mutex_);
  const double seconds = seconds_since(start);
  if (buffer.generation != job.generation) return;  // reassigned meanwhile
  if (error) {
    buffer.state = State::kFailed;
    buffer.error = error;
    ++stats_.failures;
  } else {
    buffer.state = State::kReady;
    // On a GPU the copy may still run: keep its source alive until the slot's next fill.
    if (cuda_device_) buffer.source_pin = std::move(source_pin);
    ++stats_.fills;
    stats_.bytes_to_device += info.size;
    stats_.fill_seconds += seconds;
    stats_.block_load_seconds[job.block] = seconds;
    if (!buffer.resident) fill_ema_ = fill_ema_ == 0 ? seconds : 0.8 * fill_ema_ + 0.2 * seconds;
  }
  changed_.notify_all();
}

void Engine::Impl::close() {
  {
    std::lock_guard lock(mutex_);
    if (closed_) return;
    closed_ = true;
    for (const auto& job : demand_jobs_) {
      buffers_[job.buffer].state = State::kFailed;
      buffers_[job.buffer].error = FillError{FillError::Kind::kError, "engine closed", 0};
    }
    for (const auto& job : prefetch_jobs_) {
      buffers_[job.buffer].state = State::kFailed;
      buffers_[job.buffer].error = FillError{FillError::Kind::kError, "engine closed", 0};
    }
    demand_jobs_.clear();
    prefetch_jobs_.clear();
  }
  jobs_ready_.notify_all();
  changed_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
  if (copy_stream_) {
    try {
      copy_stream_->synchronize();
    } catch (const std::exception&) {
    }
  }
  std::lock_guard lock(mutex_);
  for (auto& b : buffers_) b.source_pin.reset();
  buffers_.clear();
  staging_.clear();
  stats_.device_bytes_in_use = 0;
  cache_.reset();
  backend_.reset();
  gds_handles_.clear();
  windows_.clear();
  window_files_.clear();
}

EngineStats Engine::Impl::stats() const {
  std::lock_guard lock(mutex_);
  EngineStats out = stats_;
  if (cache_) out.ram_tier = cache_->stats();
  if (backend_) out.io = backend_->stats();
  out.backend = backend_name_;
  out.in_place = in_place_;
  out.backend_note = backend_note_;
  out.gds_reason = gds_reason_;
  out.gds = gds_info_;
  out.order_learned = order_learned_;
  out.prefetch_depth = current_depth();
  return out;
}

// ---------------------------------------------------------------------------------------
Engine::Engine(const std::filesystem::path& store_path, EngineOptions options)
    : impl_(std::make_unique<Impl>(layout_of_store(store_path), std::move(options))) {}
Engine::Engine(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
Engine Engine::from_safetensors(const std::filesystem::path& path, EngineOptions options,
                                const TensorGroups& groups) {
  return Engine(std::make_unique<Impl>(layout_of_safetensors(path, groups), std::move(options)));
}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;
BlockView Engine::acquire(std::uint32_t block, cuda::StreamHandle stream) {
  return impl_->acquire(block, stream);
}
void Engine::release(std::uint32_t block, cuda::StreamHandle stream) {
  impl_->release(block, stream);
}
void Engine::prefetch(std::uint32_t block) { impl_->prefetch(block); }
void Engine::close() { impl_->close(); }
std::size_t Engine::block_count() const noexcept { return impl_->layout_.blocks.size(); }
const std::string& Engine::block_name(std::uint32_t block) const {
  TS_EXPECT(block < impl_->layout_.blocks.size(), std::out_of_range, "block ", block,
            " out of range");
  return impl_->layout_.blocks[block].name;
}
std::vector<TensorPlacement> Engine::tensors(std::uint32_t block) const {
  TS_EXPECT(block < impl_->layout_.blocks.size(), std::out_of_range, "block ", block,
            " out of range");
  return impl_->layout_.blocks[block].tensors;
}
const ResidencyPlan& Engine::plan() const noexcept { return impl_->plan_; }
EngineStats Engine::stats() const { return impl_->stats(); }
std::string Engine::trace_json() const { return impl_->trace_json(); }

}  // namespace tensorstream::engine
