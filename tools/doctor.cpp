// `tensorstream doctor`: what this machine offers TensorStream, and why a fast path is off.
//
// Reports, for the storage path (--storage-path, else $TENSORSTREAM_STORAGE_PATH, else the
// current directory): which I/O backends work there (each one reads a probe file), O_DIRECT,
// io_uring (and the kernel's io_uring_disabled switch), GPUDirect Storage (cuFile found?
// driver opened? a file on the storage path registered and read into GPU memory exactly?);
// the CUDA driver; the locked-memory limit; and the measured cold read bandwidth of a
// temporary file written there. The temporary file has no name (O_TMPFILE) where the file system
// allows it, else a hidden ".doctor-probe.<pid>.<n>.tstmp" name that cleanup_orphaned_files()
// recognises; it is removed on every exit path.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <optional>
#include <ostream>
#include <sstream>
#include <vector>

#include "cli.hpp"
#include "cli_util.hpp"
#include "commands.hpp"
#include "tensorstream/detail/json_writer.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/io/aligned_buffer.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"
#include "tensorstream/store_maintenance.hpp"
#include "tensorstream/version.hpp"

namespace tensorstream::cli {
namespace {

using tensorstream::detail::concat;
using util::fixed;
using util::human_bytes;
using util::json_number;
namespace json = tensorstream::detail::json;

constexpr const char* kDoctorUsage =
    "usage: tensorstream doctor [--storage-path DIR] [--probe-size MiB] [--json]\n"
    "\n"
    "Reports what works on this machine and why not: the I/O backends (pread, io_uring,\n"
    "mmap) and O_DIRECT on the storage path, locked-memory limits, the CUDA driver and\n"
    "GPUDirect Storage (libcufile, its driver, nvidia-fs, a read on the storage path), and\n"
    "the storage path's read bandwidth.\n"
    "\n"
    "  --storage-path DIR   where stores live (default: $TENSORSTREAM_STORAGE_PATH, else the\n"
    "                       current directory); backends and bandwidth are probed there\n"
    "  --probe-size MiB     size of the temporary file read for the bandwidth (256; 0: skip)\n"
    "  --json               print one JSON object\n";

struct Bandwidth {
  std::uint64_t bytes = 0;
  double write_gbps = 0;  // write + fsync
  double read_gbps = 0;
  std::string backend;
  bool direct = false;
  std::string note;
};

// A temporary file in `dir`, gone when this object is (and, with O_TMPFILE, even on a crash).
class ProbeFile {
 public:
  explicit ProbeFile(const std::filesystem::path& dir) {
    fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd_ == -1) {
      named_ = tensorstream::detail::temp_path_for(dir / "doctor-probe");
      fd_ = ::open(named_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
      if (fd_ == -1) {
        const int code = errno;
        named_.clear();
        tensorstream::detail::throw_errno(
            concat("cannot create a temporary file in '", dir.string(), "'"), code);
      }
    }
  }
  ~ProbeFile() {
    if (fd_ != -1) ::close(fd_);
    if (!named_.empty()) ::unlink(named_.c_str());
  }
  ProbeFile(const ProbeFile&) = delete;
  ProbeFile& operator=(const ProbeFile&) = delete;

  [[nodiscard]] int fd() const noexcept { return fd_; }
  /// A path that opens this file again (with other flags, e.g. O_DIRECT).
  [[nodiscard]] std::filesystem::path path() const {
    return named_.empty() ? std::filesystem::path(concat("/proc/self/fd/", fd_)) : named_;
  }

