// Maintenance of store directories: naming of in-progress writes and their clean-up.
#pragma once

#include <filesystem>
#include <vector>

namespace tensorstream {

/// Removes leftovers of interrupted writes in `directory` (or, if `path` is a file, in its
/// directory): hidden `.<name>.<pid>.<n>.tstmp` files whose writing process no longer runs.
/// Files of live writers are kept. Returns the paths removed.
std::vector<std::filesystem::path> cleanup_orphaned_files(const std::filesystem::path& path);

namespace detail {

/// A fresh temporary path beside `destination`: ".<file name>.<pid>.<n>.tstmp".
[[nodiscard]] std::filesystem::path temp_path_for(const std::filesystem::path& destination);

/// True if `name` is a temporary file name made by temp_path_for; sets `pid` to its writer.
[[nodiscard]] bool parse_temp_name(const std::string& name, long& pid);

}  // namespace detail
}  // namespace tensorstream
