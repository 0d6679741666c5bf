#include "cli.hpp"

#include "cli_util.hpp"
#include "commands.hpp"

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

#include "tensorstream/codec.hpp"
#include "tensorstream/convert.hpp"
#include "tensorstream/detail/json_writer.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/store.hpp"
#include "tensorstream/version.hpp"

namespace tensorstream::cli {
namespace {

constexpr const char* kUsage =
    "usage: tensorstream <command> [options]\n"
    "\n"
    "store tools (native):\n"
    "  convert SRC STORE    convert a .safetensors file or a Hugging Face checkpoint\n"
    "                       directory (sharded + index) into a store; STORE is a file\n"
    "                       or a directory (then STORE/model.tstore); --compress[=N]\n"
    "                       compresses it losslessly (level 1..9, default 3)\n"
    "  inspect STORE        list blocks and tensors with each block's compression ratio\n"
    "                       (--json for machine-readable output)\n"
    "  verify STORE         check every checksum (stored and decoded bytes, tensors);\n"
    "                       exit code 0 only if all are good\n"
    "  bench-codec [STORE]  compression ratio and decode GB/s per thread of a store's\n"
    "                       tensors (or of synthetic weights), beside plain zstd; --json\n"
    "  bench-io STORE       stream every block with each I/O backend and report GB/s beside\n"
    "                       a plain O_DIRECT read (and fio, where installed); --json\n"
    "  doctor               report which backends work here and why not (CUDA driver,\n"
    "                       cuFile, O_DIRECT, io_uring, locked-memory limit)\n"
    "  settings             every setting with its default, environment variable and Config\n"
    "                       field (--markdown: docs/runtime-settings.md; --json; --check FILE)\n"
    "  version              print the version\n";

using util::fixed;
using util::human_bytes;

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

double ratio(std::uint64_t raw, std::uint64_t stored) {
  return stored ? static_cast<double>(raw) / static_cast<double>(stored) : 1.0;
}

struct Totals {
  std::uint64_t raw = 0;
  std::uint64_t stored = 0;
  std::size_t compressed_blocks = 0;
};

Totals store_totals(const Store& store) {
  Totals t;
  for (const auto& b : store.blocks()) {
    t.raw += b.raw_size;
    t.stored += b.stored_size;
    if (b.codec != Codec::kNone) ++t.compressed_blocks;
  }
  return t;
}

// "1.46x, 120 chunks (3 raw)" or "uncompressed".
std::string compression_text(const Store& store, std::size_t block) {
  const auto& b = store.blocks()[block];
  if (b.codec == Codec::kNone) return "uncompressed";
  std::size_t raw_chunks = 0;
  for (const auto& c : store.block_chunks(block)) raw_chunks += c.codec == ChunkCodec::kRaw;
  std::string text = fixed(ratio(b.raw_size, b.stored_size), 3) + "x, " +
                     std::to_string(b.chunk_count) + " chunks";
  if (raw_chunks) text += " (" + std::to_string(raw_chunks) + " raw)";
  return text;
}

// A one-line progress bar on stderr, redrawn at most ten times a second.
class ProgressBar {
 public:
  ProgressBar(std::ostream& err, bool enabled, std::string label)
      : err_(err),
        enabled_(enabled),
        label_(std::move(label)),
        start_(std::chrono::steady_clock::now()) {}
  ~ProgressBar() {
    if (drawn_) err_ << "\n";
  }

  bool operator()(std::uint64_t done, std::uint64_t total) {
    if (!enabled_) return true;
    const auto now = std::chrono::steady_clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(100)) return true;
    last_ = now;
    const double fraction = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const int width = 30;
    const int filled = static_cast<int>(fraction * width);
    err_ << "\r" << label_ << " [" << std::string(static_cast<std::size_t>(filled), '#')
         << std::string(static_cast<std::size_t>(width - filled), ' ') << "] " << std::setw(3)
         << static_cast<int>(fraction * 100) << "% " << human_bytes(done) << "/"
         << human_bytes(total);
    if (seconds > 0) {
      err_ << " " << human_bytes(static_cast<std::uint64_t>(static_cast<double>(done) / seconds))
           << "/s";
    }
    err_ << "   " << std::flush;
    drawn_ = true;
    return true;
  }

