#include "tensorstream/store_maintenance.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <string>

#include "tensorstream/errors.hpp"

namespace tensorstream {
namespace detail {
namespace {
constexpr std::string_view kTempSuffix = ".tstmp";
std::atomic<unsigned long> g_temp_counter{0};
}  // namespace

std::filesystem::path temp_path_for(const std::filesystem::path& destination) {
  const auto n = g_temp_counter.fetch_add(1);
  const std::string name =
      concat(".", destination.filename().string(), ".", ::getpid(), ".", n, kTempSuffix);
  return destination.parent_path() / name;
}

bool parse_temp_name(const std::string& name, long& pid) {
  if (name.size() < kTempSuffix.size() + 4 || name.front() != '.' ||
      name.compare(name.size() - kTempSuffix.size(), kTempSuffix.size(), kTempSuffix) != 0) {
    return false;
  }
  // ".<file>.<pid>.<n>.tstmp": the pid is the second-to-last dotted field before the suffix.
  const std::string stem = name.substr(0, name.size() - kTempSuffix.size());
  const auto last_dot = stem.rfind('.');
  if (last_dot == std::string::npos || last_dot == 0) return false;
  const auto pid_dot = stem.rfind('.', last_dot - 1);
  if (pid_dot == std::string::npos || pid_dot == 0) return false;
  const char* first = stem.data() + pid_dot + 1;
  const char* last = stem.data() + last_dot;
  const auto [ptr, ec] = std::from_chars(first, last, pid);
  return ec == std::errc() && ptr == last && pid > 0;
}

}  // namespace detail

std::vector<std::filesystem::path> cleanup_orphaned_files(const std::filesystem::path& path) {
  const auto directory = std::filesystem::is_directory(path) ? path : path.parent_path();
  std::error_code ec;
  std::filesystem::directory_iterator it(directory.empty() ? "." : directory, ec);
  if (ec) {
    throw IoError(detail::concat("cannot list '", directory.string(), "': ", ec.message()),
                  ec.value());
  }
  std::vector<std::filesystem::path> removed;
  for (const auto& entry : it) {
    long pid = 0;
    if (!entry.is_regular_file() ||
        !detail::parse_temp_name(entry.path().filename().string(), pid)) {
      continue;
    }
    // A writer that still runs owns its temporary (EPERM: alive under another user).
    const bool alive = ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
    if (alive) continue;
    std::filesystem::remove(entry.path(), ec);
    if (!ec) removed.push_back(entry.path());
  }
  return removed;
}

}  // namespace tensorstream
