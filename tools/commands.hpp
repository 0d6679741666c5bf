// Subcommands of the native CLI that live in their own files.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace tensorstream::cli {

/// `tensorstream bench-io STORE [options]`: see tools/bench_io.cpp.
int cmd_bench_io(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

/// `tensorstream bench-codec [STORE] [options]`: see tools/bench_codec.cpp.
int cmd_bench_codec(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

/// `tensorstream doctor [--storage-path DIR] [--json]`: see tools/doctor.cpp.
int cmd_doctor(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

/// `tensorstream settings [--markdown | --json | --check FILE | --update FILE]`: see
/// tools/settings_command.cpp.
int cmd_settings(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace tensorstream::cli
