// `tensorstream bench-io`: how fast each I/O backend streams a store into host memory, next
// to what the hardware does without TensorStream (a plain O_DIRECT read loop, and fio), and,
// with a device, how fast the engine fills it: on a GPU both through pinned host memory
// (gds=off) and with GPUDirect Storage (gds=on; when it cannot run, the row says why).
//
// Honest numbers: every figure is a measured wall time over bytes that were really read.
// Runs are cold by default (the store's pages are dropped from the page cache before each
// one; O_DIRECT reads bypass the cache anyway, the drop matters for mmap and buffered
// fallbacks). Measurements are interleaved across repeats, so a virtual disk whose speed
// drifts affects every row alike, and the median of the repeats is reported.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <iomanip>
#include <map>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "cli.hpp"
#include "cli_util.hpp"
#include "commands.hpp"
#include "tensorstream/convert.hpp"
#include "tensorstream/detail/json.hpp"
#include "tensorstream/detail/json_writer.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/engine/residency.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/io/aligned_buffer.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"
#include "tensorstream/store.hpp"

extern char** environ;

namespace tensorstream::cli {
namespace {

using tensorstream::detail::concat;
using util::fixed;
using util::human_bytes;
using util::json_number;
namespace json = tensorstream::detail::json;

constexpr const char* kBenchUsage =
    "usage: tensorstream bench-io STORE [options]\n"
    "       tensorstream bench-io --make-store PATH --size-gb N [--block-mb M]\n"
    "\n"
    "Streams every block of STORE with each I/O backend into page-aligned host buffers and\n"
    "reports GB/s beside a plain single-threaded O_DIRECT read of the same bytes and fio.\n"
    "\n"
    "  --backends LIST      comma-separated: pread,io_uring,mmap (default: all three)\n"
    "  --repeat N           runs per measurement, interleaved; the median is reported (3)\n"
    "  --device DEV         also stream through the Engine to cpu | cuda | cuda:N | none\n"
    "                       (default cpu); on a GPU, also pinned host-to-device bandwidth\n"
    "                       and the engine with GPUDirect Storage (gds=on) where it works\n"
    "  --threads N          I/O threads of the pread backend (engine default: 4)\n"
    "  --request-size MiB   request size, 4..16 (engine default: 8)\n"
    "  --queue-depth N      requests in flight per backend (engine default: 16)\n"
    "  --in-flight N        blocks submitted ahead by the benchmark loop (4)\n"
    "  --no-fio             do not run fio\n"
    "  --warm               keep the page cache (default: drop the store's pages before\n"
    "                       each run; O_DIRECT reads bypass the cache anyway)\n"
    "  --huge-pages         back the benchmark's read buffers with transparent huge pages\n"
    "                       (madvise); the engine's own buffers are not affected\n"
    "  --json               print one JSON object instead of the table\n"
    "  --json-out FILE      print the table and also write the JSON object to FILE\n"
    "  --make-store PATH    write a store of pseudo-random blocks (--size-gb N total,\n"
    "                       --block-mb M per block, default 256) for benchmarking, and exit\n";

constexpr std::size_t kReferenceRequest = std::size_t{8} << 20;
constexpr std::size_t kH2DChunk = std::size_t{256} << 20;
constexpr int kH2DCopies = 8;

struct Options {
  std::filesystem::path store;
  std::vector<io::BackendType> backends{io::BackendType::kPread, io::BackendType::kIoUring,
                                        io::BackendType::kMmap};
  unsigned repeat = 3;
  std::string device = "cpu";  // "none": no engine measurement
  io::IoOptions io;
  unsigned in_flight = 4;
  bool fio = true;
  bool warm = false;
  bool huge_pages = false;
  bool json = false;
  std::filesystem::path json_out;
  std::filesystem::path make_store;
  double size_gb = 0;
  std::uint64_t block_mb = 256;
};

Options parse_options(const std::vector<std::string>& args) {
  Options o;
  std::vector<std::string> positional;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw util::UsageError(a + ": missing value");
      return args[++i];
    };
    if (a == "--backends") {
      o.backends.clear();
      std::stringstream list(value());
      std::string name;
      while (std::getline(list, name, ',')) {
        const auto type = io::parse_backend_type(name);
        if (!type || *type == io::BackendType::kAuto) {
          throw util::UsageError("--backends: unknown backend '" + name +
                                 "' (expected pread, io_uring, mmap)");
        }
        if (std::find(o.backends.begin(), o.backends.end(), *type) == o.backends.end()) {
          o.backends.push_back(*type);
        }
      }
      if (o.backends.empty()) throw util::UsageError("--backends: empty list");
    } else if (a == "--repeat") {
      o.repeat = static_cast<unsigned>(util::parse_uint(a, value(), 1, 1000));
    } else if (a == "--device") {
      o.device = value();
      const bool ok =
          o.device == "cpu" || o.device == "none" || o.device == "cuda" ||
          (o.device.rfind("cuda:", 0) == 0 && o.device.size() > 5 && o.device.size() < 10 &&
           std::all_of(o.device.begin() + 5, o.device.end(),
                       [](char c) { return c >= '0' && c <= '9'; }));
      if (!ok) {
        throw util::UsageError("--device: expected cpu, cuda, cuda:N or none, got '" + o.device +
                               "'");
      }
    } else if (a == "--threads") {
      o.io.num_threads = static_cast<unsigned>(util::parse_uint(a, value(), 1, 64));
    } else if (a == "--request-size") {
      o.io.request_size = static_cast<std::size_t>(util::parse_uint(a, value(), 4, 16)) << 20;
    } else if (a == "--queue-depth") {
      o.io.queue_depth = static_cast<unsigned>(util::parse_uint(a, value(), 1, 1024));
    } else if (a == "--in-flight") {
      o.in_flight = static_cast<unsigned>(util::parse_uint(a, value(), 1, 64));
    } else if (a == "--no-fio") {
      o.fio = false;
    } else if (a == "--warm") {
      o.warm = true;
    } else if (a == "--huge-pages") {
      o.huge_pages = true;
    } else if (a == "--json") {
      o.json = true;
    } else if (a == "--json-out") {
      o.json_out = value();
    } else if (a == "--make-store") {
      o.make_store = value();
    } else if (a == "--size-gb") {
      o.size_gb = util::parse_positive(a, value());
    } else if (a == "--block-mb") {
      o.block_mb = util::parse_uint(a, value(), 1, 1u << 16);
    } else if (a.size() > 1 && a[0] == '-') {
      throw util::UsageError("unknown option '" + a + "'");
    } else {
      positional.push_back(a);
    }
  }
  if (!o.make_store.empty()) {
    if (!positional.empty()) throw util::UsageError("--make-store takes no STORE argument");
    if (o.size_gb <= 0) throw util::UsageError("--make-store needs --size-gb N");
    return o;
  }
  if (positional.size() != 1) throw util::UsageError("expected exactly one STORE");
  o.store = positional[0];
  return o;
}

