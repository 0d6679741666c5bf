#include "tensorstream/settings.hpp"

#include <chrono>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "tensorstream/cache/block_cache.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"

namespace tensorstream {

using detail::concat;
using engine::EngineOptions;

namespace {

// What a row says beyond its name, accessor and kind (designated initialisers keep each row
// readable; the order is that of Setting).
struct Text {
  std::string_view unit = {};
  std::optional<std::uint64_t> min = {};
  std::optional<std::uint64_t> max = {};
  bool clamped = false;
  std::string_view env = {};
  std::string_view config_field = {};
  std::string_view config_note = {};
  std::string_view default_text = {};  // empty: written from the default value
  std::string_view meaning = {};
};

Setting from_text(std::string_view name, SettingScope scope, SettingKind kind, const Text& t) {
  Setting s;
  s.name = name;
  s.scope = scope;
  s.kind = kind;
  s.unit = t.unit;
  s.min = t.min;
  s.max = t.max;
  s.clamped = t.clamped;
  s.env = t.env;
  s.config_field = t.config_field;
  s.config_note = t.config_note;
  s.default_text = std::string(t.default_text);
  s.meaning = t.meaning;
  return s;
}

template <class T>
struct is_optional : std::false_type {};
template <class T>
struct is_optional<std::optional<T>> : std::true_type {};

// The integer a field holds (itself, or what its std::optional holds).
template <class T>
struct integer_of {
  using type = T;
};
template <class T>
struct integer_of<std::optional<T>> {
  using type = T;
};

// A row for a scalar field of EngineOptions reached by `access` (a stateless lambda); the
// kind follows from the field's type, and the default is read from EngineOptions{}.
template <class Access>
Setting option_row(SettingScope scope, std::string_view name, Access access, const Text& t) {
  using T = std::remove_reference_t<decltype(access(std::declval<EngineOptions&>()))>;
  static_assert(std::is_same_v<T, bool> || std::is_same_v<T, std::string> ||
                    std::is_same_v<T, std::chrono::milliseconds> ||
                    (std::is_integral_v<typename integer_of<T>::type> &&
                     std::is_unsigned_v<typename integer_of<T>::type>),
                "option_row takes bool, std::string, std::chrono::milliseconds and unsigned "
                "integers (or std::optional of one); an enum needs choice_row");
  SettingKind kind = SettingKind::kInteger;
  if constexpr (std::is_same_v<T, bool>) kind = SettingKind::kBool;
  if constexpr (std::is_same_v<T, std::string>) kind = SettingKind::kText;
  Setting s = from_text(name, scope, kind, t);
  s.optional = is_optional<T>::value;
  s.set = [access, name](EngineOptions& o, const SettingValue& v) {
    auto& field = access(o);
    if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, std::string>) {
      (void)name;  // only integers name the key in their own messages
      field = std::get<T>(v);
    } else {
      if constexpr (is_optional<T>::value) {
        if (std::holds_alternative<std::monostate>(v)) {
          field.reset();
          return;
        }
      }
      const auto n = std::get<std::uint64_t>(v);
      if constexpr (std::is_same_v<T, std::chrono::milliseconds>) {
        TS_EXPECT(n <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                  std::invalid_argument, "engine option '", name, "': ", n, " is too large");
        field = std::chrono::milliseconds(static_cast<std::int64_t>(n));
      } else {
        using Int = typename integer_of<T>::type;
        TS_EXPECT(n <= std::numeric_limits<Int>::max(), std::invalid_argument, "engine option '",
                  name, "': ", n, " is too large (at most ", std::numeric_limits<Int>::max(), ")");
        field = static_cast<Int>(n);
      }
    }
  };
  s.get = [access](const EngineOptions& o) -> SettingValue {
    const auto& field = access(o);
    if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, std::string>) {
      return field;
    } else if constexpr (std::is_same_v<T, std::chrono::milliseconds>) {
      return static_cast<std::uint64_t>(field.count());
    } else if constexpr (is_optional<T>::value) {
      if (!field) return std::monostate{};
      return static_cast<std::uint64_t>(*field);
    } else {
      return static_cast<std::uint64_t>(field);
    }
  };
  s.default_value = s.get(EngineOptions{});
  return s;
}

