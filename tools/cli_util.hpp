// Helpers shared by the native CLI's subcommands (bench-io, doctor, ...): formatting, option
// parsing, facts about the machine and the file system, and the page-cache and plain
// sequential-read primitives the benchmarks measure against.
//
// Thread-safety: every function is thread-safe (none keeps state).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>

namespace tensorstream::cli::util {

// ---- formatting ---------------------------------------------------------------------------

/// "1.5 GiB", "512 B", ...
[[nodiscard]] std::string human_bytes(std::uint64_t n);

/// `value` as a JSON number ("null" when it is not finite), with up to `digits` significant
/// digits; never uses the locale.
[[nodiscard]] std::string json_number(double value, int digits = 6);

/// `value` with `decimals` fixed decimals (for tables).
[[nodiscard]] std::string fixed(double value, int decimals);

// ---- option parsing -------------------------------------------------------------------------

/// A bad command line; the subcommands turn it into exit code 2 (kExitUsage).
class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Parses a decimal integer in [min, max] given for `option`; throws UsageError naming the
/// option and the value otherwise.
[[nodiscard]] std::uint64_t parse_uint(std::string_view option, std::string_view text,
                                       std::uint64_t min, std::uint64_t max);

/// Parses a non-negative decimal number (e.g. "2.5") given for `option`, > 0; UsageError
/// otherwise.
[[nodiscard]] double parse_positive(std::string_view option, std::string_view text);

// ---- the machine ------------------------------------------------------------------------

struct MachineInfo {
  unsigned cpus = 0;               ///< online CPUs
  std::uint64_t memory_bytes = 0;  ///< physical memory
  std::string kernel;              ///< uname release
  std::string hostname;
  double load_average = -1;  ///< 1-minute load average (-1: unknown)
};

[[nodiscard]] MachineInfo machine_info();

/// True if a kernel of this uname release ("5.10.0-27-amd64") charges the memory of
/// io_uring's rings to RLIMIT_MEMLOCK: Linux before 5.12, which moved that memory to memcg
/// accounting. False for 5.12 and later, and for a release it cannot parse.
[[nodiscard]] bool io_uring_rings_charged_to_memlock(std::string_view kernel_release);

/// Name of the file system holding `path` from statfs(2)'s f_type ("ext4", "xfs", "tmpfs",
/// "overlay", ...; ext2/3/4 share one magic and are reported as "ext4"), "0x<magic>" for one
/// not in the table, "unknown (<error>)" if statfs fails.
[[nodiscard]] std::string filesystem_name(const std::filesystem::path& path);

/// The block device behind `path` as the kernel names it ("nvme0n1p2", "vda"), or "" when
/// there is none (tmpfs, overlay, network file systems) or it cannot be found.
[[nodiscard]] std::string block_device_name(const std::filesystem::path& path);

/// The transparent-huge-page mode ("always", "madvise", "never"), "" if unknown.
[[nodiscard]] std::string transparent_hugepage_mode();

/// Bytes of this process's anonymous memory backed by transparent huge pages
/// (/proc/self/smaps_rollup), nullopt if unknown.
[[nodiscard]] std::optional<std::uint64_t> anon_huge_page_bytes();

/// Cumulative read counters of a block device (/sys/class/block/NAME/stat): completed reads
/// and 512-byte sectors read, device-wide (every process's I/O counts).
struct BlockDeviceReads {
  std::uint64_t reads = 0;
  std::uint64_t sectors = 0;
};

/// The counters of `device` (a name from block_device_name), or nullopt if unreadable.
[[nodiscard]] std::optional<BlockDeviceReads> block_device_reads(const std::string& device);

// ---- page cache -------------------------------------------------------------------------

/// Writes back and drops the cached pages of `path` (fdatasync, then
/// posix_fadvise(POSIX_FADV_DONTNEED) over the whole file) so the next buffered read comes
/// from the drive. Pages mapped by some process stay cached. Returns nullopt on success,
/// else why not.
std::optional<std::string> drop_page_cache(const std::filesystem::path& path);

/// Fraction (0..1) of `path`'s pages in the page cache now (mincore over a mapping of the
/// file); nullopt if it cannot be determined.
[[nodiscard]] std::optional<double> cached_fraction(const std::filesystem::path& path);

// ---- plain sequential reads (the reference the backends are compared with) ----------------

struct SequentialRead {
  std::uint64_t bytes = 0;  ///< bytes read
  double seconds = 0;       ///< wall time of the read loop (buffer allocation excluded)
  bool direct = false;      ///< read with O_DIRECT
  std::string note;         ///< why not O_DIRECT (empty when it was)
};

/// Reads [offset, offset + size) of `path` on one thread, one request of `request_size`
/// bytes at a time, into `buffer` (page-aligned; when empty, a fresh buffer of request_size
/// is allocated and faulted in first): with O_DIRECT (offset and size are aligned to 4096
/// outward, bounded by the end of the file) or, if the file system refuses it, buffered
/// with a note. Requests are capped at buffer.size(). Throws IoError naming the file on a
/// read error, std::invalid_argument for a misaligned buffer.
[[nodiscard]] SequentialRead read_sequential(const std::filesystem::path& path,
                                             std::uint64_t offset, std::uint64_t size,
                                             std::size_t request_size,
                                             std::span<std::byte> buffer = {});

/// Fills `out` with fast pseudo-random bytes (incompressible; not cryptographic).
void fill_pseudo_random(std::span<std::byte> out, std::uint64_t seed) noexcept;

}  // namespace tensorstream::cli::util