// ---- --make-store -------------------------------------------------------------------------

int make_store(const Options& o, std::ostream& out, std::ostream& err) {
  const auto total = static_cast<std::uint64_t>(o.size_gb * 1e9);
  const std::uint64_t block = o.block_mb << 20;
  const std::uint64_t blocks = std::max<std::uint64_t>(1, (total + block - 1) / block);
  err << "writing " << o.make_store.string() << ": " << blocks << " blocks of "
      << human_bytes(block) << " (pseudo-random bf16)...\n";
  const auto start = std::chrono::steady_clock::now();
  StoreWriter writer(o.make_store);
  std::vector<std::byte> chunk(std::size_t{8} << 20);
  for (std::uint64_t b = 0; b < blocks; ++b) {
    const std::uint64_t size = std::min(block, total - std::min(total, b * block));
    const std::uint64_t bytes = std::max<std::uint64_t>(size / 2 * 2, 2);
    const std::string name = concat("layers.", b);
    writer.begin_block(name);
    const std::int64_t shape[] = {static_cast<std::int64_t>(bytes / 2)};
    writer.begin_tensor(name + ".weight", DType::kBFloat16, shape);
    for (std::uint64_t done = 0; done < bytes;) {
      const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), bytes - done));
      util::fill_pseudo_random({chunk.data(), n}, b * 1'000'003 + done);
      writer.append({chunk.data(), n});
      done += n;
    }
    writer.end_tensor();
    writer.end_block();
  }
  writer.set_user_metadata("{\"generator\":\"tensorstream bench-io --make-store\"}");
  const auto summary = writer.commit();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out << "wrote " << o.make_store.string() << ": " << summary.block_count << " blocks, "
      << human_bytes(summary.file_size) << " in " << fixed(seconds, 1) << " s\n";
  return kExitOk;
}

// ---- measurements -------------------------------------------------------------------------

struct Run {
  std::uint64_t bytes = 0;
  double seconds = 0;
  [[nodiscard]] double gbps() const {
    return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0;
  }
};

// One row of the results: a backend, a reference or the engine.
struct Measurement {
  explicit Measurement(std::string name) : label(std::move(name)) {}

  std::string label;
  bool skipped = false;  // not usable here: `note` says why
  std::vector<Run> runs;
  bool direct = false;
  std::string note;
  std::vector<std::pair<std::string, std::string>> extra;  // more JSON members (raw values)
  // Reads the block device completed during this row's runs (device-wide counters).
  std::uint64_t disk_reads = 0;
  std::uint64_t disk_sectors = 0;

  [[nodiscard]] double disk_avg_request_kib() const {
    return disk_reads > 0
               ? static_cast<double>(disk_sectors) * 512 / 1024 / static_cast<double>(disk_reads)
               : 0;
  }

  // The run with the median time (runs of one measurement read the same bytes).
  [[nodiscard]] Run median() const {
    if (runs.empty()) return {};
    std::vector<Run> sorted = runs;
    std::sort(sorted.begin(), sorted.end(),
              [](const Run& a, const Run& b) { return a.seconds < b.seconds; });
    return sorted[sorted.size() / 2];
  }
  [[nodiscard]] bool measured() const { return !skipped && !runs.empty(); }
  void add_note(const std::string& text) {
    if (text.empty() || note.find(text) != std::string::npos) return;
    note += (note.empty() ? "" : "; ") + text;
  }
};