 private:
  int fd_ = -1;
  std::filesystem::path named_;
};

Bandwidth measure_bandwidth(const std::filesystem::path& dir, std::uint64_t bytes) {
  Bandwidth out;
  out.bytes = bytes;
  ProbeFile file(dir);
  io::AlignedBuffer buffer(static_cast<std::size_t>(bytes));
  util::fill_pseudo_random(buffer.span(), 42);

  auto start = std::chrono::steady_clock::now();
  for (std::uint64_t done = 0; done < bytes;) {
    const std::size_t n =
        static_cast<std::size_t>(std::min<std::uint64_t>(bytes - done, std::uint64_t{8} << 20));
    const ssize_t w = ::pwrite(file.fd(), buffer.data() + done, n, static_cast<off_t>(done));
    if (w == -1 && errno == EINTR) continue;
    TS_SYSCALL_CHECK(w, "cannot write the probe file in '", dir.string(), "'");
    done += static_cast<std::uint64_t>(w);
  }
  TS_SYSCALL_CHECK(::fsync(file.fd()), "cannot fsync the probe file in '", dir.string(), "'");
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out.write_gbps = static_cast<double>(bytes) / seconds / 1e9;
  if (const int rc = ::posix_fadvise(file.fd(), 0, 0, POSIX_FADV_DONTNEED); rc != 0) {
    out.note = concat("page cache not dropped (posix_fadvise: ", std::strerror(rc), ")");
  }

  // Read it back the way the engine does by default (auto backend, default options).
  auto backend = io::make_backend(io::BackendType::kAuto);
  out.backend = std::string(backend->name());
  const io::FileId id = backend->open(file.path());
  std::memset(buffer.data(), 0, buffer.size());  // pages faulted in before the timing
  start = std::chrono::steady_clock::now();
  const auto got = backend->read(id, 0, bytes, buffer.span());
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  TS_EXPECT(got.size() == bytes, Error, "short read of the probe file in '", dir.string(), "'");
  out.read_gbps = static_cast<double>(bytes) / seconds / 1e9;
  const auto stats = backend->stats();
  out.direct = stats.reads_direct > 0 && stats.reads_buffered == 0;
  for (const auto& f : stats.files) {
    if (f.id == id && !f.direct_note.empty()) {
      out.note += (out.note.empty() ? "" : "; ") + f.direct_note;
    }
  }
  backend->close(id);
  return out;
}

// GPUDirect Storage on the storage path: cuFile's driver opened with device 0, then a small
// file written there, registered (O_DIRECT + cuFileHandleRegister) and read into device
// memory, and the bytes compared after a copy back.
struct GdsProbe {
  cuda::CuFileStatus cufile;
  bool registered = false;  // the probe file was registered with cuFile
  bool works = false;       // ... and read back exactly
  std::string reason;       // why not, or "ok ..." with the mode
};

constexpr std::size_t kGdsProbeBytes = std::size_t{1} << 20;

GdsProbe probe_gds(const std::filesystem::path& dir, const cuda::DriverStatus& driver) {
  GdsProbe p;
  p.cufile = cuda::cufile_status();
  if (!p.cufile.library_loaded || !driver.available) {
    p.reason = p.cufile.reason;
    return p;
  }
  try {
    const cuda::Device device(0);
    p.cufile = cuda::cufile_open_driver(device);
    if (!p.cufile.driver_opened) {
      p.reason = p.cufile.reason;
      return p;
    }
    ProbeFile file(dir);
    io::AlignedBuffer data(kGdsProbeBytes);
    util::fill_pseudo_random(data.span(), 7);
    for (std::size_t done = 0; done < data.size();) {
      const ssize_t w =
          ::pwrite(file.fd(), data.data() + done, data.size() - done, static_cast<off_t>(done));
      if (w == -1 && errno == EINTR) continue;
      TS_SYSCALL_CHECK(w, "cannot write the GDS probe file in '", dir.string(), "'");
      done += static_cast<std::size_t>(w);
    }
    TS_SYSCALL_CHECK(::fsync(file.fd()), "cannot fsync the GDS probe file in '", dir.string(), "'");
    const cuda::CuFileHandle handle(device, file.path());
    p.registered = true;
    const cuda::DeviceBuffer on_device(device, data.size());
    for (std::size_t done = 0; done < data.size();) {
      const auto n = handle.read(on_device.ptr(), data.size() - done, done, done);
      TS_EXPECT(n > 0, Error, "cuFileRead of the probe file stopped after ", done, " bytes");
      done += n;
    }
    std::vector<std::byte> back(data.size());
    const cuda::Stream stream(device);
    cuda::memcpy_dtoh_async(device, back.data(), on_device.ptr(), back.size(), stream.handle());
    stream.synchronize();
    p.works = std::equal(back.begin(), back.end(), data.data());
    p.reason = !p.works ? "cuFileRead returned wrong bytes for the probe file"
               : p.cufile.nvidia_fs
                   ? "ok"
                   : "ok, in compatibility mode (nvidia-fs kernel module not loaded): gds=auto "
                     "uses the host path, gds=on uses cuFile";
  } catch (const std::exception& e) {
    p.reason = e.what();
  }
  return p;
}

struct Limit {
  bool unlimited = false;
  std::uint64_t bytes = 0;
};

std::string limit_json(const Limit& l) {
  return l.unlimited ? "\"unlimited\"" : std::to_string(l.bytes);
}
std::string limit_text(const Limit& l) { return l.unlimited ? "unlimited" : human_bytes(l.bytes); }

// kernel.io_uring_disabled (Linux ≥ 6.6): 0 enabled, 1 only for a group, 2 disabled.
std::optional<int> io_uring_disabled() {
  std::ifstream in("/proc/sys/kernel/io_uring_disabled");
  int value = 0;
  if (in >> value) return value;
  return std::nullopt;
}

struct BackendRow {
  std::string name;
  bool works = false;
  bool direct = false;
  std::string reason;
};

}  // namespace

int cmd_doctor(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.size() == 1 && (args[0] == "-h" || args[0] == "--help")) {
    out << kDoctorUsage;
    return kExitOk;
  }
  std::optional<std::filesystem::path> storage_arg;
  std::uint64_t probe_mib = 256;
  bool as_json = false;
  try {
    for (std::size_t i = 0; i < args.size(); ++i) {
      if (args[i] == "--json") {
        as_json = true;
      } else if ((args[i] == "--storage-path" || args[i] == "--probe-size") &&
                 i + 1 < args.size()) {
        if (args[i] == "--storage-path") {
          storage_arg = args[++i];
        } else {
          probe_mib = util::parse_uint(args[i], args[i + 1], 0, 1u << 16);
          ++i;
        }
      } else {
        throw util::UsageError(args[i] == "--storage-path" || args[i] == "--probe-size"
                                   ? args[i] + ": missing value"
                                   : "unexpected argument '" + args[i] + "'");
      }
    }
  } catch (const util::UsageError& e) {
    err << "tensorstream doctor: " << e.what() << "\n\n" << kDoctorUsage;
    return kExitUsage;
  }