// A row for an enum field: `values` are every member, `name_of` gives each one's name (the
// choices), `parse` turns a name back into a member (throwing std::invalid_argument).
template <class Access, class E, class NameOf, class Parse>
Setting choice_row(SettingScope scope, std::string_view name, Access access,
                   std::initializer_list<E> values, NameOf name_of, Parse parse, const Text& t) {
  Setting s = from_text(name, scope, SettingKind::kChoice, t);
  for (const E value : values) s.choices.push_back(name_of(value));
  s.set = [access, parse](EngineOptions& o, const SettingValue& v) {
    access(o) = parse(std::get<std::string>(v));
  };
  s.get = [access, name_of](const EngineOptions& o) -> SettingValue {
    return std::string(name_of(access(o)));
  };
  s.default_value = s.get(EngineOptions{});
  return s;
}

// A row without a C++ struct behind it (Python and environment scopes): its default is
// written here.
Setting plain_row(SettingScope scope, std::string_view name, SettingKind kind,
                  SettingValue default_value, const Text& t,
                  std::vector<std::string_view> choices = {}) {
  Setting s = from_text(name, scope, kind, t);
  s.default_value = std::move(default_value);
  s.optional = std::holds_alternative<std::monostate>(s.default_value);
  s.choices = std::move(choices);
  return s;
}

io::BackendType backend_or_throw(const std::string& name) {
  const auto type = io::parse_backend_type(name);
  if (!type) {
    throw std::invalid_argument(
        concat("backend '", name, "' is not one of auto, pread, io_uring, mmap"));
  }
  return *type;
}

constexpr auto kEngine = SettingScope::kEngine;
constexpr auto kIo = SettingScope::kIo;
constexpr auto kPython = SettingScope::kPython;
constexpr auto kEnvironment = SettingScope::kEnvironment;
constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;