struct Context {
  const Options& options;
  const Store& store;
  std::uint64_t block_bytes = 0;  // sum of stored sizes
  std::uint64_t range_begin = 0;  // byte range covering every block
  std::uint64_t range_end = 0;
  std::vector<io::AlignedBuffer> ring;
};

// Before a measured run: drop the store's pages (cold) and say if that did not work.
void prepare_run(const Context& c, Measurement& m) {
  if (c.options.warm) return;
  if (const auto problem = util::drop_page_cache(c.store.path())) {
    m.add_note("page cache not dropped: " + *problem);
    return;
  }
  const auto cached = util::cached_fraction(c.store.path());
  if (cached && *cached > 0.01) {
    m.add_note(concat(fixed(*cached * 100, 0),
                      "% of the store stayed in the page cache after "
                      "the drop (mapped elsewhere?): not fully cold"));
  }
}

void measure_backend(Context& c, io::BackendType type, Measurement& m) {
  if (m.skipped) return;
  std::unique_ptr<io::Backend> backend;
  try {
    backend = io::make_backend(type, c.options.io);
  } catch (const std::exception& e) {
    m.skipped = true;
    m.note = std::string("not usable here: ") + e.what();
    return;
  }
  const io::FileId file = backend->open(c.store.path());
  prepare_run(c, m);
  const auto& blocks = c.store.blocks();
  const std::size_t ring = c.ring.size();
  std::vector<io::ReadTicket> tickets(ring);
  std::size_t next = 0;
  auto submit = [&](std::size_t slot) {
    const auto& b = blocks[next++];
    tickets[slot] = backend->submit(file, b.offset, b.stored_size, c.ring[slot].span());
  };
  std::uint64_t bytes = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t slot = 0; slot < ring && next < blocks.size(); ++slot) submit(slot);
  // Block i lives in slot i % ring: waiting slot by slot is waiting in block order, and each
  // freed slot is refilled at once, so `ring` blocks stay in flight.
  for (std::size_t done = 0; done < blocks.size(); ++done) {
    const std::size_t slot = done % ring;
    bytes += tickets[slot].wait().size();
    if (next < blocks.size()) submit(slot);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  m.runs.push_back({bytes, seconds});
  const auto stats = backend->stats();
  if (type == io::BackendType::kMmap) {
    m.direct = false;
    m.add_note("copies out of the page cache (O_DIRECT does not apply)");
  } else {
    m.direct = stats.reads_direct > 0 && stats.reads_buffered == 0;
    for (const auto& f : stats.files) {
      if (f.id == file) m.add_note(f.direct_note);
    }
  }
  backend->close(file);
}

void measure_odirect(const Context& c, Measurement& m) {
  prepare_run(c, m);
  // Into the memory the backends read into: on some devices the physical layout of the
  // destination decides how large the device's requests are (see docs/benchmarks.md).
  const auto r = util::read_sequential(c.store.path(), c.range_begin, c.range_end - c.range_begin,
                                       kReferenceRequest, c.ring.front().span());
  m.runs.push_back({r.bytes, r.seconds});
  m.direct = r.direct;
  m.add_note(r.note);
}

// ---- fio ----------------------------------------------------------------------------------

struct ProcessResult {
  bool started = false;
  std::string spawn_error;
  bool timed_out = false;
  int status = 0;
  std::string out;
  std::string err;
};

