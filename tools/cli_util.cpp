#include "cli_util.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <limits>
#include <sstream>
#include <vector>

#include "tensorstream/detail/file.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/io/aligned_buffer.hpp"

namespace tensorstream::cli::util {

using tensorstream::detail::concat;

std::string human_bytes(std::uint64_t n) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int unit = 0;
  while (v >= 1024.0 && unit < 4) {
    v /= 1024.0;
    ++unit;
  }
  std::ostringstream s;
  s << std::fixed << std::setprecision(unit == 0 ? 0 : 1) << v << " " << kUnits[unit];
  return s.str();
}

std::string json_number(double value, int digits) {
  if (!std::isfinite(value)) return "null";
  std::ostringstream s;
  s.imbue(std::locale::classic());
  s << std::setprecision(digits) << value;
  return s.str();
}

std::string fixed(double value, int decimals) {
  if (!std::isfinite(value)) return "-";
  std::ostringstream s;
  s.imbue(std::locale::classic());
  s << std::fixed << std::setprecision(decimals) << value;
  return s.str();
}

std::uint64_t parse_uint(std::string_view option, std::string_view text, std::uint64_t min,
                         std::uint64_t max) {
  std::uint64_t value = 0;
  const auto* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end || value < min || value > max) {
    throw UsageError(
        concat(option, ": expected an integer in [", min, ", ", max, "], got '", text, "'"));
  }
  return value;
}

double parse_positive(std::string_view option, std::string_view text) {
  double value = 0;
  const auto* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end || !(value > 0) || !std::isfinite(value)) {
    throw UsageError(concat(option, ": expected a positive number, got '", text, "'"));
  }
  return value;
}

MachineInfo machine_info() {
  MachineInfo info;
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  info.cpus = cpus > 0 ? static_cast<unsigned>(cpus) : 0;
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) {
    info.memory_bytes = static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
  }
  struct utsname u {};
  if (::uname(&u) == 0) {
    info.kernel = u.release;
    info.hostname = u.nodename;
  }
  double load[1] = {0};
  if (::getloadavg(load, 1) == 1) info.load_average = load[0];
  return info;
}

bool io_uring_rings_charged_to_memlock(std::string_view kernel_release) {
  int major = 0;
  int minor = 0;
  const char* begin = kernel_release.data();
  const char* end = begin + kernel_release.size();
  auto r = std::from_chars(begin, end, major);
  if (r.ec != std::errc{} || r.ptr == end || *r.ptr != '.') return false;
  r = std::from_chars(r.ptr + 1, end, minor);
  if (r.ec != std::errc{}) return false;
  return major < 5 || (major == 5 && minor < 12);
}

std::string filesystem_name(const std::filesystem::path& path) {
  struct statfs st {};
  if (::statfs(path.c_str(), &st) != 0) {
    return concat("unknown (statfs: ", std::strerror(errno), ")");
  }
  // Magic numbers from <linux/magic.h> and the file systems' sources (some are not in the
  // header on every distribution, hence the table).
  struct Magic {
    std::uint64_t magic;
    const char* name;
  };
  static constexpr Magic kMagics[] = {
      {0xEF53, "ext4"},      {0x58465342, "xfs"},      {0x9123683E, "btrfs"},
      {0x01021994, "tmpfs"}, {0x794C7630, "overlay"},  {0x6969, "nfs"},
      {0x2FC12FC1, "zfs"},   {0xF2F52010, "f2fs"},     {0x65735546, "fuse"},
      {0x858458F6, "ramfs"}, {0x01021997, "9p"},       {0xFE534D42, "smb2"},
      {0xFF534D42, "cifs"},  {0xCA451A4E, "bcachefs"}, {0x73717368, "squashfs"},
      {0x2011BAB0, "exfat"}, {0x4D44, "vfat"},         {0x5346544E, "ntfs"},
      {0x00C36400, "ceph"},  {0x0BD00BD0, "lustre"},   {0x47504653, "gpfs"},
      {0x61756673, "aufs"},  {0x9660, "iso9660"},      {0x62656572, "sysfs"},
      {0x9FA0, "proc"},
  };
  const auto type = static_cast<std::uint64_t>(static_cast<std::uint32_t>(st.f_type));
  for (const auto& m : kMagics) {
    if (m.magic == type) return m.name;
  }
  std::ostringstream s;
  s << "0x" << std::hex << type;
  return s.str();
}

std::string block_device_name(const std::filesystem::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || major(st.st_dev) == 0) return "";
  std::error_code ec;
  const auto link = std::filesystem::read_symlink(
      concat("/sys/dev/block/", major(st.st_dev), ":", minor(st.st_dev)), ec);
  if (ec) return "";
  return link.filename().string();
}

std::string transparent_hugepage_mode() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!std::getline(in, line)) return "";
  const auto open = line.find('[');
  const auto close = line.find(']', open);
  if (open == std::string::npos || close == std::string::npos) return "";
  return line.substr(open + 1, close - open - 1);
}

std::optional<std::uint64_t> anon_huge_page_bytes() {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("AnonHugePages:", 0) != 0) continue;
    std::istringstream fields(line.substr(14));
    std::uint64_t kib = 0;
    if (fields >> kib) return kib * 1024;
  }
  return std::nullopt;
}