std::vector<Setting> build_table() {
  using engine::GdsMode;
  using engine::PrefetchStrategy;
  std::vector<Setting> rows;

  // ---- engine (EngineOptions) ----
  rows.push_back(option_row(
      kEngine, "device", [](auto& o) -> auto& { return o.device; },
      {.config_field = "device",
       .config_note = "None (the default): the device the model is on when it is offloaded",
       .meaning = "`\"cpu\"`, `\"cuda\"` or `\"cuda:N\"`. On the CPU the \"device\" is host RAM: "
                  "blocks are read straight into it, or read in place (see `backend`)."}));
  rows.push_back(option_row(
      kEngine, "device_budget", [](auto& o) -> auto& { return o.device_budget; },
      {.unit = "bytes",
       .config_field = "vram_budget_gb",
       .config_note = "less the resident (non-streamed) parameters; unset: automatic",
       .default_text = "required",
       .meaning = "Hard cap on bytes of weights held on the device: resident blocks + streaming "
                  "slots. Below the minimum (two slots of the largest streamed block, or the "
                  "largest blocks resident plus two slots of the next) the engine refuses to "
                  "start and names the minimum."}));
  rows.push_back(option_row(
      kEngine, "ram_cache_bytes", [](auto& o) -> auto& { return o.ram_cache_bytes; },
      {.unit = "bytes",
       .config_field = "ram_cache_gb",
       .config_note = "in GB, or a size string; None counts as 0",
       .meaning = "Pinned-RAM tier between storage and device (0: none). A hit costs one DMA "
                  "instead of a storage read. Never exceeded (entries in use are pinned, never "
                  "evicted)."}));
  rows.push_back(choice_row(
      kEngine, "cache_policy", [](auto& o) -> auto& { return o.cache_policy; },
      {cache::Policy::kLru, cache::Policy::kLfu, cache::Policy::kFifo, cache::Policy::kAuto},
      cache::policy_name, [](const std::string& n) { return cache::parse_policy(n); },
      {.config_field = "cache_policy",
       .meaning = "Eviction in the RAM tier. `auto` is cyclic-aware: on a decode loop longer "
                  "than the tier, LRU and FIFO hit 0%; `auto` keeps a fixed subset and hits "
                  "about tier/loop."}));
  rows.push_back(choice_row(
      kEngine, "backend", [](auto& o) -> auto& { return o.backend; },
      {io::BackendType::kAuto, io::BackendType::kPread, io::BackendType::kIoUring,
       io::BackendType::kMmap},
      io::backend_name, backend_or_throw,
      {.config_field = "backend",
       .config_note = "`MMAP`, `IO_URING`, `PREAD` as named; `AUTO`, `CUDA`, `GPUDIRECT`: "
                      "`auto` (see `gds`)",
       .meaning =
           "How blocks are read. On a GPU, and on the CPU when not reading in place, `auto` is "
           "io_uring if the kernel allows it, else pread (both O_DIRECT). **CPU, reading in "
           "place**: `mmap` — and `auto` when there is no RAM tier and the source is at most "
           "three quarters of MemAvailable — maps each block's file ranges into a window laid "
           "out like its buffer (2 MiB-congruent, `MADV_HUGEPAGE`, so large page-cache folios "
           "map with one entry per 2 MiB) and hands out views into it: no copy; a fill faults "
           "the window in (`MADV_POPULATE_READ`), and a slot given to another block drops the "
           "old window's pages from the process (`MADV_DONTNEED`), so the budget bounds the "
           "weight bytes mapped into the process exactly as it bounds slot memory. The page "
           "cache serves repeated passes: kernel memory, reclaimable, shared with other "
           "processes, not part of the budget. A model larger than three quarters of the "
           "available memory gets O_DIRECT instead (a cyclic scan larger than the page cache "
           "would thrash it). `stats()` gives `backend`, `in_place`, `backend_note` (why) and "
           "`bytes_from_page_cache`."}));
  rows.push_back(choice_row(
      kEngine, "prefetch", [](auto& o) -> auto& { return o.prefetch; },
      {PrefetchStrategy::kNone, PrefetchStrategy::kNextLayer, PrefetchStrategy::kAdaptive},
      engine::prefetch_strategy_name,
      [](const std::string& n) { return engine::parse_prefetch_strategy(n); },
      {.config_field = "prefetch_strategy",
       .meaning = "Which blocks are read ahead: `none`, `next_layer` (store order, cyclic) or "
                  "`adaptive` (learns the order of acquires in the first pass, then follows "
                  "it)."}));
  rows.push_back(option_row(
      kEngine, "prefetch_depth", [](auto& o) -> auto& { return o.prefetch_depth; },
      {.min = 1,
       .max = 64,
       .config_field = "prefetch_depth",
       .meaning = "Blocks read ahead. Unset: ceil(fill time / compute time), measured, at most "
                  "`slots − 1`. A fixed depth is also capped at `slots − 1`."}));
  rows.push_back(option_row(
      kEngine, "slots", [](auto& o) -> auto& { return o.slots; },
      {.min = 1,
       .config_field = "prefetch_depth",
       .config_note = "1 + `prefetch_depth` (unset counts as 1), at least 2; 1 with prefetch "
                      "`NONE`",
       .meaning = "The streaming arena the residency plan aims for, in largest streamed units. "
                  "Two lets a unit load while another computes; more allow deeper prefetch but "
                  "cost budget that could hold resident units. A budget below it gets fewer, down "
                  "to one: it runs, every load waited for (stats: `overlap` false)."}));
  rows.push_back(option_row(
      kEngine, "verify_checksums", [](auto& o) -> auto& { return o.verify_checksums; },
      {.config_field = "verify_checksums",
       .meaning = "Check every block read against its XXH3-64 (tens of GB/s per core; failures "
                  "raise `ChecksumError` naming file, block, offset). Checking happens in host "
                  "memory, so it keeps blocks off GPUDirect Storage."}));
  rows.push_back(option_row(
      kEngine, "decode_threads", [](auto& o) -> auto& { return o.decode_threads; },
      {.max = 64,
       .default_text = "0 (one per core, at most 8)",
       .meaning = "Threads that decode the chunks of a compressed unit at once (the fill "
                  "worker and a pool shared by the fill workers), while the unit's next chunks "
                  "are read. Decoding runs at about 1.9 GB/s of bf16 per thread "
                  "(`docs/benchmarks.md`); on the CPU the same cores run the model, so fewer "
                  "threads leave it more. Unused by stores without compressed blocks."}));
  rows.push_back(choice_row(
      kEngine, "compressed_reads", [](auto& o) -> auto& { return o.compressed_reads; },
      {engine::CompressedReads::kAuto, engine::CompressedReads::kDecode,
       engine::CompressedReads::kDecodedCopy},
      engine::compressed_reads_name,
      [](const std::string& n) { return engine::parse_compressed_reads(n); },
      {.meaning =
           "How a compressed store's units are read. `decode`: each fill reads the stored "
           "chunks and decodes them on its way (`decode_threads`). `decoded_copy`: when the "
           "engine starts, every compressed unit is decoded once into a temporary, unlinked "
           "file beside the store (disk space: the decoded bytes; time: one decoding pass), "
           "which is then streamed as an uncompressed store (in place, GPUDirect Storage, "
           "O_DIRECT). `auto` declines to decode on the critical path where that would be "
           "slower than reading decoded bytes: a decoded copy on the CPU when an uncompressed "
           "store of this size would be read in place from the page cache, and elsewhere when "
           "the storage, measured at start on 64 MiB of chunks (stores with at least 256 MiB "
           "of them), reads faster than the decode threads decode; otherwise `decode`. A copy "
           "that cannot be made (no room) falls back to `decode`. `stats()`: `decode_note` "
           "(which, and why), `decoded_copy_bytes`."}));
  rows.push_back(choice_row(
      kEngine, "gds", [](auto& o) -> auto& { return o.gds; },
      {GdsMode::kAuto, GdsMode::kOn, GdsMode::kOff}, engine::gds_mode_name,
      [](const std::string& n) { return engine::parse_gds_mode(n); },
      {.config_field = "backend",
       .config_note = "`GPUDIRECT`: `on`; `AUTO`, `CUDA`: `auto`; `MMAP`, `IO_URING`, `PREAD`: "
                      "`off`",
       .meaning =
           "GPUDirect Storage (cuFile, loaded with `dlopen`): blocks read straight from the "
           "file into GPU memory, no pinned staging, no host-to-device copy. `auto`: on a CUDA "
           "device with the nvidia-fs kernel module, every file cuFile can register (opened "
           "with O_DIRECT) is read that way, the others through host memory; each file's "
           "outcome and reason are in `stats().gds` / `gds_reason`. Without nvidia-fs cuFile "
           "would run in compatibility mode (its own small bounce buffers, no faster than the "
           "host path), so `auto` does not use it. `on`: every file with cuFile, compatibility "
           "mode included, or the engine refuses to start naming the file and the cause; `on` "
           "with device `cpu`, a RAM tier, `verify_checksums` or `direct = false` is a "
           "`ValueError`/`std::invalid_argument` (those need the bytes in host memory). `off`: "
           "libcufile is never loaded."}));
  rows.push_back(option_row(
      kEngine, "wait_timeout_ms", [](auto& o) -> auto& { return o.wait_timeout; },
      {.unit = "ms",
       .min = 1,
       .meaning = "Upper bound on any wait in the engine: a block that does not arrive fails "
                  "with an error instead of hanging."}));
  rows.push_back(option_row(
      kEngine, "trace_capacity", [](auto& o) -> auto& { return o.trace_capacity; },
      {.meaning = "Spans kept in the trace ring; older spans are overwritten and counted as "
                  "dropped."}));
  rows.push_back(option_row(
      kEngine, "check_invariants", [](auto& o) -> auto& { return o.check_invariants; },
      {.config_field = "debug_mode",
       .meaning =
           "After every `acquire`, `release` and `prefetch`, check the engine's invariants — "
           "device bytes in use (and their peak) within the budget, no place with negative "
           "pins, every filling, ready or failed place holding a block that maps back to it, "
           "resident blocks only in their own place, hit/miss and prefetch counters consistent "
           "— and throw an error naming the call, the block and the broken invariant "
           "(`TensorStreamError` in Python). One pass over the places per call, under the "
           "engine's lock: for debugging; `stats()` counts the checks (`invariant_checks`)."}));

  // ---- I/O (IoOptions, as flat keys of the options dict) ----
  rows.push_back(option_row(
      kIo, "num_threads", [](auto& o) -> auto& { return o.io.num_threads; },
      {.min = 1,
       .max = 64,
       .clamped = true,
       .config_field = "num_io_threads",
       .meaning = "Worker threads of the pread and mmap backends: more keep more requests in "
                  "flight on drives that need a deep queue, at the cost of stacks and "
                  "wake-ups. With GPUDirect Storage, the `cuFileRead` requests of one block run "
                  "on up to this many threads."}));
  rows.push_back(option_row(
      kIo, "request_size", [](auto& o) -> auto& { return o.io.request_size; },
      {.unit = "bytes",
       .min = 4 * kMiB,
       .max = 16 * kMiB,
       .clamped = true,
       .meaning = "Reads are split at this size (rounded down to a multiple of 4096): larger "
                  "means fewer system calls, smaller lets a demanded read overtake prefetches "
                  "sooner. GPUDirect Storage splits its `cuFileRead`s the same way."}));
  rows.push_back(option_row(
      kIo, "queue_depth", [](auto& o) -> auto& { return o.io.queue_depth; },
      {.min = 1,
       .max = 1024,
       .clamped = true,
       .meaning = "Requests in flight per backend (io_uring: the ring's depth; pread and mmap: "
                  "also bounded by `num_threads`)."}));
  rows.push_back(option_row(
      kIo, "direct", [](auto& o) -> auto& { return o.io.direct; },
      {.meaning = "Use O_DIRECT where the file system allows it (bypasses the page cache, so a "
                  "cold read is really cold and RAM is not double-used); falls back per file, "
                  "with the reason reported. Ignored by mmap."}));

  // ---- Python (tensorstream.Config fields that act in Python) ----
  rows.push_back(plain_row(
      kPython, "storage_path", SettingKind::kPath, std::monostate{},
      {.env = "TENSORSTREAM_STORAGE_PATH",
       .config_field = "storage_path",
       .default_text = "`$TENSORSTREAM_STORAGE_PATH`, else `$XDG_CACHE_HOME/tensorstream` "
                       "(`~/.cache/tensorstream`)",
       .meaning = "Where stores live (`offload` writes `<fingerprint>.tstore` there; "
                  "`from_pretrained` its converted stores). Stored absolute, `~` expanded; "
                  "constructing a Config never creates it (`create_default_config` does). An "
                  "empty variable counts as unset."}));
  rows.push_back(plain_row(
      kPython, "vram_budget_gb", SettingKind::kInteger, std::monostate{},
      {.unit = "GB",
       .env = "TENSORSTREAM_VRAM_BUDGET",
       .config_field = "vram_budget_gb",
       .config_note = "gives `device_budget`",
       .default_text = "`$TENSORSTREAM_VRAM_BUDGET`, else automatic",
       .meaning = "The weight budget on the compute device (on `device=\"cpu\"`: weight bytes "
                  "held in RAM at once), in GB as a number or a size string (`\"6GB\"`, "
                  "`\"512MiB\"`); must be > 0. Automatic: a share of the device's free memory "
                  "(CUDA) or of the available RAM (CPU) when the engine starts, as "
                  "`memory_pressure_mode` says. The environment variable takes the same "
                  "forms; an empty one counts as unset."}));
  rows.push_back(plain_row(
      kPython, "memory_pressure_mode", SettingKind::kChoice, std::string("balanced"),
      {.config_field = "memory_pressure_mode",
       .meaning =
           "What the streamed model does when torch runs out of memory "
           "(`torch.OutOfMemoryError`, or a CPU \"can't allocate memory\") during its forward, "
           "and how much headroom the automatic budget leaves. `conservative`: automatic budget "
           "60% of free GPU memory / 1/8 of available RAM; on out-of-memory the weight budget "
           "shrinks to half (at least the minimum that works: resident blocks become streamed, "
           "their memory goes to activations) and the forward runs again, up to twice per "
           "call. `balanced`: 80% / 1/4; shrinks to three quarters, once. `aggressive`: 90% / "
           "1/2; never demotes, the error reaches the caller. Every case reaches the "
           "`set_memory_pressure_callback` function with `action` (\"demoted\" or \"raised: "
           "why\") and `new_budget`. A retry first cuts the KV cache back to its length before "
           "the failed attempt (transformers dynamic cache layers; static layers need "
           "nothing); a forward with a cache it cannot restore is not retried. No retry while "
           "other threads run forwards on the same model."},
      {"conservative", "balanced", "aggressive"}));
  rows.push_back(plain_row(
      kPython, "min_layer_size", SettingKind::kInteger, std::uint64_t{1 * kMiB},
      {.unit = "bytes",
       .config_field = "min_layer_size",
       .meaning = "Modules whose own parameters are smaller than this stay resident (unless "
                  "they are layers of an `nn.ModuleList` of two or more modules of one class, "
                  "which always stream). Bytes, or a size string."}));
  rows.push_back(plain_row(
      kPython, "dtype", SettingKind::kChoice, std::monostate{},
      {.config_field = "dtype",
       .default_text = "unset (keep each weight's dtype)",
       .meaning = "Converts the streamed weights to this dtype when the store is written "
                  "(`offload`) or converted (`from_pretrained`: then a store is written, "
                  "converted one tensor at a time). Also `torch.float16` / `torch.bfloat16`, "
                  "`\"fp16\"`, `\"bf16\"`."},
      {"float16", "bfloat16"}));
  rows.push_back(plain_row(
      kPython, "compression_enabled", SettingKind::kBool, false,
      {.config_field = "compression_enabled",
       .meaning = "Write the stores losslessly compressed (byte planes + zstd in 1 MiB chunks, "
                  "`docs/store-format.md`): `offload` writes `<fingerprint>.z<level>.tstore`, "
                  "`from_pretrained` converts the streamed tensors into a compressed store "
                  "(instead of streaming the checkpoint in place). The engine decodes each "
                  "unit on its fill path, chunks in parallel (`decode_threads`): about 1.46x "
                  "fewer bytes to read for bf16 weights, 1.19x for fp16/fp32, at about 1.9 GB/s "
                  "of decoding per core; it pays where storage is slower than decoding "
                  "(`docs/benchmarks.md`). The engine's `decode_note` says how compressed units "
                  "are read. Refused in a build without zstd."}));
  rows.push_back(plain_row(
      kPython, "compression_level", SettingKind::kInteger,
      std::uint64_t{static_cast<std::uint64_t>(codec::kDefaultLevel)},
      {.min = static_cast<std::uint64_t>(codec::kMinLevel),
       .max = static_cast<std::uint64_t>(codec::kMaxLevel),
       .config_field = "compression_level",
       .meaning = "The writer's compression level with `compression_enabled`: 1 tries zstd "
                  "level 1 on every chunk, 2..9 also a stronger zstd level (2, 3, 5, 7, 9, 12, "
                  "15, 19), keeping the smaller. On weights the ratio hardly changes with the "
                  "level, writing time does (level 9: ~7 MB/s per core); reading speed does "
                  "not depend on it (`docs/store-format.md`, \"Compression levels\")."}));
  rows.push_back(plain_row(
      kPython, "debug_mode", SettingKind::kBool, false,
      {.config_field = "debug_mode",
       .meaning =
           "Debugging aid. On: the `tensorstream` logger is set to DEBUG (with a stderr handler "
           "if it has none), the forward hooks log every acquire of a streamed block (ready, "
           "or stalled waiting for its fill, with the time it took) and every release (with "
           "the time the block was held), and the engine checks its invariants after every "
           "call (`check_invariants`). Costs two statistics reads per acquire and a pass over "
           "the engine's places per call; off, the hooks take their usual path."}));

  // ---- environment (read by the shims; cuFile's own) ----
  rows.push_back(plain_row(
      kEnvironment, cuda::kCudaLibraryEnv, SettingKind::kPath, std::monostate{},
      {.env = cuda::kCudaLibraryEnv,
       .default_text = "unset (`libcuda.so.1`)",
       .meaning =
           "Path of the CUDA driver library to load instead of `libcuda.so.1` (found through "
           "the dynamic loader's search path), read once per process. For a driver installed "
           "outside that path, and for the tests, which point it at stand-in drivers built "
           "with them (`tests/cpp/fake_cuda_driver.cpp`). Entry points are resolved with the "
           "driver's `cuGetProcAddress` for the CUDA version each call was written against "
           "(dlsym of the exported symbols on drivers without it); a missing optional one "
           "switches off only its feature (event timing, page-locking existing host memory, "
           "error strings), listed by `tensorstream doctor` and "
           "`cuda_driver_status()[\"disabled\"]`."}));
  rows.push_back(plain_row(
      kEnvironment, cuda::kCufileLibraryEnv, SettingKind::kPath, std::monostate{},
      {.env = cuda::kCufileLibraryEnv,
       .default_text = "unset (`libcufile.so.0`, then `libcufile.so`)",
       .meaning = "Path of the cuFile library to load; when set, only that file is tried (and "
                  "its loader error reported). Unset: `libcufile.so.0`, then `libcufile.so`, "
                  "through the dynamic loader's search path. The PyPI wheel `nvidia-cufile` "
                  "ships one in `site-packages/nvidia/cu13/lib/`."}));
  rows.push_back(plain_row(kEnvironment, cuda::kCufileLogfileEnv, SettingKind::kPath,
                           std::string("./cufile.log"),
                           {.env = cuda::kCufileLogfileEnv,
                            .meaning = "cuFile's own setting: where cuFile writes its log once "
                                       "its driver is opened."}));
  rows.push_back(plain_row(kEnvironment, cuda::kCufileConfigEnv, SettingKind::kPath,
                           std::string("/etc/cufile.json"),
                           {.env = cuda::kCufileConfigEnv,
                            .meaning = "cuFile's own setting: its configuration file (e.g. "
                                       "`allow_compat_mode`)."}));

  for (auto& row : rows) {
    if (row.default_text.empty()) row.default_text = setting_value_text(row, row.default_value);
  }
  return rows;
}