// Runs argv[0] (searched on PATH) with stdout and stderr captured, killing it after
// `timeout`.
ProcessResult run_process(const std::vector<std::string>& argv, std::chrono::seconds timeout) {
  ProcessResult r;
  int out_pipe[2];
  int err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
    r.spawn_error = std::strerror(errno);
    return r;
  }
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
    r.spawn_error = std::strerror(errno);
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    return r;
  }
  posix_spawn_file_actions_t actions;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_adddup2(&actions, out_pipe[1], STDOUT_FILENO);
  ::posix_spawn_file_actions_adddup2(&actions, err_pipe[1], STDERR_FILENO);
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawnp(&pid, cargv[0], &actions, nullptr, cargv.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (rc != 0) {
    r.spawn_error = std::strerror(rc);
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    return r;
  }
  r.started = true;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  int open_count = 2;
  char buf[65536];
  while (open_count > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    const int n = ::poll(fds, 2, static_cast<int>(std::min<long long>(left.count(), 1000)));
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      const ssize_t got = ::read(fds[i].fd, buf, sizeof buf);
      if (got > 0) {
        sinks[i]->append(buf, static_cast<std::size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_count;
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) ::close(f.fd);
  }
  while (::waitpid(pid, &r.status, 0) == -1 && errno == EINTR) {
  }
  return r;
}

std::uint64_t json_uint(const json::Value* v) {
  if (v == nullptr) return 0;
  if (const auto* i = std::get_if<json::Integer>(&v->data)) return i->negative ? 0 : i->magnitude;
  if (const auto* d = std::get_if<double>(&v->data))
    return *d > 0 ? static_cast<std::uint64_t>(*d) : 0;
  return 0;
}

std::string last_line(const std::string& text) {
  std::string t = text;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  const auto pos = t.rfind('\n');
  return pos == std::string::npos ? t : t.substr(pos + 1);
}

// One fio run over the store's block range. On failure the measurement keeps no run and
// its note says why; `engine` is the ioengine that worked (tried in order, once).
void measure_fio(const Context& c, Measurement& m, std::string& engine, bool direct) {
  std::string path = c.store.path().string();
  std::string escaped;  // fio splits file names at ':'
  for (char ch : path) {
    if (ch == ':') escaped += '\\';
    escaped += ch;
  }
  const std::uint64_t size = c.range_end - c.range_begin;
  const std::uint64_t bs = std::max<std::uint64_t>(
      kIoAlignment, std::min<std::uint64_t>(kReferenceRequest, size / kIoAlignment * kIoAlignment));
  const auto timeout = std::chrono::seconds(60 + size / 50'000'000);
  const std::vector<std::string> engines = engine.empty()
                                               ? std::vector<std::string>{"libaio", "io_uring"}
                                               : std::vector<std::string>{engine};
  std::string failure;
  for (const auto& e : engines) {
    prepare_run(c, m);
    const std::vector<std::string> argv = {"fio",
                                           "--name=ref",
                                           "--filename=" + escaped,
                                           "--readonly",
                                           concat("--direct=", direct ? 1 : 0),
                                           "--rw=read",
                                           concat("--bs=", bs),
                                           "--iodepth=16",
                                           "--ioengine=" + e,
                                           concat("--offset=", c.range_begin),
                                           concat("--size=", size),
                                           "--output-format=json"};
    const auto r = run_process(argv, timeout);
    if (!r.started) {
      m.skipped = true;
      m.note = "fio not run: " + r.spawn_error + " (is fio installed and on PATH?)";
      return;
    }
    if (r.timed_out) {
      failure = concat("fio (", e, ") timed out after ", timeout.count(), " s");
      continue;
    }
    const auto brace = r.out.find('{');  // fio may print notes before its JSON
    const auto close = r.out.rfind('}');
    if (!WIFEXITED(r.status) || WEXITSTATUS(r.status) != 0 || brace == std::string::npos ||
        close == std::string::npos || close < brace) {
      failure = concat("fio (", e, ") failed: ", last_line(r.err.empty() ? r.out : r.err));
      continue;
    }
    try {
      const auto doc =
          json::parse(std::string_view(r.out).substr(brace, close - brace + 1), "fio output");
      const auto* jobs = doc.find("jobs");
      if (jobs == nullptr || !jobs->is_array() || std::get<json::Array>(jobs->data).empty()) {
        failure = "fio output has no jobs";
        continue;
      }
      const auto& job = std::get<json::Array>(jobs->data).front();
      const auto* read = job.find("read");
      const std::uint64_t bw = json_uint(read ? read->find("bw_bytes") : nullptr);
      const std::uint64_t io_bytes = json_uint(read ? read->find("io_bytes") : nullptr);
      const std::uint64_t runtime_ms = json_uint(read ? read->find("runtime") : nullptr);
      if (json_uint(job.find("error")) != 0 || bw == 0 || io_bytes == 0) {
        failure = concat("fio (", e, ") reported no bandwidth (error ",
                         json_uint(job.find("error")), ")");
        continue;
      }
      // fio's own bandwidth (bytes over its runtime) decides the seconds we report.
      m.runs.push_back({io_bytes, static_cast<double>(io_bytes) / static_cast<double>(bw)});
      m.direct = direct;
      engine = e;
      m.label = "fio (" + e + ")";
      m.extra = {{"ioengine", json::quote(e)},
                 {"bs", std::to_string(bs)},
                 {"iodepth", "16"},
                 {"runtime_ms", std::to_string(runtime_ms)},
                 {"command", json::quote([&] {
                    std::string s;
                    for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
                    return s;
                  }())}};
      if (!direct) m.add_note("buffered (--direct=0): O_DIRECT refused on this file system");
      return;
    } catch (const std::exception& ex) {
      failure = concat("fio output unreadable: ", ex.what());
    }
  }
  m.add_note(failure);
}

// ---- device -------------------------------------------------------------------------------

int device_ordinal(const std::string& device) {
  if (device == "cuda") return 0;
  return std::stoi(device.substr(5));
}

void measure_pinned_h2d(const Options& o, Measurement& m) {
  const cuda::Device device(device_ordinal(o.device));
  const cuda::PinnedHostBuffer host(device, kH2DChunk);
  std::memset(host.data(), 1, host.size());
  const cuda::DeviceBuffer dev(device, kH2DChunk);
  const cuda::Stream stream(device);
  const cuda::Event begin(device, cuda::EventKind::kTiming);
  const cuda::Event end(device, cuda::EventKind::kTiming);
  cuda::memcpy_htod_async(device, dev.ptr(), host.data(), host.size(), stream.handle());
  stream.synchronize();  // warm-up: first-touch costs stay out of the timing
  for (unsigned r = 0; r < o.repeat; ++r) {
    begin.record(stream.handle());
    for (int i = 0; i < kH2DCopies; ++i) {
      cuda::memcpy_htod_async(device, dev.ptr(), host.data(), host.size(), stream.handle());
    }
    end.record(stream.handle());
    end.synchronize();
    m.runs.push_back({std::uint64_t{kH2DCopies} * kH2DChunk,
                      static_cast<double>(cuda::elapsed_ms(begin, end)) / 1e3});
  }
  m.direct = true;
  m.extra = {{"chunk_bytes", std::to_string(kH2DChunk)}, {"copies", std::to_string(kH2DCopies)}};
}

// One pass over every block through a fresh Engine (construction not timed). `gds`: kOff
// measures the host path; kOn reads with cuFile and throws from the engine's constructor
// when it cannot (the caller records why).
// `in_place` (device cpu): the engine reads the blocks in place through the page cache
// (backend mmap, no copy) instead of with O_DIRECT into its slots.
void measure_engine(const Context& c, Measurement& m, engine::GdsMode gds = engine::GdsMode::kOff,
                    bool in_place = false) {
  std::vector<std::uint64_t> sizes;
  for (const auto& b : c.store.blocks()) sizes.push_back(b.raw_size);
  engine::EngineOptions eo;
  eo.device = c.options.device;
  eo.device_budget = engine::minimum_budget(sizes, 2) + (std::uint64_t{1} << 20);
  eo.ram_cache_bytes = 0;
  eo.prefetch = engine::PrefetchStrategy::kAdaptive;
  eo.io = c.options.io;
  // The streaming path (O_DIRECT into slots) with the backend AUTO picks for it; on the CPU,
  // AUTO would read a store this small in place through the page cache instead.
  eo.backend =
      in_place ? io::BackendType::kMmap : io::make_backend(io::BackendType::kAuto, eo.io)->type();
  eo.gds = gds;
  std::optional<cuda::Device> device;
  std::optional<cuda::Stream> stream;
  if (c.options.device != "cpu") {
    device.emplace(device_ordinal(c.options.device));
    stream.emplace(*device);
  }
  prepare_run(c, m);
  engine::Engine eng(c.store.path(), eo);
  const cuda::StreamHandle handle = stream ? stream->handle() : nullptr;
  const auto start = std::chrono::steady_clock::now();
  for (std::uint32_t b = 0; b < eng.block_count(); ++b) {
    (void)eng.acquire(b, handle);
    eng.release(b, handle);
  }
  if (stream) stream->synchronize();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto s = eng.stats();
  // In place, pages the drop left in the page cache are not read from storage: count them
  // too (they are few when the drop worked; the note says how many).
  m.runs.push_back({s.bytes_from_storage + s.bytes_from_page_cache, seconds});
  m.direct = gds == engine::GdsMode::kOn || (s.io.reads_direct > 0 && s.io.reads_buffered == 0);
  if (in_place) {
    m.note = concat("in place: mapped, MADV_POPULATE_READ; ", human_bytes(s.bytes_from_page_cache),
                    " were still cached");
  }
  if (gds == engine::GdsMode::kOn) {
    m.add_note("cuFileRead into device memory");
    if (!cuda::cufile_status().nvidia_fs) {
      m.add_note("cuFile in compatibility mode (nvidia-fs not loaded): bounce buffers");
    }
  }
  m.extra = {{"device_budget", std::to_string(eo.device_budget)},
             {"gds", json::quote(engine::gds_mode_name(gds))},
             {"gds_bytes", std::to_string(s.gds_bytes)},
             {"acquires", std::to_string(s.acquires)},
             {"hits", std::to_string(s.device_hits)},
             {"misses", std::to_string(s.device_misses)},
             {"stall_seconds", json_number(s.stall_seconds)},
             {"prefetch", "\"adaptive\""},
             {"ram_tier_bytes", "0"}};
  eng.close();
}

// ---- output -------------------------------------------------------------------------------

std::string ratio_json(double a, double b) { return b > 0 ? json_number(a / b, 4) : "null"; }

// Median over repeats of the ratio of run i of `m` to run i of `ref` (measured moments
// apart): steadier than a ratio of medians on a disk whose speed drifts.
std::string paired_ratio_json(const Measurement& m, const Measurement& ref) {
  if (!ref.measured() || ref.runs.size() != m.runs.size()) return "null";
  std::vector<double> ratios;
  for (std::size_t i = 0; i < m.runs.size(); ++i) {
    if (ref.runs[i].gbps() > 0) ratios.push_back(m.runs[i].gbps() / ref.runs[i].gbps());
  }
  if (ratios.empty()) return "null";
  std::sort(ratios.begin(), ratios.end());
  return json_number(ratios[ratios.size() / 2], 4);
}

// `odirect` / `fio`: the references to compare with (nullptr: no comparison).
std::string measurement_json(const Measurement& m, const Measurement* odirect,
                             const Measurement* fio) {
  if (!m.measured()) return "null";
  const Run med = m.median();
  std::ostringstream s;
  s << "{\"bytes\":" << med.bytes << ",\"seconds\":" << json_number(med.seconds)
    << ",\"gbps\":" << json_number(med.gbps()) << ",\"direct\":" << (m.direct ? "true" : "false")
    << ",\"note\":" << json::quote(m.note) << ",\"runs_gbps\":[";
  for (std::size_t i = 0; i < m.runs.size(); ++i) {
    s << (i ? "," : "") << json_number(m.runs[i].gbps());
  }
  s << "]";
  if (odirect != nullptr) {
    s << ",\"vs_odirect\":" << ratio_json(med.gbps(), odirect->median().gbps())
      << ",\"vs_odirect_paired\":" << paired_ratio_json(m, *odirect);
  }
  if (fio != nullptr && fio->measured()) {
    s << ",\"vs_fio\":" << ratio_json(med.gbps(), fio->median().gbps())
      << ",\"vs_fio_paired\":" << paired_ratio_json(m, *fio);
  }
  if (m.disk_reads > 0) {
    s << ",\"disk_avg_request_kib\":" << json_number(m.disk_avg_request_kib(), 5);
  }
  for (const auto& [k, v] : m.extra) s << "," << json::quote(k) << ":" << v;
  s << "}";
  return s.str();
}

std::string ratio_text(double a, double b) { return b > 0 ? fixed(a / b, 2) + "x" : "-"; }

}  // namespace

