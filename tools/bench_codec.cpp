// `tensorstream bench-codec`: what lossless compression would give on a store's tensors.
//
// For each dtype present, a sample of the tensors' bytes (decoded if the store is compressed)
// is cut into chunks the way StoreWriter cuts them, encoded at each level with byte planes
// (what stores use) and with plain zstd (no planes: what a general-purpose compressor does),
// and decoded on 1, 2, ... threads at once. Reported: the ratio (raw / stored bytes, raw
// chunks included), encoding MB/s on one thread, and decoding GB/s per thread (raw bytes out
// per second of wall time, divided by the threads). Decoding runs from memory into memory,
// so it measures the codec alone, not the storage path. The median of the repeats is given.
#include <algorithm>
#include <chrono>
#include <iomanip>
#include <map>
#include <ostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli.hpp"
#include "cli_util.hpp"
#include "commands.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/convert.hpp"
#include "tensorstream/detail/json_writer.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "tensorstream/version.hpp"

namespace tensorstream::cli {
namespace {

using util::fixed;
using util::human_bytes;
using util::json_number;
namespace json = tensorstream::detail::json;

constexpr const char* kCodecUsage =
    "usage: tensorstream bench-codec STORE [options]\n"
    "\n"
    "Compresses a sample of STORE's tensors per dtype with byte planes + zstd (as compressed\n"
    "stores do) and with plain zstd, at each level, and decodes them from memory on 1..N\n"
    "threads at once. Reports the ratio, encoding MB/s (one thread) and decoding GB/s per\n"
    "thread.\n"
    "\n"
    "  --levels LIST        compression levels, 1..9 (default 1,3,9)\n"
    "  --threads LIST       decoding thread counts (default 1,2)\n"
    "  --max-mib N          raw MiB sampled per dtype, from the largest tensors (default 64)\n"
    "  --chunk-mib N        raw MiB per chunk, 1..16 (default 1)\n"
    "  --repeat N           decoding passes per measurement; the median is reported (3)\n"
    "  --json               print one JSON object instead of the table\n";

struct Options {
  std::filesystem::path store;
  std::vector<int> levels{1, 3, 9};
  std::vector<unsigned> threads{1, 2};
  std::uint64_t max_bytes = 64ull << 20;
  std::uint32_t chunk_size = codec::kDefaultChunkSize;
  unsigned repeat = 3;
  bool json = false;
};

std::vector<std::uint64_t> parse_list(const std::string& option, const std::string& text,
                                      std::uint64_t min, std::uint64_t max) {
  std::vector<std::uint64_t> out;
  std::stringstream list(text);
  std::string item;
  while (std::getline(list, item, ',')) out.push_back(util::parse_uint(option, item, min, max));
  if (out.empty()) throw util::UsageError(option + ": empty list");
  return out;
}

Options parse_options(const std::vector<std::string>& args) {
  Options o;
  std::vector<std::string> positional;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw util::UsageError(a + ": missing value");
      return args[++i];
    };
    if (a == "--levels") {
      o.levels.clear();
      for (auto v : parse_list(a, value(), codec::kMinLevel, codec::kMaxLevel)) {
        o.levels.push_back(static_cast<int>(v));
      }
    } else if (a == "--threads") {
      o.threads.clear();
      for (auto v : parse_list(a, value(), 1, 256)) o.threads.push_back(static_cast<unsigned>(v));
    } else if (a == "--max-mib") {
      o.max_bytes = util::parse_uint(a, value(), 1, 1u << 20) << 20;
    } else if (a == "--chunk-mib") {
      o.chunk_size = static_cast<std::uint32_t>(util::parse_uint(a, value(), 1, 16) << 20);
    } else if (a == "--repeat") {
      o.repeat = static_cast<unsigned>(util::parse_uint(a, value(), 1, 1000));
    } else if (a == "--json") {
      o.json = true;
    } else if (a.rfind("--", 0) == 0) {
      throw util::UsageError("unknown option '" + a + "'");
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 1) throw util::UsageError("expected one STORE");
  o.store = positional[0];
  return o;
}

// The raw bytes of one dtype's sample, cut into chunks as StoreWriter cuts them.
struct Sample {
  DType dtype{};
  std::vector<std::byte> bytes;
  std::vector<std::pair<std::size_t, std::size_t>> chunks;  // offset, size in `bytes`
  std::size_t tensors = 0;
};

std::vector<Sample> take_samples(const Store& store, const Options& o) {
  std::map<DType, std::vector<std::size_t>> by_dtype;
  for (std::size_t i = 0; i < store.tensors().size(); ++i) {
    if (store.tensors()[i].nbytes > 0) by_dtype[store.tensors()[i].dtype].push_back(i);
  }
  std::vector<Sample> out;
  for (auto& [dtype, indices] : by_dtype) {
    // The largest tensors first: they are the bulk of a model (norm vectors are not).
    std::stable_sort(indices.begin(), indices.end(), [&](std::size_t a, std::size_t b) {
      return store.tensors()[a].nbytes > store.tensors()[b].nbytes;
    });
    Sample s;
    s.dtype = dtype;
    for (const auto i : indices) {
      if (s.bytes.size() >= o.max_bytes) break;
      const auto& t = store.tensors()[i];
      const auto n =
          static_cast<std::size_t>(std::min<std::uint64_t>(t.nbytes, o.max_bytes - s.bytes.size()));
      const auto at = s.bytes.size();
      s.bytes.resize(at + n);
      // Only the part sampled is read (and, from a compressed store, decoded).
      store.read_range(t.block, t.offset_in_block, std::span(s.bytes).subspan(at, n), false);
      for (std::size_t c = 0; c < n; c += o.chunk_size) {
        s.chunks.emplace_back(at + c, std::min<std::size_t>(o.chunk_size, n - c));
      }
      ++s.tensors;
    }
    out.push_back(std::move(s));
  }
  return out;
}

struct Encoded {
  std::vector<ChunkInfo> chunks;
  std::vector<std::byte> stored;
  double encode_seconds = 0;
};

Encoded encode_sample(const Sample& s, int level, codec::PlaneMode mode) {
  codec::ChunkEncoder encoder(level, mode);
  Encoded e;
  const unsigned width = codec::plane_width(s.dtype);
  const auto start = std::chrono::steady_clock::now();
  for (const auto& [offset, size] : s.chunks) {
    const auto chunk =
        encoder.encode(std::span<const std::byte>(s.bytes).subspan(offset, size), width);
    ChunkInfo info;
    info.raw_offset = offset;
    info.raw_size = static_cast<std::uint32_t>(size);
    info.stored_offset = e.stored.size();
    info.stored_size = static_cast<std::uint32_t>(chunk.bytes.size());
    info.codec = chunk.codec;
    info.plane_width = chunk.plane_width;
    info.level = chunk.level;
    e.stored.insert(e.stored.end(), chunk.bytes.begin(), chunk.bytes.end());
    e.chunks.push_back(info);
  }
  e.encode_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return e;
}

// Decodes every chunk on decoders.size() threads, one decoder each, in contiguous shares;
// returns wall seconds. Checks the result bitwise (a benchmark of a wrong decoder would be
// worthless).
double decode_once(const Sample& s, const Encoded& e, std::span<codec::ChunkDecoder> decoders,
                   std::vector<std::byte>& out) {
  const auto threads = static_cast<unsigned>(decoders.size());
  codec::BlockDecode job;
  job.file = "bench-codec";
  job.block_name = dtype_name(s.dtype);
  job.chunks = e.chunks;
  job.stored = e.stored;
  job.raw = out;
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  const std::size_t n = e.chunks.size();
  const auto start = std::chrono::steady_clock::now();
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      try {
        auto& decoder = decoders[t];
        for (std::size_t i = n * t / threads; i < n * (t + 1) / threads; ++i) {
          codec::decode_chunk(job, i, decoder);
        }
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& t : pool) t.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  TS_EXPECT(out == s.bytes, Error, "bench-codec: decoded ", dtype_name(s.dtype),
            " bytes differ from the input");
  return seconds;
}

struct Row {
  DType dtype{};
  std::size_t tensors = 0;
  std::uint64_t bytes = 0;
  int level = 0;
  double ratio = 0;
  double plain_ratio = 0;
  double encode_mbps = 0;
  double plain_encode_mbps = 0;
  std::size_t raw_chunks = 0;
  std::size_t chunks = 0;
  std::map<unsigned, double> decode_gbps_per_thread;
  std::map<unsigned, double> plain_decode_gbps_per_thread;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::map<unsigned, double> decode_speeds(const Sample& s, const Encoded& e, const Options& o) {
  std::vector<std::byte> out(s.bytes.size());
  // Decoders (zstd contexts, scratch) made and warmed outside the timed runs, as a fill
  // path's long-lived threads would have them.
  std::vector<codec::ChunkDecoder> decoders(*std::max_element(o.threads.begin(), o.threads.end()));
  for (auto& d : decoders) (void)decode_once(s, e, std::span(&d, 1), out);
  std::map<unsigned, double> speeds;
  for (const auto threads : o.threads) {
    std::vector<double> seconds;
    for (unsigned r = 0; r < o.repeat; ++r) {
      seconds.push_back(decode_once(s, e, std::span(decoders).first(threads), out));
    }
    const double t = median(seconds);
    speeds[threads] = t > 0 ? static_cast<double>(s.bytes.size()) / t / 1e9 / threads : 0;
  }
  return speeds;
}

double stored_ratio(const Sample& s, const Encoded& e) {
  return e.stored.empty()
             ? 1.0
             : static_cast<double>(s.bytes.size()) / static_cast<double>(e.stored.size());
}

}  // namespace

int cmd_bench_codec(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  Options o;
  try {
    if (!args.empty() && (args[0] == "-h" || args[0] == "--help")) {
      out << kCodecUsage;
      return kExitOk;
    }
    o = parse_options(args);
  } catch (const util::UsageError& e) {
    err << "tensorstream bench-codec: " << e.what() << "\n" << kCodecUsage;
    return kExitUsage;
  }
  if (!codec::available()) {
    err << "tensorstream bench-codec: " << codec::describe() << "\n";
    return kExitFailure;
  }
  const auto store = Store::open(resolve_store_path(o.store), OpenOptions{true});
  const auto samples = take_samples(store, o);
  std::vector<Row> rows;
  for (const auto& s : samples) {
    for (const int level : o.levels) {
      Row row;
      row.dtype = s.dtype;
      row.tensors = s.tensors;
      row.bytes = s.bytes.size();
      row.level = level;
      const auto planes = encode_sample(s, level, codec::PlaneMode::kAuto);
      const auto plain = encode_sample(s, level, codec::PlaneMode::kNever);
      row.ratio = stored_ratio(s, planes);
      row.plain_ratio = stored_ratio(s, plain);
      row.encode_mbps = static_cast<double>(s.bytes.size()) / planes.encode_seconds / 1e6;
      row.plain_encode_mbps = static_cast<double>(s.bytes.size()) / plain.encode_seconds / 1e6;
      row.chunks = planes.chunks.size();
      for (const auto& c : planes.chunks) row.raw_chunks += c.codec == ChunkCodec::kRaw;
      row.decode_gbps_per_thread = decode_speeds(s, planes, o);
      row.plain_decode_gbps_per_thread = decode_speeds(s, plain, o);
      rows.push_back(std::move(row));
    }
  }

  const auto machine = util::machine_info();
  if (o.json) {
    auto speeds = [](const std::map<unsigned, double>& m) {
      std::string text = "{";
      for (const auto& [threads, gbps] : m) {
        text += (text.size() > 1 ? ",\"" : "\"") + std::to_string(threads) +
                "\":" + json_number(gbps, 4);
      }
      return text + "}";
    };
    out << "{\"tool\":\"tensorstream bench-codec\",\"version\":" << json::quote(kVersion)
        << ",\"codec\":" << json::quote(codec::describe())
        << ",\"store\":" << json::quote(store.path().string()) << ",\"chunk_size\":" << o.chunk_size
        << ",\"repeat\":" << o.repeat << ",\"machine\":{\"cpus\":" << machine.cpus
        << ",\"memory_bytes\":" << machine.memory_bytes
        << ",\"kernel\":" << json::quote(machine.kernel)
        << ",\"load_average\":" << json_number(machine.load_average, 3) << "},\"results\":[";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      out << (i ? "," : "") << "{\"dtype\":" << json::quote(dtype_name(r.dtype))
          << ",\"tensors\":" << r.tensors << ",\"bytes\":" << r.bytes << ",\"level\":" << r.level
          << ",\"zstd_level\":" << codec::zstd_level(r.level)
          << ",\"ratio\":" << json_number(r.ratio, 5)
          << ",\"plain_ratio\":" << json_number(r.plain_ratio, 5)
          << ",\"encode_mbps\":" << json_number(r.encode_mbps, 4)
          << ",\"plain_encode_mbps\":" << json_number(r.plain_encode_mbps, 4)
          << ",\"chunks\":" << r.chunks << ",\"raw_chunks\":" << r.raw_chunks
          << ",\"decode_gbps_per_thread\":" << speeds(r.decode_gbps_per_thread)
          << ",\"plain_decode_gbps_per_thread\":" << speeds(r.plain_decode_gbps_per_thread) << "}";
    }
    out << "]}\n";
    return kExitOk;
  }
  out << "bench-codec " << store.path().string() << " (" << codec::describe() << ", chunks of "
      << human_bytes(o.chunk_size) << ", " << machine.cpus << " CPUs, load "
      << fixed(machine.load_average, 2) << ")\n\n";
  out << std::left << std::setw(16) << "dtype" << std::right << std::setw(10) << "sample"
      << std::setw(6) << "level" << std::setw(8) << "ratio" << std::setw(8) << "plain"
      << std::setw(10) << "enc MB/s";
  for (const auto t : o.threads) out << std::setw(12) << ("dec/thr@" + std::to_string(t));
  out << std::setw(14) << ("plain dec@" + std::to_string(o.threads.front())) << "\n";
  for (const auto& r : rows) {
    out << std::left << std::setw(16) << dtype_name(r.dtype) << std::right << std::setw(10)
        << human_bytes(r.bytes) << std::setw(6) << r.level << std::setw(8) << fixed(r.ratio, 3)
        << std::setw(8) << fixed(r.plain_ratio, 3) << std::setw(10) << fixed(r.encode_mbps, 0);
    for (const auto t : o.threads) {
      out << std::setw(12) << (fixed(r.decode_gbps_per_thread.at(t), 2) + " GB/s");
    }
    const auto plain1 = r.plain_decode_gbps_per_thread.at(o.threads.front());
    out << std::setw(14) << (fixed(plain1, 2) + " GB/s") << "\n";
  }
  out << "\nratio: raw / stored bytes with byte planes + zstd (raw chunks included); plain: zstd\n"
         "without byte planes; dec/thr@N: decoded GB/s per thread with N threads at once\n"
         "(from memory to memory: the codec alone, not the storage path).\n";
  return kExitOk;
}

}  // namespace tensorstream::cli