 private:
  std::ostream& err_;
  bool enabled_;
  std::string label_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_{};
  bool drawn_ = false;
};

constexpr const char* kConvertUsage =
    "usage: tensorstream convert [--compress[=LEVEL]] [--chunk-mib N] SRC STORE\n"
    "  --compress[=LEVEL]   compress blocks losslessly (byte planes + zstd), LEVEL 1 (fastest\n"
    "                       to write) .. 9 (smallest), default 3\n"
    "  --chunk-mib N        raw MiB per independently decodable chunk (1..16, default 1)\n";

int cmd_convert(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
                bool interactive) {
  ConvertOptions options;
  std::vector<std::string> paths;
  try {
    for (std::size_t i = 0; i < args.size(); ++i) {
      const auto& a = args[i];
      if (a == "--compress") {
        options.writer.compression.enabled = true;
      } else if (a.rfind("--compress=", 0) == 0) {
        options.writer.compression.enabled = true;
        options.writer.compression.level = static_cast<int>(util::parse_uint(
            "--compress", std::string_view(a).substr(11), codec::kMinLevel, codec::kMaxLevel));
      } else if (a == "--chunk-mib" && i + 1 < args.size()) {
        options.writer.compression.chunk_size =
            static_cast<std::uint32_t>(util::parse_uint("--chunk-mib", args[++i], 1, 16) << 20);
      } else if (a == "-h" || a == "--help") {
        out << kConvertUsage;
        return kExitOk;
      } else if (a.rfind("--", 0) == 0) {
        throw util::UsageError("unknown option '" + a + "'");
      } else {
        paths.push_back(a);
      }
    }
  } catch (const util::UsageError& e) {
    err << "tensorstream convert: " << e.what() << "\n" << kConvertUsage;
    return kExitUsage;
  }
  if (paths.size() != 2) {
    err << kConvertUsage;
    return kExitUsage;
  }
  ProgressBar bar(err, interactive, "convert");
  options.progress = [&bar](std::uint64_t done, std::uint64_t total) { return bar(done, total); };
  const auto start = std::chrono::steady_clock::now();
  const auto summary = convert_safetensors(paths[0], paths[1], options);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out << "wrote " << resolve_store_path(paths[1]).string() << ": " << summary.block_count
      << " blocks, " << summary.tensor_count << " tensors, " << human_bytes(summary.file_size);
  if (options.writer.compression.enabled) {
    const auto store = Store::open(resolve_store_path(paths[1]), OpenOptions{true});
    const auto totals = store_totals(store);
    out << " (level " << options.writer.compression.level << ", "
        << fixed(ratio(totals.raw, totals.stored), 3) << "x smaller than "
        << human_bytes(totals.raw) << ")";
  }
  out << " in " << std::fixed << std::setprecision(2) << seconds << " s (fingerprint "
      << summary.fingerprint.hex() << ")\n";
  return kExitOk;
}

void inspect_json(const Store& store, std::ostream& out) {
  const auto& info = store.info();
  out << "{\"path\":" << detail::json::quote(store.path().string()) << ",\"version\":\""
      << info.version_major << "." << info.version_minor << "\""
      << ",\"file_size\":" << info.file_size << ",\"block_alignment\":" << info.block_alignment
      << ",\"tensor_alignment\":" << info.tensor_alignment << ",\"fingerprint\":\""
      << info.fingerprint.hex() << "\"";
  const auto totals = store_totals(store);
  out << ",\"raw_size\":" << totals.raw << ",\"stored_size\":" << totals.stored
      << ",\"ratio\":" << util::json_number(ratio(totals.raw, totals.stored))
      << ",\"compressed_blocks\":" << totals.compressed_blocks << ",\"blocks\":[";
  for (std::size_t b = 0; b < store.blocks().size(); ++b) {
    const auto& block = store.blocks()[b];
    out << (b ? "," : "") << "{\"name\":" << detail::json::quote(block.name)
        << ",\"offset\":" << block.offset << ",\"size\":" << block.raw_size
        << ",\"stored_size\":" << block.stored_size << ",\"codec\":\"" << codec::name(block.codec)
        << "\",\"ratio\":" << util::json_number(ratio(block.raw_size, block.stored_size))
        << ",\"chunks\":" << block.chunk_count;
    std::size_t raw_chunks = 0;
    int level = 0;
    for (const auto& c : store.block_chunks(b)) {
      raw_chunks += c.codec == ChunkCodec::kRaw;
      level = std::max<int>(level, c.level);
    }
    out << ",\"raw_chunks\":" << raw_chunks << ",\"level\":" << level << ",\"tensors\":[";
    const auto tensors = store.block_tensors(b);
    for (std::size_t t = 0; t < tensors.size(); ++t) {
      const auto& tensor = tensors[t];
      out << (t ? "," : "") << "{\"name\":" << detail::json::quote(tensor.name) << ",\"dtype\":\""
          << dtype_name(tensor.dtype) << "\",\"shape\":" << shape_string(tensor.shape)
          << ",\"offset\":" << tensor.offset_in_block << ",\"nbytes\":" << tensor.nbytes << "}";
    }
    out << "]}";
  }
  out << "]}\n";
}

int cmd_inspect(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  bool json = false;
  std::vector<std::string> paths;
  for (const auto& a : args) {
    if (a == "--json") {
      json = true;
    } else {
      paths.push_back(a);
    }
  }
  if (paths.size() != 1) {
    err << "usage: tensorstream inspect STORE [--json]\n";
    return kExitUsage;
  }
  const auto store = Store::open(resolve_store_path(paths[0]), OpenOptions{true});
  if (json) {
    inspect_json(store, out);
    return kExitOk;
  }
  const auto& info = store.info();
  std::uint64_t tensor_bytes = 0;
  for (const auto& t : store.tensors()) tensor_bytes += t.nbytes;
  out << "store        " << store.path().string() << "\n"
      << "format       " << info.version_major << "." << info.version_minor << "\n"
      << "file size    " << human_bytes(info.file_size) << " (" << info.file_size << " bytes)\n"
      << "tensor data  " << human_bytes(tensor_bytes) << "\n";
  const auto totals = store_totals(store);
  if (totals.compressed_blocks) {
    out << "compression  " << fixed(ratio(totals.raw, totals.stored), 3)
        << "x: " << human_bytes(totals.stored) << " stored for " << human_bytes(totals.raw)
        << " raw (" << totals.compressed_blocks << " of " << store.blocks().size()
        << " blocks compressed, " << store.chunks().size() << " chunks)\n";
  } else {
    out << "compression  none\n";
  }
  out << "blocks       " << store.blocks().size() << " (largest "
      << human_bytes(store.max_block_size()) << ", aligned to " << info.block_alignment << ")\n"
      << "tensors      " << store.tensors().size() << " (aligned to " << info.tensor_alignment
      << ")\n"
      << "fingerprint  " << info.fingerprint.hex() << "\n\n";
  for (std::size_t b = 0; b < store.blocks().size(); ++b) {
    const auto& block = store.blocks()[b];
    out << "block " << b << "  " << block.name << "  " << human_bytes(block.raw_size) << " at "
        << block.offset << ", " << block.tensor_count << " tensors";
    if (block.codec != Codec::kNone) {
      out << ", " << human_bytes(block.stored_size) << " stored, " << compression_text(store, b);
    }
    out << "\n";
    for (const auto& t : store.block_tensors(b)) {
      out << "    " << std::left << std::setw(48) << t.name << " " << std::setw(16)
          << dtype_name(t.dtype) << " " << std::setw(20) << shape_string(t.shape) << std::right
          << " " << human_bytes(t.nbytes) << "\n";
    }
  }
  return kExitOk;
}

int cmd_verify(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
               bool interactive) {
  if (args.size() != 1) {
    err << "usage: tensorstream verify STORE\n";
    return kExitUsage;
  }
  const auto store = Store::open(resolve_store_path(args[0]), OpenOptions{true});
  std::vector<BlockProblem> problems;
  {
    ProgressBar bar(err, interactive, "verify");
    problems = store.verify([&bar](std::uint64_t done, std::uint64_t total) { bar(done, total); });
  }
  for (const auto& p : problems) {
    out << "BAD block " << p.block << " '" << store.blocks()[p.block].name << "': " << p.message
        << "\n";
  }
  const auto totals = store_totals(store);
  if (problems.empty()) {
    out << "OK " << store.path().string() << ": " << store.blocks().size() << " blocks, "
        << store.tensors().size() << " tensors, " << human_bytes(totals.stored) << " verified";
    if (totals.compressed_blocks) {
      out << " (" << totals.compressed_blocks << " compressed blocks: stored and decoded "
          << "checksums, " << human_bytes(totals.raw) << " decoded)";
    }
    out << " (fingerprint " << store.info().fingerprint.hex() << ")\n";
    return kExitOk;
  }
  out << "FAILED " << store.path().string() << ": " << problems.size() << " of "
      << store.blocks().size() << " blocks damaged\n";
  return kExitFailure;
}

}  // namespace