int cmd_bench_io(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.size() == 1 && (args[0] == "-h" || args[0] == "--help")) {
    out << kBenchUsage;
    return kExitOk;
  }
  Options o;
  try {
    o = parse_options(args);
  } catch (const util::UsageError& e) {
    err << "tensorstream bench-io: " << e.what() << "\n\n" << kBenchUsage;
    return kExitUsage;
  }
  if (!o.make_store.empty()) return make_store(o, out, err);

  const bool gpu = o.device.rfind("cuda", 0) == 0;
  if (gpu) {
    const auto driver = cuda::driver_status();
    if (!driver.available) {
      err << "tensorstream bench-io: --device " << o.device << ": CUDA is not usable here ("
          << driver.reason << ")\n";
      return kExitFailure;
    }
    if (device_ordinal(o.device) >= driver.device_count) {
      err << "tensorstream bench-io: --device " << o.device << ": only " << driver.device_count
          << " CUDA device(s)\n";
      return kExitFailure;
    }
  }

  const Store store = Store::open(std::filesystem::absolute(resolve_store_path(o.store)));
  const auto& blocks = store.blocks();
  if (blocks.empty()) {
    err << "tensorstream bench-io: " << store.path().string() << " has no blocks\n";
    return kExitFailure;
  }
  Context c{o, store, 0, ~std::uint64_t{0}, 0, {}};
  std::uint64_t capacity = 0;
  for (const auto& b : blocks) {
    c.block_bytes += b.stored_size;
    c.range_begin = std::min(c.range_begin, b.offset);
    c.range_end = std::max(c.range_end, b.offset + b.stored_size);
    capacity = std::max(capacity, io::required_capacity(b.offset, b.stored_size));
  }
  // The ring: `in_flight` buffers of the largest block, at most a quarter of the memory.
  const auto machine = util::machine_info();
  std::uint64_t ring = std::min<std::uint64_t>(o.in_flight, blocks.size());
  if (capacity > 0 && machine.memory_bytes > 0) {
    ring = std::min<std::uint64_t>(ring,
                                   std::max<std::uint64_t>(1, machine.memory_bytes / 4 / capacity));
  }
  for (std::uint64_t i = 0; i < ring; ++i) {
    c.ring.emplace_back(
        static_cast<std::size_t>(std::max<std::uint64_t>(capacity, kReferenceRequest)));
    if (o.huge_pages) {
      // Advice only: THP in "never" mode, or no free huge page, leaves 4 KiB pages.
      (void)::madvise(c.ring.back().data(), c.ring.back().size(), MADV_HUGEPAGE);
    }
    std::memset(c.ring.back().data(), 0, c.ring.back().size());  // fault in before timing
  }
  // Huge pages behind the ring (the whole process's, measured before anything else runs).
  const auto ring_huge_bytes = util::anon_huge_page_bytes();
  if (o.warm) {
    // Load the store into the page cache once, so every run starts warm.
    std::ifstream in(store.path(), std::ios::binary);
    std::vector<char> chunk(kReferenceRequest);
    while (in.read(chunk.data(), static_cast<std::streamsize>(chunk.size())) || in.gcount() > 0) {
    }
  }

  // The rows of the report.
  Measurement odirect{"O_DIRECT read"};
  Measurement fio{"fio"};
  std::vector<Measurement> backends;
  for (auto t : o.backends) backends.emplace_back(std::string(io::backend_name(t)));
  Measurement h2d{"pinned H2D"};
  Measurement device{"engine -> " + o.device};
  Measurement gds{"engine -> " + o.device + " gds"};
  Measurement in_place{"engine -> cpu mapped"};
  std::string fio_engine;
  if (!o.fio) {
    fio.skipped = true;
    fio.note = "not run (--no-fio)";
  }

  if (gpu) {
    try {
      measure_pinned_h2d(o, h2d);
    } catch (const std::exception& e) {
      h2d.skipped = true;
      h2d.note = e.what();
    }
  }
  // Does the store's file system take O_DIRECT? (fio is run with --direct=0 if not.)
  bool direct_ok = true;
  if (const int fd = ::open(store.path().c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC); fd != -1) {
    ::close(fd);
  } else {
    direct_ok = false;
  }

  // Every measurement once per repeat; the order rotates from one repeat to the next so that
  // a disk whose speed drifts (or a rate limiter that refills while idle) favours none.
  struct Task {
    Measurement* row;
    std::function<void()> run;
  };
  std::vector<Task> tasks;
  tasks.push_back({&odirect, [&] { measure_odirect(c, odirect); }});
  if (!fio.skipped) {
    tasks.push_back({&fio, [&] {
                       if (fio.skipped || (fio.runs.empty() && !fio.note.empty())) return;
                       measure_fio(c, fio, fio_engine, direct_ok);
                     }});
  }
  for (std::size_t i = 0; i < backends.size(); ++i) {
    tasks.push_back({&backends[i], [&, i] { measure_backend(c, o.backends[i], backends[i]); }});
  }
  if (o.device != "none") tasks.push_back({&device, [&] { measure_engine(c, device); }});
  if (o.device == "cpu") {
    tasks.push_back({&in_place, [&] {
                       measure_engine(c, in_place, engine::GdsMode::kOff, /*in_place=*/true);
                     }});
  }
  if (gpu) {
    tasks.push_back({&gds, [&] {
                       if (gds.skipped) return;
                       try {
                         measure_engine(c, gds, engine::GdsMode::kOn);
                       } catch (const std::exception& e) {
                         gds.skipped = true;
                         gds.runs.clear();
                         gds.note = std::string("GDS not used: ") + e.what();
                       }
                     }});
  }

  const std::string blockdev = util::block_device_name(store.path());
  for (unsigned r = 0; r < o.repeat; ++r) {
    std::vector<std::size_t> before;
    for (const auto& t : tasks) before.push_back(t.row->runs.size());
    for (std::size_t k = 0; k < tasks.size(); ++k) {
      Task& task = tasks[(k + r) % tasks.size()];
      const auto disk_before = util::block_device_reads(blockdev);
      task.run();
      const auto disk_after = util::block_device_reads(blockdev);
      if (disk_before && disk_after) {
        task.row->disk_reads += disk_after->reads - disk_before->reads;
        task.row->disk_sectors += disk_after->sectors - disk_before->sectors;
      }
    }
    err << "run " << (r + 1) << "/" << o.repeat << ":";
    const char* sep = " ";
    for (std::size_t k = 0; k < tasks.size(); ++k) {
      if (tasks[k].row->runs.size() == before[k]) continue;
      err << sep << tasks[k].row->label << " " << fixed(tasks[k].row->runs.back().gbps(), 2);
      sep = ", ";
    }
    err << " GB/s\n";
  }
  if (!o.fio) {
    fio.note = "not run (--no-fio)";
  } else if (fio.runs.empty() && !fio.skipped) {
    fio.skipped = true;
  }

  const double odirect_gbps = odirect.median().gbps();
  const double fio_gbps = fio.measured() ? fio.median().gbps() : 0;
  // What the hardware path allows: the storage reference that did best (fio's buffers can
  // make it the slower one: see docs/benchmarks.md) and, on a GPU, the pinned H2D link.
  double bound = std::max(fio_gbps, odirect_gbps);
  if (h2d.measured()) bound = std::min(bound, h2d.median().gbps());

  const std::string fs = util::filesystem_name(store.path());

  // JSON
  std::ostringstream j;
  j << "{\"store\":" << json::quote(store.path().string()) << ",\"bytes\":" << c.block_bytes
    << ",\"blocks\":" << blocks.size() << ",\"max_block_bytes\":" << store.max_block_size()
    << ",\"cold\":" << (o.warm ? "false" : "true") << ",\"cold_method\":"
    << json::quote(o.warm ? "none (--warm)"
                          : "fdatasync + posix_fadvise(POSIX_FADV_DONTNEED) on the store before "
                            "each run; O_DIRECT reads bypass the page cache anyway")
    << ",\"repeat\":" << o.repeat << ",\"statistic\":\"median\""
    << ",\"options\":{\"threads\":" << o.io.normalized().num_threads
    << ",\"request_size\":" << o.io.normalized().request_size
    << ",\"queue_depth\":" << o.io.normalized().queue_depth << ",\"in_flight_blocks\":" << ring
    << ",\"huge_pages\":" << (o.huge_pages ? "true" : "false") << ",\"ring_huge_page_bytes\":"
    << (ring_huge_bytes ? std::to_string(*ring_huge_bytes) : std::string("null")) << "}"
    << ",\"machine\":{\"cpus\":" << machine.cpus << ",\"memory_bytes\":" << machine.memory_bytes
    << ",\"kernel\":" << json::quote(machine.kernel)
    << ",\"hostname\":" << json::quote(machine.hostname)
    << ",\"load_average_before\":" << json_number(machine.load_average, 3)
    << ",\"load_average_after\":" << json_number(util::machine_info().load_average, 3)
    << ",\"transparent_hugepages\":" << json::quote(util::transparent_hugepage_mode())
    << ",\"filesystem\":" << json::quote(fs) << ",\"block_device\":" << json::quote(blockdev) << "}"
    << ",\"backends\":{";
  bool first = true;
  for (const auto& b : backends) {
    if (!b.measured()) continue;
    j << (first ? "" : ",") << json::quote(b.label) << ":" << measurement_json(b, &odirect, &fio);
    first = false;
  }
  j << "},\"skipped\":{";
  first = true;
  for (const auto& b : backends) {
    if (b.measured()) continue;
    j << (first ? "" : ",") << json::quote(b.label) << ":" << json::quote(b.note);
    first = false;
  }
  j << "},\"reference\":{\"odirect_read\":" << measurement_json(odirect, nullptr, nullptr)
    << ",\"fio\":" << measurement_json(fio, &odirect, nullptr);
  if (!fio.measured()) j << ",\"fio_note\":" << json::quote(fio.note);
  j << ",\"pinned_h2d\":" << measurement_json(h2d, nullptr, nullptr);
  if (gpu && !h2d.measured()) j << ",\"pinned_h2d_note\":" << json::quote(h2d.note);
  j << "},\"device\":";
  if (device.measured()) {
    j << "{\"name\":" << json::quote(o.device)
      << ",\"engine\":" << measurement_json(device, &odirect, &fio)
      << ",\"bound_gbps\":" << json_number(bound)
      << ",\"vs_bound\":" << ratio_json(device.median().gbps(), bound);
    if (gpu) {
      j << ",\"gds\":{\"used\":" << (gds.measured() ? "true" : "false")
        << ",\"reason\":" << json::quote(gds.measured() ? "" : gds.note)
        << ",\"engine\":" << measurement_json(gds, &odirect, &fio)
        << ",\"vs_bound\":" << (gds.measured() ? ratio_json(gds.median().gbps(), bound) : "null")
        << "}";
    }
    if (in_place.measured()) {
      j << ",\"in_place\":" << measurement_json(in_place, &odirect, &fio);
    }
    j << "}";
  } else {
    j << "null";
  }
  j << "}";

  if (o.json) {
    out << j.str() << "\n";
  } else {
    out << "bench-io " << store.path().string() << ": " << blocks.size() << " blocks, "
        << human_bytes(c.block_bytes) << " (" << c.block_bytes << " bytes), largest "
        << human_bytes(store.max_block_size()) << "\n"
        << "machine: " << machine.cpus << " CPUs, " << human_bytes(machine.memory_bytes) << " RAM, "
        << fs << (blockdev.empty() ? "" : " on " + blockdev) << ", Linux " << machine.kernel
        << ", load average " << fixed(machine.load_average, 2)
        << (machine.load_average > 0.5 * machine.cpus
                ? " (other work is running: expect noisy figures)"
                : "")
        << "\n"
        << (o.warm ? "warm page cache" : "cold: page cache dropped before each run") << "; "
        << o.repeat << " run(s) each, interleaved, median shown; threads "
        << o.io.normalized().num_threads << ", request "
        << human_bytes(o.io.normalized().request_size) << ", queue depth "
        << o.io.normalized().queue_depth << ", " << ring << " block(s) in flight"
        << (o.huge_pages ? concat(", huge pages: ", human_bytes(ring_huge_bytes.value_or(0)),
                                  " of the buffers")
                         : std::string())
        << "\n\n";
    out << std::left << std::setw(20) << "" << std::right << std::setw(12) << "bytes"
        << std::setw(10) << "seconds" << std::setw(9) << "GB/s" << std::setw(12) << "vs O_DIRECT"
        << std::setw(9) << "vs fio" << std::setw(10) << "disk req"
        << "  note\n";
    auto row = [&](const Measurement& m) {
      out << std::left << std::setw(20) << m.label << std::right;
      if (!m.measured()) {
        out << std::setw(12) << "-" << std::setw(10) << "-" << std::setw(9) << "-" << std::setw(12)
            << "-" << std::setw(9) << "-" << std::setw(10) << "-"
            << "  " << m.note << "\n";
        return;
      }
      const Run med = m.median();
      out << std::setw(12) << human_bytes(med.bytes) << std::setw(10) << fixed(med.seconds, 3)
          << std::setw(9) << fixed(med.gbps(), 2) << std::setw(12)
          << ratio_text(med.gbps(), odirect_gbps) << std::setw(9)
          << ratio_text(med.gbps(), fio_gbps) << std::setw(10)
          << (m.disk_reads > 0 ? fixed(m.disk_avg_request_kib(), 0) + " KiB" : std::string("-"))
          << "  " << (m.direct ? "O_DIRECT" : "buffered") << (m.note.empty() ? "" : "; " + m.note)
          << "\n";
    };
    for (const auto& b : backends) row(b);
    out << "-- reference\n";
    row(odirect);
    row(fio);
    if (gpu) row(h2d);
    if (device.measured()) {
      out << "-- engine (budget 2 slots of the largest block, no RAM tier, adaptive prefetch"
          << (gpu ? "; first row gds=off, through pinned host memory" : "") << ")\n";
      row(device);
      out << std::left << std::setw(20) << ""
          << "ratio to min(best storage reference" << (h2d.measured() ? ", pinned H2D" : "")
          << " = " << fixed(bound, 2) << " GB/s): " << ratio_text(device.median().gbps(), bound)
          << "\n";
      if (gpu) row(gds);                       // GPUDirect Storage, or why it was not used
      if (in_place.measured()) row(in_place);  // the CPU's read in place
    }
  }
  if (!o.json_out.empty()) {
    std::ofstream file(o.json_out, std::ios::trunc);
    file << j.str() << "\n";
    if (!file) {
      err << "tensorstream bench-io: cannot write " << o.json_out.string() << "\n";
      return kExitFailure;
    }
  }
  return kExitOk;
}

}  // namespace tensorstream::cli
