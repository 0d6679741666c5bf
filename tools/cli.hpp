// The native `tensorstream` command line: store tools that need neither Python nor torch.
// Shared by the standalone executable (tools/main.cpp) and the Python entry point, which
// forwards the native subcommands here.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace tensorstream::cli {

/// Exit codes.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  ///< the command ran and found a problem (or failed)
inline constexpr int kExitUsage = 2;    ///< bad command line

/// Runs `tensorstream <args...>` (args excludes the program name). Never throws: errors
/// are printed to `err` and turned into an exit code. `interactive` enables progress bars.
int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
        bool interactive);

/// Subcommands implemented natively (the Python front forwards these).
[[nodiscard]] const std::vector<std::string>& native_commands();

}  // namespace tensorstream::cli