  std::filesystem::path storage = std::filesystem::current_path();
  std::string storage_source = "current directory";
  if (storage_arg) {
    storage = *storage_arg;
    storage_source = "--storage-path";
  } else if (const char* env = std::getenv("TENSORSTREAM_STORAGE_PATH"); env && *env) {
    storage = env;
    storage_source = "TENSORSTREAM_STORAGE_PATH";
  }
  std::error_code ec;
  if (!std::filesystem::is_directory(storage, ec)) {
    err << "tensorstream doctor: storage path '" << storage.string() << "' (from " << storage_source
        << ") is not an existing directory\n";
    return kExitFailure;
  }

  // ---- gather -----------------------------------------------------------------------------
  const auto machine = util::machine_info();
  const auto driver = cuda::driver_status();
  const std::string fs = util::filesystem_name(storage);
  const std::string blockdev = util::block_device_name(storage);
  const auto direct_problem = io::probe_direct_io(storage);

  std::vector<BackendRow> rows;
  for (const auto& p : io::probe_backends(storage)) {
    BackendRow row{std::string(io::backend_name(p.type)), p.usable, p.direct, p.detail};
    if (row.reason.empty()) row.reason = p.usable ? "ok" : "unknown failure";
    rows.push_back(std::move(row));
  }
  const GdsProbe gds_probe = probe_gds(storage, driver);
  const auto& cufile = gds_probe.cufile;
  const BackendRow gds{"gpudirect", gds_probe.works, gds_probe.registered, gds_probe.reason};
  rows.push_back(gds);

  const BackendRow* uring = nullptr;
  for (const auto& r : rows) {
    if (r.name == "io_uring") uring = &r;
  }
  const auto uring_sysctl = io_uring_disabled();