std::string human_bytes(std::uint64_t n) {
  if (n == 0) return "0";
  if (n == 1) return "1 byte";
  for (const auto& [shift, unit] :
       {std::pair{40, "TiB"}, std::pair{30, "GiB"}, std::pair{20, "MiB"}, std::pair{10, "KiB"}}) {
    const std::uint64_t scale = std::uint64_t{1} << shift;
    if (n % scale == 0) return concat(n / scale, " ", unit);
  }
  return concat(n, " bytes");
}

// The kind a value of `setting` must have, for messages.
std::string_view expected_of(const Setting& setting) {
  switch (setting.kind) {
    case SettingKind::kBool:
      return "true or false";
    case SettingKind::kInteger:
      return "a non-negative integer";
    case SettingKind::kChoice:
    case SettingKind::kText:
    case SettingKind::kPath:
      return "a string";
  }
  return "";
}

bool kind_matches(const Setting& setting, const SettingValue& value) {
  if (std::holds_alternative<std::monostate>(value)) return setting.optional;
  switch (setting.kind) {
    case SettingKind::kBool:
      return std::holds_alternative<bool>(value);
    case SettingKind::kInteger:
      return std::holds_alternative<std::uint64_t>(value);
    case SettingKind::kChoice:
    case SettingKind::kText:
    case SettingKind::kPath:
      return std::holds_alternative<std::string>(value);
  }
  return false;
}

}  // namespace