const std::vector<std::string>& native_commands() {
  static const std::vector<std::string> commands{
      "convert", "inspect", "verify", "bench-io", "bench-codec", "doctor", "settings", "version"};
  return commands;
}

int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
        bool interactive) {
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    (args.empty() ? err : out) << kUsage;
    return args.empty() ? kExitUsage : kExitOk;
  }
  const std::string& command = args[0];
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  try {
    if (command == "convert") return cmd_convert(rest, out, err, interactive);
    if (command == "inspect") return cmd_inspect(rest, out, err);
    if (command == "verify") return cmd_verify(rest, out, err, interactive);
    if (command == "doctor") return cmd_doctor(rest, out, err);
    if (command == "bench-io") return cmd_bench_io(rest, out, err);
    if (command == "bench-codec") return cmd_bench_codec(rest, out, err);
    if (command == "settings") return cmd_settings(rest, out, err);
    if (command == "version" || command == "--version") {
      out << "tensorstream " << kVersion << "\n";
      return kExitOk;
    }
  } catch (const std::exception& e) {
    err << "tensorstream " << command << ": error: " << e.what() << "\n";
    return kExitFailure;
  }
  err << "tensorstream: unknown command '" << command << "'\n\n" << kUsage;
  return kExitUsage;
}

}  // namespace tensorstream::cli