  rlimit rl{};
  Limit soft;
  Limit hard;
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
    soft = {rl.rlim_cur == RLIM_INFINITY, static_cast<std::uint64_t>(rl.rlim_cur)};
    hard = {rl.rlim_max == RLIM_INFINITY, static_cast<std::uint64_t>(rl.rlim_max)};
  }
  // RLIMIT_MEMLOCK caps what mlock(2) pins (mm/mlock.c checks rlimit(RLIMIT_MEMLOCK)) and
  // what a few kernel interfaces charge to it. CUDA's pinned memory is not among them, so a
  // small limit does not hold back the GPU path (NVIDIA's open kernel modules,
  // github.com/NVIDIA/open-gpu-kernel-modules): cuMemHostAlloc's pages are allocated by the
  // driver and mapped with vm_insert_page (kernel-open/nvidia/nv-mmap.c, nvidia_mmap_sysmem:
  // no VM_LOCKED, nothing charged to locked_vm), and cuMemHostRegister pins with
  // get_user_pages without charging locked_vm or checking the limit
  // (kernel-open/nvidia/os-mlock.c, os_lock_user_pages). cuFile registers device memory.
  // What is charged here: io_uring's rings before Linux 5.12, and io_uring registered
  // buffers (TensorStream registers none). So the warning is for io_uring on such kernels,
  // and only when a ring could not be set up.
  const bool rings_charged = util::io_uring_rings_charged_to_memlock(machine.kernel);
  std::string memlock_warning;
  if (rings_charged && !soft.unlimited && uring != nullptr && !uring->works) {
    memlock_warning = concat(
        "io_uring could not set up a ring here, and Linux ", machine.kernel,
        " (before 5.12) charges io_uring rings to the locked-memory limit of ",
        human_bytes(soft.bytes),
        ": raise it for the io_uring backend (ulimit -l unlimited; LimitMEMLOCK=infinity for "
        "systemd; --ulimit memlock=-1 for docker); the other backends do not need it");
  }

  std::optional<Bandwidth> bandwidth;
  std::string bandwidth_note;
  if (probe_mib == 0) {
    bandwidth_note = "not measured (--probe-size 0)";
  } else {
    try {
      bandwidth = measure_bandwidth(storage, probe_mib << 20);
      if (fs == "tmpfs" || fs == "ramfs") {
        bandwidth->note += std::string(bandwidth->note.empty() ? "" : "; ") + fs +
                           " lives in memory: this is a memory copy, not a drive";
      }
    } catch (const std::exception& e) {
      bandwidth_note = e.what();
    }
  }

  // ---- report -----------------------------------------------------------------------------
  if (as_json) {
    std::ostringstream j;
    j << "{\"version\":" << json::quote(kVersion)
      << ",\"cuda\":{\"compiled\":" << (cuda::compiled_with_cuda() ? "true" : "false")
      << ",\"driver\":" << (driver.available ? "true" : "false")
      << ",\"driver_version\":" << driver.driver_version << ",\"devices\":" << driver.device_count
      << ",\"device0\":" << json::quote(driver.device0_name)
      << ",\"reason\":" << json::quote(driver.reason)
      << ",\"library\":" << json::quote(driver.library)
      << ",\"entry_points\":" << json::quote(driver.entry_points) << ",\"disabled\":[";
    for (std::size_t i = 0; i < driver.disabled.size(); ++i) {
      j << (i ? "," : "") << json::quote(driver.disabled[i]);
    }
    j << "]}"
      << ",\"cufile\":{\"compiled\":" << (cufile.compiled ? "true" : "false")
      << ",\"loaded\":" << (cufile.library_loaded ? "true" : "false")
      << ",\"library\":" << json::quote(cufile.library) << ",\"version\":" << cufile.version
      << ",\"driver_opened\":" << (cufile.driver_opened ? "true" : "false")
      << ",\"nvidia_fs\":" << (cufile.nvidia_fs ? "true" : "false")
      << ",\"reason\":" << json::quote(cufile.reason) << "}"
      << ",\"gds\":{\"works\":" << (gds_probe.works ? "true" : "false")
      << ",\"file_registered\":" << (gds_probe.registered ? "true" : "false")
      << ",\"reason\":" << json::quote(gds.reason) << "}"
      << ",\"machine\":{\"cpus\":" << machine.cpus << ",\"memory_bytes\":" << machine.memory_bytes
      << ",\"kernel\":" << json::quote(machine.kernel)
      << ",\"transparent_hugepages\":" << json::quote(util::transparent_hugepage_mode()) << "}"
      << ",\"storage\":{\"path\":" << json::quote(storage.string())
      << ",\"source\":" << json::quote(storage_source) << ",\"filesystem\":" << json::quote(fs)
      << ",\"block_device\":" << json::quote(blockdev)
      << ",\"direct_io\":" << (direct_problem ? "false" : "true")
      << ",\"direct_io_note\":" << json::quote(direct_problem.value_or("")) << ",\"bandwidth\":";
    if (bandwidth) {
      j << "{\"bytes\":" << bandwidth->bytes
        << ",\"read_gbps\":" << json_number(bandwidth->read_gbps)
        << ",\"write_gbps\":" << json_number(bandwidth->write_gbps)
        << ",\"read_backend\":" << json::quote(bandwidth->backend)
        << ",\"direct\":" << (bandwidth->direct ? "true" : "false")
        << ",\"note\":" << json::quote(bandwidth->note) << "}";
    } else {
      j << "null,\"bandwidth_note\":" << json::quote(bandwidth_note);
    }
    j << "},\"io_uring\":{\"works\":" << (uring && uring->works ? "true" : "false")
      << ",\"reason\":" << json::quote(uring ? uring->reason : "not probed")
      << ",\"io_uring_disabled\":"
      << (uring_sysctl ? std::to_string(*uring_sysctl) : std::string("null")) << "}"
      << ",\"memlock\":{\"soft\":" << limit_json(soft) << ",\"hard\":" << limit_json(hard)
      << ",\"io_uring_rings_charged\":" << (rings_charged ? "true" : "false")
      << ",\"warning\":" << (memlock_warning.empty() ? "null" : json::quote(memlock_warning))
      << "},\"backends\":{";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      j << (i ? "," : "") << json::quote(rows[i].name)
        << ":{\"works\":" << (rows[i].works ? "true" : "false")
        << ",\"direct\":" << (rows[i].direct ? "true" : "false")
        << ",\"reason\":" << json::quote(rows[i].reason) << "}";
    }
    j << "}}";
    out << j.str() << "\n";
    return kExitOk;
  }

  out << "tensorstream " << kVersion << "\n"
      << "CUDA support compiled in: " << (cuda::compiled_with_cuda() ? "yes" : "no") << "\n";
  if (driver.available) {
    out << "CUDA driver: yes (version " << driver.driver_version / 1000 << "."
        << (driver.driver_version % 1000) / 10 << ", " << driver.device_count
        << " device(s), device 0: " << driver.device0_name << "; " << driver.library
        << ", entry points through " << driver.entry_points << ")\n";
    for (const auto& off : driver.disabled) out << "CUDA feature off: " << off << "\n";
  } else {
    out << "CUDA driver: no (" << driver.reason << ")\n";
  }
  out << "cuFile (GPUDirect Storage): ";
  if (!cufile.library_loaded) {
    out << "no (" << cufile.reason << ")\n";
  } else {
    out << "library " << cufile.library;
    if (cufile.version > 0) {
      out << " (version " << cufile.version / 1000 << "." << (cufile.version % 1000) / 10 << ")";
    }
    out << "; driver " << (cufile.driver_opened ? "opened" : "not opened (" + cufile.reason + ")")
        << "; nvidia-fs kernel module " << (cufile.nvidia_fs ? "loaded" : "not loaded") << "\n";
  }
  out << "GPUDirect Storage on the storage path: "
      << (gds_probe.works ? "works (" + gds.reason + ")" : "no (" + gds.reason + ")") << "\n";
  out << "machine: " << machine.cpus << " CPUs, " << human_bytes(machine.memory_bytes)
      << " RAM, Linux " << machine.kernel << ", transparent huge pages: "
      << (util::transparent_hugepage_mode().empty() ? "unknown" : util::transparent_hugepage_mode())
      << "\n";
  out << "storage path: " << storage.string() << " (" << storage_source << "; " << fs
      << (blockdev.empty() ? "" : " on " + blockdev) << ")\n";
  out << "O_DIRECT on the storage path: "
      << (direct_problem ? "no (" + *direct_problem + ")" : std::string("yes")) << "\n";
  out << "io_uring: " << (uring && uring->works ? "yes" : "no");
  if (uring && !uring->works) out << " (" << uring->reason << ")";
  if (uring_sysctl) {
    out << "; kernel.io_uring_disabled = " << *uring_sysctl
        << (*uring_sysctl == 0   ? " (enabled)"
            : *uring_sysctl == 1 ? " (only for kernel.io_uring_group)"
                                 : " (disabled for all processes)");
  }
  out << "\n";
  out << "locked-memory limit (RLIMIT_MEMLOCK): " << limit_text(soft) << " (hard "
      << limit_text(hard) << "); CUDA pinned memory is not charged to it"
      << (rings_charged ? "; io_uring rings are, on this kernel (before 5.12)" : "") << "\n";
  if (!memlock_warning.empty()) out << "warning: " << memlock_warning << "\n";
  out << "\nbackends on " << storage.string() << ":\n";
  for (const auto& r : rows) {
    out << "  " << std::left << std::setw(11) << r.name << std::setw(7)
        << (r.works ? "works" : "NO") << std::right << r.reason << "\n";
  }
  out << "\nstorage read bandwidth: ";
  if (bandwidth) {
    out << fixed(bandwidth->read_gbps, 2) << " GB/s (cold read of a "
        << human_bytes(bandwidth->bytes) << " temporary file, " << bandwidth->backend
        << " backend, " << (bandwidth->direct ? "O_DIRECT" : "buffered")
        << (bandwidth->note.empty() ? "" : "; " + bandwidth->note) << "); write + fsync "
        << fixed(bandwidth->write_gbps, 2) << " GB/s\n"
        << "  (one quick sample; `tensorstream bench-io STORE` measures every backend against "
           "fio)\n";
  } else {
    out << "not measured: " << bandwidth_note << "\n";
  }
  return kExitOk;
}

}  // namespace tensorstream::cli