std::optional<BlockDeviceReads> block_device_reads(const std::string& device) {
  if (device.empty()) return std::nullopt;
  std::ifstream in("/sys/class/block/" + device + "/stat");
  std::uint64_t reads = 0;
  std::uint64_t merged = 0;
  std::uint64_t sectors = 0;
  if (!(in >> reads >> merged >> sectors)) return std::nullopt;
  return BlockDeviceReads{reads, sectors};
}

std::optional<std::string> drop_page_cache(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    return concat("cannot open '", path.string(), "': ", std::strerror(errno));
  }
  std::optional<std::string> problem;
  // Dirty pages are not dropped: write them back first.
  if (::fdatasync(fd) != 0) {
    problem = concat("fdatasync of '", path.string(), "' failed: ", std::strerror(errno));
  } else if (const int rc = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED); rc != 0) {
    problem =
        concat("posix_fadvise(DONTNEED) on '", path.string(), "' failed: ", std::strerror(rc));
  }
  ::close(fd);
  return problem;
}

std::optional<double> cached_fraction(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd == -1) return std::nullopt;
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
    ::close(fd);
    return st.st_size == 0 ? std::optional<double>(0.0) : std::nullopt;
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return std::nullopt;
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident((size + page - 1) / page);
  std::optional<double> out;
  if (::mincore(map, size, resident.data()) == 0) {
    const auto n = std::count_if(resident.begin(), resident.end(),
                                 [](unsigned char c) { return (c & 1) != 0; });
    out = static_cast<double>(n) / static_cast<double>(resident.size());
  }
  ::munmap(map, size);
  return out;
}

SequentialRead read_sequential(const std::filesystem::path& path, std::uint64_t offset,
                               std::uint64_t size, std::size_t request_size,
                               std::span<std::byte> buffer) {
  constexpr std::uint64_t kAlign = kIoAlignment;
  io::AlignedBuffer own;
  if (buffer.empty()) {
    own = io::AlignedBuffer(std::max<std::size_t>(request_size, kAlign));
    std::memset(own.data(), 0, own.size());  // fault the pages in outside the timing
    buffer = own.span();
  }
  TS_EXPECT(
      reinterpret_cast<std::uintptr_t>(buffer.data()) % kAlign == 0 && buffer.size() >= kAlign,
      std::invalid_argument, "read_sequential: the buffer must be page-aligned and hold ", kAlign,
      " bytes at least");
  request_size = std::min(request_size, buffer.size());
  request_size = std::max<std::size_t>(request_size / kAlign * kAlign, kAlign);
  tensorstream::detail::FileDescriptor buffered(path, O_RDONLY);
  struct stat st {};
  TS_SYSCALL_CHECK(::fstat(buffered.get(), &st), "cannot stat '", path.string(), "'");
  const auto file_size = static_cast<std::uint64_t>(st.st_size);

  SequentialRead out;
  int direct_fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (direct_fd == -1) {
    out.note = concat("O_DIRECT refused (", std::strerror(errno), "): buffered reads");
  }
  out.direct = direct_fd != -1;

  const std::uint64_t begin = offset / kAlign * kAlign;
  const std::uint64_t end = std::min(file_size, (offset + size + kAlign - 1) / kAlign * kAlign);
  const auto start = std::chrono::steady_clock::now();
  std::uint64_t at = begin;
  while (at < end) {
    // O_DIRECT lengths stay multiples of 4096; the read simply stops at the end of the file.
    const std::uint64_t want =
        std::min<std::uint64_t>(request_size, (end - at + kAlign - 1) / kAlign * kAlign);
    const bool direct = direct_fd != -1;
    const ssize_t n =
        ::pread(direct ? direct_fd : buffered.get(), buffer.data(), want, static_cast<off_t>(at));
    if (n == -1) {
      const int code = errno;
      if (code == EINTR) continue;
      if (direct && code == EINVAL) {
        ::close(direct_fd);
        direct_fd = -1;
        out.direct = false;
        out.note = concat("O_DIRECT read refused (EINVAL) at offset ", at, ": buffered reads");
        continue;
      }
      if (direct_fd != -1) ::close(direct_fd);
      tensorstream::detail::throw_errno(
          concat("read of '", path.string(), "' at offset ", at, " (", want, " bytes)"), code);
    }
    if (n == 0) break;
    at += static_cast<std::uint64_t>(n);
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out.bytes = std::min(at, end) - begin;
  if (direct_fd != -1) ::close(direct_fd);
  return out;
}

void fill_pseudo_random(std::span<std::byte> out, std::uint64_t seed) noexcept {
  // xorshift64* seeded through splitmix64: a few GB/s on one core, incompressible.
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  std::uint64_t x = (z ^ (z >> 31)) | 1;
  std::size_t i = 0;
  for (; i + 8 <= out.size(); i += 8) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    const std::uint64_t v = x * 0x2545F4914F6CDD1Dull;
    std::memcpy(out.data() + i, &v, 8);
  }
  for (; i < out.size(); ++i) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    out[i] = static_cast<std::byte>((x * 0x2545F4914F6CDD1Dull) >> 56);
  }
}

}  // namespace tensorstream::cli::util