std::string_view setting_scope_name(SettingScope scope) noexcept {
  switch (scope) {
    case SettingScope::kEngine:
      return "engine";
    case SettingScope::kIo:
      return "io";
    case SettingScope::kPython:
      return "python";
    case SettingScope::kEnvironment:
      return "environment";
  }
  return "";
}

std::string_view setting_kind_name(SettingKind kind) noexcept {
  switch (kind) {
    case SettingKind::kBool:
      return "bool";
    case SettingKind::kInteger:
      return "integer";
    case SettingKind::kChoice:
      return "choice";
    case SettingKind::kText:
      return "text";
    case SettingKind::kPath:
      return "path";
  }
  return "";
}

const std::vector<Setting>& settings() {
  static const std::vector<Setting> table = build_table();
  return table;
}

const Setting* find_setting(std::string_view name) noexcept {
  for (const auto& row : settings()) {
    if (row.name == name) return &row;
  }
  return nullptr;
}

const std::string& option_names() {
  static const std::string names = [] {
    std::string out;
    for (const auto& row : settings()) {
      if (!row.is_option()) continue;
      out += concat(out.empty() ? "" : ", ", row.name);
    }
    return out;
  }();
  return names;
}

void apply_setting(EngineOptions& options, std::string_view name, const SettingValue& value) {
  const Setting* row = find_setting(name);
  TS_EXPECT(row != nullptr && row->is_option(), std::invalid_argument, "unknown engine option '",
            name, "'; known options: ", option_names());
  TS_EXPECT(kind_matches(*row, value), std::invalid_argument, "engine option '", name,
            "': expected ", expected_of(*row), row->optional ? " or unset" : "", ", got ",
            std::holds_alternative<std::monostate>(value) ? "unset" : "a value of another kind");
  if (const auto* n = std::get_if<std::uint64_t>(&value); n != nullptr && !row->clamped) {
    TS_EXPECT(!row->min || *n >= *row->min, std::invalid_argument, "engine option '", name,
              "': ", *n, " is below the minimum of ", *row->min);
    TS_EXPECT(!row->max || *n <= *row->max, std::invalid_argument, "engine option '", name,
              "': ", *n, " is above the maximum of ", *row->max);
  }
  try {
    row->set(options, value);
  } catch (const std::invalid_argument& e) {
    // The parse functions name the value; say which key it was given for.
    const std::string_view what = e.what();
    if (what.rfind("engine option '", 0) == 0) throw;
    throw std::invalid_argument(concat("engine option '", name, "': ", what));
  }
}

std::string setting_value_text(const Setting& setting, const SettingValue& value) {
  if (std::holds_alternative<std::monostate>(value)) return "unset";
  if (const auto* b = std::get_if<bool>(&value)) return *b ? "true" : "false";
  if (const auto* s = std::get_if<std::string>(&value)) return *s;
  const auto n = std::get<std::uint64_t>(value);
  if (setting.unit == "bytes") return human_bytes(n);
  if (setting.unit.empty()) return concat(n);
  return concat(n, " ", setting.unit);
}

const std::vector<StructuralOption>& structural_options() {
  static const std::vector<StructuralOption> options{
      {"device_memory",
       "`_core.Engine(path, options, allocate, release)`; C++: `EngineOptions::device_memory`",
       "Caller-provided memory for slots and resident buffers (Python: torch's allocator, so "
       "one allocator sees all device memory). Unset: the engine allocates them itself."},
      {"env", "C++ only: `EngineOptions::env`",
       "How the engine reaches the operating system (opening files, running requests); "
       "`io::Env::posix()` by default. Tests wrap it to inject faults."},
      {"groups",
       "`_core.Engine(..., groups=)`, `_core.Engine.from_safetensors(..., groups=)`; C++: "
       "`Engine::from_store`, `Engine::from_safetensors`",
       "Which tensors form each unit (block), in run order; default: a store's blocks, or a "
       "checkpoint's tensors grouped by layer from the names."},
      {"unit_needs", "options key `unit_needs` (list of int); C++: `EngineOptions::unit_needs`",
       "Per unit, the bytes that must be in the arena at once while it is used (0: its size): "
       "more for a module's weights held while its children's load, less for a table read by "
       "rows."},
      {"unit_partial",
       "options key `unit_partial` (list of bool); C++: "
       "`EngineOptions::unit_partial`",
       "Per unit, whether it is used by parts (rows): streaming it then moves only what is asked "
       "for, so the plan makes it resident last."},
      {"unit_use_rate",
       "options key `unit_use_rate` (list of float); C++: `EngineOptions::unit_use_rate`",
       "Per unit, the share of passes expected to use it, in (0, 1] (default 1). Below 1 the unit "
       "is routed (an expert): kept out of the learned order, its actual rate learned, its cached "
       "place kept by that rate; not made resident unless every unit is (the arena caches it)."},
      {"memory_stream",
       "options key `memory_stream` (a CUstream as int); C++: "
       "`EngineOptions::memory_stream`",
       "A GPU with caller-provided memory: the stream its previous owner (torch's allocator: the "
       "stream current when it allocated) may still have work on; the first write of any byte "
       "waits for it. Default: the legacy stream."},
  };
  return options;
}

}  // namespace tensorstream
