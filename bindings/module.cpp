// tensorstream._core: the nanobind module over the TensorStream engine.
//
// Deliberately thin. Tensors cross the boundary as (pointer, byte count) pairs, so this module
// never touches torch and one build works with every torch version. Every call that does
// I/O or long computation releases the GIL. Engine exceptions become the Python classes
// registered below; std::invalid_argument becomes ValueError (nanobind's default).
#include <nanobind/nanobind.h>
#include <nanobind/stl/filesystem.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "cli.hpp"
#include "tensorstream/block_naming.hpp"
#include "tensorstream/checksum.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/convert.hpp"
#include "tensorstream/dtype.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/safetensors.hpp"
#include "tensorstream/settings.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"
#include "tensorstream/store.hpp"
#include "tensorstream/store_maintenance.hpp"
#include "tensorstream/version.hpp"

namespace nb = nanobind;
namespace fs = std::filesystem;
namespace ts = tensorstream;
using namespace nb::literals;

namespace {

using ReleaseGil = nb::call_guard<nb::gil_scoped_release>;

// ---- exceptions --------------------------------------------------------------------------

// Owned for the life of the process (the module also holds a reference to each).
PyObject* g_error = nullptr;
PyObject* g_format_error = nullptr;
PyObject* g_checksum_error = nullptr;
PyObject* g_io_error = nullptr;
PyObject* g_cuda_error = nullptr;
PyObject* g_cancelled = nullptr;
PyObject* g_budget_error = nullptr;

// Text from C++ (paths, tensor names) is not guaranteed to be UTF-8; never let a bad byte
// turn an error report into a UnicodeDecodeError.
nb::str to_str(std::string_view text) {
  PyObject* s = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace");
  if (s == nullptr) throw nb::python_error();
  return nb::steal<nb::str>(s);
}

void set_error(PyObject* type, const char* what, const int* error_code = nullptr) {
  PyObject* message =
      PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "replace");
  if (message == nullptr) return;  // the decode error is already set
  PyObject* exc = PyObject_CallOneArg(type, message);
  Py_DECREF(message);
  if (exc == nullptr) return;
  if (error_code != nullptr) {
    PyObject* code = PyLong_FromLong(*error_code);
    if (code != nullptr) {
      PyObject_SetAttrString(exc, "errno", code);
      Py_DECREF(code);
    }
  }
  PyErr_SetObject(type, exc);
  Py_DECREF(exc);
}

PyObject* new_exception(nb::module_& m, const char* name, PyObject* base, const char* doc) {
  // Qualified as tensorstream.<Name>: the package re-exports them under that name.
  const std::string qualified = std::string("tensorstream.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base, nullptr);
  if (type == nullptr) throw nb::python_error();
  m.attr(name) = nb::borrow(type);
  return type;
}

void register_exceptions(nb::module_& m) {
  g_error = new_exception(m, "TensorStreamError", PyExc_RuntimeError,
                          "Base class of every TensorStream failure.");
  g_format_error = new_exception(m, "FormatError", g_error,
                                 "A store or safetensors file whose content breaks the format.");
  g_checksum_error = new_exception(m, "ChecksumError", g_format_error,
                                   "Data whose checksum does not match the recorded one.");
  g_io_error = new_exception(m, "StoreIOError", g_error,
                             "A system call failed; `errno` holds the error number.");
  g_cuda_error =
      new_exception(m, "CudaError", g_error, "The CUDA driver or cuFile failed or is not usable.");
  g_cancelled = new_exception(m, "OperationCancelled", g_error,
                              "A progress callback asked a long operation to stop.");
  g_budget_error = new_exception(m, "BudgetTooSmallError", PyExc_ValueError,
                                 "A memory budget below what the model needs; "
                                 "`minimum_budget` holds the smallest budget that works.");

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const ts::engine::BudgetTooSmall& e) {
      set_error(g_budget_error, e.what());
      // Attach the figure that would work, for callers that adapt their budget.
      PyObject *type = nullptr, *value = nullptr, *trace = nullptr;
      PyErr_Fetch(&type, &value, &trace);
      PyErr_NormalizeException(&type, &value, &trace);
      if (value != nullptr) {
        PyObject* minimum = PyLong_FromUnsignedLongLong(e.minimum_budget());
        if (minimum != nullptr) {
          PyObject_SetAttrString(value, "minimum_budget", minimum);
          Py_DECREF(minimum);
        }
      }
      PyErr_Restore(type, value, trace);
    } catch (const ts::OperationCancelled& e) {
      set_error(g_cancelled, e.what());
    } catch (const ts::ChecksumError& e) {
      set_error(g_checksum_error, e.what());
    } catch (const ts::FormatError& e) {
      set_error(g_format_error, e.what());
    } catch (const ts::IoError& e) {
      const int code = e.code();
      set_error(g_io_error, e.what(), &code);
    } catch (const ts::CudaError& e) {
      set_error(g_cuda_error, e.what());
    } catch (const ts::Error& e) {
      set_error(g_error, e.what());
    }
    // Anything else propagates to nanobind's next translator.
  });
}

// ---- helpers -----------------------------------------------------------------------------

ts::DType dtype_or_throw(const std::string& name, std::string_view tensor) {
  const auto dtype = ts::dtype_from_name(name);
  if (!dtype) {
    throw std::invalid_argument(
        ts::detail::concat("tensor '", tensor, "': unsupported dtype '", name, "'"));
  }
  return *dtype;
}

// prod(shape) × dtype size, rejecting negative dimensions and overflow.
std::uint64_t expected_nbytes(ts::DType dtype, const std::vector<std::int64_t>& shape,
                              std::string_view tensor) {
  std::uint64_t n = ts::dtype_size(dtype);
  bool overflow = false;
  for (const auto dim : shape) {
    if (dim < 0) {
      throw std::invalid_argument(
          ts::detail::concat("tensor '", tensor, "': negative dimension ", dim));
    }
    const auto d = static_cast<std::uint64_t>(dim);
    if (d != 0 && n > std::numeric_limits<std::uint64_t>::max() / d) overflow = true;
    n *= d;
  }
  if (overflow && n != 0) {
    throw std::invalid_argument(ts::detail::concat("tensor '", tensor, "': size overflows"));
  }
  return overflow ? 0 : n;
}

std::span<const std::byte> const_bytes(std::uintptr_t ptr, std::uint64_t nbytes,
                                       std::string_view what) {
  if (nbytes == 0) return {};
  if (ptr == 0) {
    throw std::invalid_argument(ts::detail::concat(what, ": null pointer for ", nbytes, " bytes"));
  }
  return {reinterpret_cast<const std::byte*>(ptr), static_cast<std::size_t>(nbytes)};
}

std::span<std::byte> mutable_bytes(std::uintptr_t ptr, std::uint64_t nbytes,
                                   std::string_view what) {
  const auto bytes = const_bytes(ptr, nbytes, what);
  return {const_cast<std::byte*>(bytes.data()), bytes.size()};
}

const char* codec_name(ts::Codec codec) { return ts::codec::name(codec); }

nb::dict info_dict(const ts::Store& store) {
  const auto& info = store.info();
  nb::dict d;
  d["version"] = ts::detail::concat(info.version_major, ".", info.version_minor);
  d["version_major"] = info.version_major;
  d["version_minor"] = info.version_minor;
  d["block_alignment"] = info.block_alignment;
  d["tensor_alignment"] = info.tensor_alignment;
  d["file_size"] = info.file_size;
  d["data_offset"] = info.data_offset;
  d["data_size"] = info.data_size;
  d["metadata_offset"] = info.metadata_offset;
  d["metadata_size"] = info.metadata_size;
  d["fingerprint"] = info.fingerprint.hex();
  d["user_metadata"] = to_str(info.user_metadata);
  return d;
}

nb::dict block_dict(const ts::BlockInfo& b) {
  nb::dict d;
  d["name"] = to_str(b.name);
  d["offset"] = b.offset;
  d["stored_size"] = b.stored_size;
  d["raw_size"] = b.raw_size;
  d["checksum"] = b.checksum;
  d["raw_checksum"] = b.raw_checksum;
  d["codec"] = codec_name(b.codec);
  d["first_tensor"] = b.first_tensor;
  d["tensor_count"] = b.tensor_count;
  return d;
}

nb::dict tensor_dict(const ts::TensorInfo& t) {
  nb::dict d;
  d["name"] = to_str(t.name);
  d["dtype"] = std::string(ts::dtype_name(t.dtype));
  d["shape"] = t.shape;
  d["block"] = t.block;
  d["offset_in_block"] = t.offset_in_block;
  d["nbytes"] = t.nbytes;
  d["checksum"] = t.checksum;
  return d;
}

nb::dict summary_dict(const ts::WriteSummary& s, const fs::path& path) {
  nb::dict d;
  d["path"] = path.string();
  d["file_size"] = s.file_size;
  d["block_count"] = s.block_count;
  d["tensor_count"] = s.tensor_count;
  d["fingerprint"] = s.fingerprint.hex();
  return d;
}

// A StoreWriter plus the lock that makes it safe to call from several Python threads (the
// writer itself is not thread-safe, and its methods run with the GIL released).
struct PyStoreWriter {
  PyStoreWriter(const fs::path& destination, const ts::WriterOptions& options)
      : writer(destination, options) {}

  std::mutex mutex;
  ts::StoreWriter writer;
};

void flush_native_streams() {
  std::cout.flush();
  std::cerr.flush();
  std::fflush(stdout);
  std::fflush(stderr);
}

// ---- Engine ------------------------------------------------------------------------------

// ---- settings and statistics ------------------------------------------------------------

std::string python_type_and_repr(nb::handle value) {
  return ts::detail::concat(Py_TYPE(value.ptr())->tp_name, " ",
                            nb::cast<std::string>(nb::repr(value)));
}

// A Python value for option `row`, as its kind wants it: TypeError naming the key for a value
// of another type (bool is not an integer here), ValueError for a negative or huge integer.
ts::SettingValue setting_value_from(const ts::Setting& row, nb::handle value) {
  const auto wrong_type = [&](std::string_view expected) {
    return nb::type_error(ts::detail::concat("engine option '", row.name, "': expected ", expected,
                                             row.optional ? " or None" : "", "; got ",
                                             python_type_and_repr(value))
                              .c_str());
  };
  if (value.is_none()) {
    if (row.optional) return std::monostate{};
    throw wrong_type(row.kind == ts::SettingKind::kBool      ? "True or False"
                     : row.kind == ts::SettingKind::kInteger ? "an int"
                                                             : "a str");
  }
  switch (row.kind) {
    case ts::SettingKind::kBool:
      if (!PyBool_Check(value.ptr())) throw wrong_type("True or False");
      return value.ptr() == Py_True;
    case ts::SettingKind::kInteger: {
      if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) throw wrong_type("an int");
      const nb::object index = nb::steal(PyNumber_Index(value.ptr()));
      if (!index.is_valid()) throw nb::python_error();
      const unsigned long long n = PyLong_AsUnsignedLongLong(index.ptr());
      if (n == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) {
        PyErr_Clear();
        throw std::invalid_argument(ts::detail::concat(
            "engine option '", row.name, "': ", nb::cast<std::string>(nb::repr(value)),
            " is not a non-negative integer below 2^64"));
      }
      return static_cast<std::uint64_t>(n);
    }
    case ts::SettingKind::kChoice:
    case ts::SettingKind::kText:
    case ts::SettingKind::kPath:
      if (!PyUnicode_Check(value.ptr())) throw wrong_type("a str");
      return nb::cast<std::string>(value);
  }
  throw wrong_type("a value");
}

nb::object setting_value_to_python(const ts::SettingValue& value) {
  if (const auto* b = std::get_if<bool>(&value)) return nb::bool_(*b);
  if (const auto* n = std::get_if<std::uint64_t>(&value)) return nb::int_(*n);
  if (const auto* s = std::get_if<std::string>(&value)) return to_str(*s);
  return nb::none();
}

nb::object text_or_none(std::string_view text) {
  if (text.empty()) return nb::none();
  return to_str(text);
}

nb::dict setting_dict(const ts::Setting& row) {
  nb::dict d;
  d["name"] = to_str(row.name);
  d["scope"] = to_str(ts::setting_scope_name(row.scope));
  d["kind"] = to_str(ts::setting_kind_name(row.kind));
  d["unit"] = to_str(row.unit);
  d["optional"] = row.optional;
  d["default"] = setting_value_to_python(row.default_value);
  d["default_text"] = to_str(row.default_text);
  d["min"] = row.min ? nb::object(nb::int_(*row.min)) : nb::none();
  d["max"] = row.max ? nb::object(nb::int_(*row.max)) : nb::none();
  d["clamped"] = row.clamped;
  nb::list choices;
  for (const auto choice : row.choices) choices.append(to_str(choice));
  d["choices"] = choices;
  d["env"] = text_or_none(row.env);
  d["config_field"] = text_or_none(row.config_field);
  d["config_note"] = text_or_none(row.config_note);
  d["meaning"] = to_str(row.meaning);
  d["engine_option"] = row.is_option();
  return d;
}

// Builds EngineOptions from the plain dict of Config.engine_options(): every key is a row of
// the settings table, applied by name (a typo must not silently fall back to a default).
ts::engine::EngineOptions engine_options_from(const nb::dict& d) {
  ts::engine::EngineOptions o;
  for (const auto& [key_obj, value] : d) {
    if (!PyUnicode_Check(key_obj.ptr())) {
      throw nb::type_error(
          ts::detail::concat("engine option names are str; got ", python_type_and_repr(key_obj))
              .c_str());
    }
    const std::string key = nb::cast<std::string>(key_obj);
    // Per-unit lists and handles: structural options (settings.hpp), not table rows.
    if (key == "unit_needs") {
      if (!value.is_none()) o.unit_needs = nb::cast<std::vector<std::uint64_t>>(value);
      continue;
    }
    if (key == "unit_partial") {
      if (!value.is_none()) o.unit_partial = nb::cast<std::vector<bool>>(value);
      continue;
    }
    if (key == "unit_use_rate") {
      if (!value.is_none()) o.unit_use_rate = nb::cast<std::vector<double>>(value);
      continue;
    }
    if (key == "memory_stream") {
      o.memory_stream = reinterpret_cast<ts::cuda::StreamHandle>(nb::cast<std::uintptr_t>(value));
      continue;
    }
    const ts::Setting* row = ts::find_setting(key);
    if (row == nullptr || !row->is_option()) {
      throw std::invalid_argument(ts::detail::concat("unknown engine option '", key,
                                                     "'; known options: ", ts::option_names()));
    }
    ts::apply_setting(o, key, setting_value_from(*row, value));
  }
  return o;
}

// A statistic as Python sees it: numbers, str, lists, and dicts for the nested structs (each
// through its own for_each_field).
template <class T>
struct is_vector : std::false_type {};
template <class T>
struct is_vector<std::vector<T>> : std::true_type {};

template <class V>
nb::object stat_to_python(const V& value);

struct StatsToDict {
  nb::dict& out;
  template <class V>
  void operator()(std::string_view name, const V& value, std::string_view /*meaning*/) const {
    out[to_str(name)] = stat_to_python(value);
  }
};

template <class V>
nb::object stat_to_python(const V& value) {
  if constexpr (std::is_same_v<V, bool>) {
    return nb::bool_(value);
  } else if constexpr (std::is_arithmetic_v<V>) {
    return nb::cast(value);
  } else if constexpr (std::is_same_v<V, std::string> || std::is_same_v<V, std::string_view>) {
    return to_str(value);
  } else if constexpr (std::is_same_v<V, fs::path>) {
    return to_str(value.string());
  } else if constexpr (is_vector<V>::value) {
    nb::list list;
    for (const auto& item : value) list.append(stat_to_python(item));
    return list;
  } else {
    nb::dict d;
    for_each_field(value, StatsToDict{d});
    return d;
  }
}

nb::dict engine_stats_dict(const ts::engine::EngineStats& s) {
  nb::dict d;
  for_each_field(s, StatsToDict{d});
  return d;
}

// The engine plus the Python callables that provide its device memory (kept alive here).
// Each call holds its own reference, so close() from one thread never destroys the engine
// under a call still running in another (that call fails with "closed" instead).
struct PyEngine {
  std::shared_ptr<ts::engine::Engine> engine;
  std::mutex mutex;

  std::shared_ptr<ts::engine::Engine> get() {
    std::lock_guard lock(mutex);
    if (!engine) throw ts::Error("engine is closed");
    return engine;
  }
};

// Memory for the engine's buffers from Python callables (both or neither).
void set_device_memory(ts::engine::EngineOptions& o, nb::object allocate, nb::object release) {
  if (allocate.is_none() && release.is_none()) return;
  if (allocate.is_none() || release.is_none()) {
    throw std::invalid_argument("give both allocate and release, or neither");
  }
  // The engine copies and calls these without the GIL: hold the callables in shared_ptrs
  // whose deleter takes the GIL, and take it around each call.
  auto hold = [](nb::object fn) {
    return std::shared_ptr<nb::object>(new nb::object(std::move(fn)), [](nb::object* p) {
      nb::gil_scoped_acquire gil;
      delete p;
    });
  };
  auto py_allocate = hold(std::move(allocate));
  auto py_release = hold(std::move(release));
  o.device_memory = ts::engine::MemoryProvider{
      [py_allocate](std::size_t bytes) {
        nb::gil_scoped_acquire gil;
        return nb::cast<std::uint64_t>((*py_allocate)(bytes));
      },
      [py_release](std::uint64_t address, std::size_t bytes) {
        nb::gil_scoped_acquire gil;
        try {
          (*py_release)(address, bytes);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "tensorstream: device memory release failed: %s\n", e.what());
        }
      }};
}

// The planner's view of units from Python's lists (needs and partial optional, per unit).
std::vector<ts::engine::UnitDemand> unit_demands(
    const std::vector<std::uint64_t>& sizes, const std::optional<std::vector<std::uint64_t>>& needs,
    const std::optional<std::vector<bool>>& partial) {
  if ((needs && needs->size() != sizes.size()) || (partial && partial->size() != sizes.size())) {
    throw std::invalid_argument("needs and partial must have one entry per unit");
  }
  std::vector<ts::engine::UnitDemand> out;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    out.push_back({sizes[i], needs ? (*needs)[i] : 0, partial ? bool((*partial)[i]) : false});
  }
  return out;
}

// Blocks given from Python: a dict {block: [tensor, ...]} or a sequence of (block, [tensor]).
ts::engine::TensorGroups tensor_groups_from(const nb::handle& groups) {
  ts::engine::TensorGroups out;
  if (groups.is_none()) return out;
  if (nb::isinstance<nb::dict>(groups)) {
    for (const auto& [name, tensors] : nb::borrow<nb::dict>(groups)) {
      out.emplace_back(nb::cast<std::string>(name), nb::cast<std::vector<std::string>>(tensors));
    }
    return out;
  }
  for (const auto item : groups) {
    out.push_back(nb::cast<std::pair<std::string, std::vector<std::string>>>(item));
  }
  return out;
}

void bind_engine(nb::module_& m) {
  nb::class_<PyEngine>(m, "Engine",
                       "Streams the blocks of a store or safetensors checkpoint into device memory "
                       "within a budget "
                       "(thread-safe).")
      .def(
          "__init__",
          [](PyEngine* self, const fs::path& path, const nb::dict& options, nb::object allocate,
             nb::object release, nb::handle groups) {
            auto o = engine_options_from(options);
            set_device_memory(o, std::move(allocate), std::move(release));
            auto g = tensor_groups_from(groups);
            new (self) PyEngine();
            nb::gil_scoped_release no_gil;
            self->engine = std::make_shared<ts::engine::Engine>(
                ts::engine::Engine::from_store(path, std::move(o), g));
            // `o` (moved from) is destroyed after the GIL is taken back.
          },
          "path"_a, "options"_a, "allocate"_a = nb::none(), "release"_a = nb::none(),
          "groups"_a = nb::none(),
          "Streams the store at `path`. `groups`: units as {name: [tensor, ...]} or a list of "
          "(name, [tensor, ...]) in run order, any of the store's tensors; default: its blocks.")
      .def_static(
          "from_safetensors",
          [](const fs::path& path, const nb::dict& options, nb::object allocate, nb::object release,
             nb::handle groups) {
            auto o = engine_options_from(options);
            set_device_memory(o, std::move(allocate), std::move(release));
            auto g = tensor_groups_from(groups);
            auto self = std::make_unique<PyEngine>();
            {
              nb::gil_scoped_release no_gil;
              self->engine = std::make_shared<ts::engine::Engine>(
                  ts::engine::Engine::from_safetensors(path, std::move(o), g));
            }
            return self.release();
          },
          "path"_a, "options"_a, "allocate"_a = nb::none(), "release"_a = nb::none(),
          "groups"_a = nb::none(), nb::rv_policy::take_ownership,
          "Streams a safetensors checkpoint (a .safetensors file, a Hugging Face checkpoint "
          "directory or an index file) in place. `groups`: {block: [tensor, ...]} or a list of "
          "(block, [tensor, ...]) in run order; default: grouped by layer from the names.")
      .def(
          "tensors",
          [](PyEngine& self, std::uint32_t block) {
            const auto placements = self.get()->tensors(block);
            nb::list out;
            for (const auto& t : placements) {
              nb::dict d;
              d["name"] = t.name;
              d["dtype"] = std::string(ts::dtype_name(t.dtype));
              d["shape"] = t.shape;
              d["offset"] = t.offset;
              d["nbytes"] = t.nbytes;
              out.append(d);
            }
            return out;
          },
          "block"_a,
          "The tensors of `block`: dicts of name, dtype (torch name), shape, offset (in the "
          "block's buffer, from the address acquire() returns) and nbytes.")
      .def(
          "block_name",
          [](PyEngine& self, std::uint32_t block) { return self.get()->block_name(block); },
          "block"_a)
      .def(
          "acquire",
          [](PyEngine& self, std::uint32_t block, std::uintptr_t stream) {
            ts::engine::BlockView view;
            {
              nb::gil_scoped_release no_gil;
              view = self.get()->acquire(block, reinterpret_cast<ts::cuda::StreamHandle>(stream));
            }
            const std::uint64_t address =
                view.host != nullptr ? reinterpret_cast<std::uintptr_t>(view.host) : view.device;
            return nb::make_tuple(address, view.size, view.resident);
          },
          "block"_a, "stream"_a = 0,
          "Makes `block` available; returns (address, size, resident). On a GPU, `stream` "
          "(a CUstream as int) waits on the device for the block's copy.")
      .def(
          "release",
          [](PyEngine& self, std::uint32_t block, std::uintptr_t stream) {
            self.get()->release(block, reinterpret_cast<ts::cuda::StreamHandle>(stream));
          },
          "block"_a, "stream"_a = 0, ReleaseGil())
      .def(
          "prefetch", [](PyEngine& self, std::uint32_t block) { self.get()->prefetch(block); },
          "block"_a, ReleaseGil())
      .def(
          "acquire_rows",
          [](PyEngine& self, std::uint32_t block, std::uint32_t tensor, std::uintptr_t rows,
             std::uint64_t count, std::uintptr_t stream) {
            if (count > 0 && rows == 0) throw std::invalid_argument("acquire_rows: null rows");
            ts::engine::RowsView view;
            {
              nb::gil_scoped_release no_gil;
              view = self.get()->acquire_rows(
                  block, tensor,
                  std::span<const std::int64_t>(reinterpret_cast<const std::int64_t*>(rows),
                                                static_cast<std::size_t>(count)),
                  reinterpret_cast<ts::cuda::StreamHandle>(stream));
            }
            const std::uint64_t address =
                view.host != nullptr ? reinterpret_cast<std::uintptr_t>(view.host) : view.device;
            return nb::make_tuple(view.handle, address, view.rows * view.row_bytes);
          },
          "block"_a, "tensor"_a, "rows"_a, "count"_a, "stream"_a = 0,
          "Reads `count` rows (int64 first-dimension indices at host address `rows`) of tensor "
          "`tensor` of `block`; returns (handle, address, nbytes): the rows one after another. "
          "Release with release_rows(handle, stream).")
      .def(
          "release_rows",
          [](PyEngine& self, std::uint64_t handle, std::uintptr_t stream) {
            self.get()->release_rows(handle, reinterpret_cast<ts::cuda::StreamHandle>(stream));
          },
          "handle"_a, "stream"_a = 0, ReleaseGil())
      .def(
          "max_rows",
          [](PyEngine& self, std::uint32_t block, std::uint32_t tensor) {
            return self.get()->max_rows(block, tensor);
          },
          "block"_a, "tensor"_a, "Rows of that tensor that fit the streaming arena at once.")
      .def("stats",
           [](PyEngine& self) {
             ts::engine::EngineStats s;
             {
               nb::gil_scoped_release no_gil;
               s = self.get()->stats();
             }
             return engine_stats_dict(s);
           })
      .def(
          "counters",
          [](PyEngine& self) {
            ts::engine::EngineStats s;
            {
              nb::gil_scoped_release no_gil;
              s = self.get()->stats();
            }
            return nb::make_tuple(s.device_hits, s.device_misses, s.bytes_to_device);
          },
          "(device_hits, device_misses, bytes_to_device): the counters a caller samples around "
          "each call (stats() builds the whole dict, per-unit lists included)")
      .def(
          "trace_json", [](PyEngine& self) { return self.get()->trace_json(); }, ReleaseGil())
      .def_prop_ro("block_count", [](PyEngine& self) { return self.get()->block_count(); })
      .def_prop_ro("plan",
                   [](PyEngine& self) {
                     const auto engine = self.get();
                     const auto& plan = engine->plan();
                     nb::dict d;
                     d["resident"] = plan.resident;
                     d["arena_bytes"] = plan.arena_bytes;
                     d["largest_need"] = plan.largest_need;
                     d["overlap"] = plan.overlap;
                     d["resident_bytes"] = plan.resident_bytes;
                     d["streamed_bytes"] = plan.streamed_bytes;
                     d["device_bytes"] = plan.device_bytes();
                     return d;
                   })
      .def(
          "close",
          [](PyEngine& self) {
            std::shared_ptr<ts::engine::Engine> engine;
            {
              std::lock_guard lock(self.mutex);
              engine = std::move(self.engine);
            }
            if (engine) {
              nb::gil_scoped_release no_gil;
              engine->close();
              engine.reset();  // callables it holds take the GIL themselves when dropped
            }
          },
          "Cancels pending work and frees every buffer; idempotent.")
      .def_prop_ro("closed", [](PyEngine& self) {
        std::lock_guard lock(self.mutex);
        return self.engine == nullptr;
      });

  m.def(
      "minimum_budget",
      [](const std::vector<std::uint64_t>& sizes, std::uint32_t slots,
         const std::optional<std::vector<std::uint64_t>>& needs,
         const std::optional<std::vector<bool>>& partial) {
        return ts::engine::minimum_budget(unit_demands(sizes, needs, partial), slots);
      },
      "sizes"_a, "slots"_a = 1, "needs"_a = nb::none(), "partial"_a = nb::none(),
      "Smallest device budget under which units of `sizes` stream with an arena of `slots` "
      "largest needs (1: the physical minimum). `needs`/`partial`: see plan_residency.");
  m.def(
      "plan_residency",
      [](const std::vector<std::uint64_t>& sizes, std::uint64_t budget, std::uint32_t slots,
         const std::optional<std::vector<std::uint64_t>>& needs,
         const std::optional<std::vector<bool>>& partial) {
        const auto plan =
            ts::engine::plan_residency(unit_demands(sizes, needs, partial), budget, slots);
        nb::dict d;
        d["resident"] = plan.resident;
        d["arena_bytes"] = plan.arena_bytes;
        d["largest_need"] = plan.largest_need;
        d["overlap"] = plan.overlap;
        d["resident_bytes"] = plan.resident_bytes;
        d["streamed_bytes"] = plan.streamed_bytes;
        d["device_bytes"] = plan.device_bytes();
        return d;
      },
      "sizes"_a, "budget"_a, "slots"_a = 2, "needs"_a = nb::none(), "partial"_a = nb::none(),
      "The engine's residency plan for units of `sizes` under `budget` (BudgetTooSmallError "
      "below the minimum). `needs`: per unit, bytes that must be in the arena at once while it "
      "is used (0: its size); `partial`: per unit, used by rows (made resident last).");
  m.def(
      "unit_sizes",
      [](const fs::path& path, nb::handle groups, bool checkpoint, bool packed) {
        const auto g = tensor_groups_from(groups);
        std::vector<std::uint64_t> out;
        {
          nb::gil_scoped_release no_gil;
          auto layout = checkpoint ? ts::engine::layout_of_safetensors(path, g)
                                   : ts::engine::layout_of_store(path, g);
          for (auto& b : layout.blocks) {
            if (packed) ts::engine::pack_for_device(b);
            out.push_back(packed ? b.memory_size() : b.size);
          }
        }
        return out;
      },
      "path"_a, "groups"_a = nb::none(), "checkpoint"_a = false, "packed"_a = false,
      "Bytes each unit of the store (or safetensors `checkpoint`) at `path` takes in device "
      "memory, as an engine lays it out: read in place or into a CPU buffer (`packed` False), "
      "or repacked with 256-byte aligned tensors (`packed` True: a GPU).");
}

// ---- SafetensorsCheckpoint -----------------------------------------------------------------

nb::dict safetensors_entry_dict(const ts::SafetensorsCheckpoint::Entry& e) {
  nb::dict d;
  d["name"] = to_str(e.tensor->name);
  d["dtype"] = std::string(ts::dtype_name(e.tensor->dtype));
  d["shape"] = e.tensor->shape;
  d["file"] = e.file;
  d["offset"] = e.tensor->offset;
  d["nbytes"] = e.tensor->nbytes;
  return d;
}

const ts::SafetensorsCheckpoint::Entry& safetensors_entry_or_throw(
    const ts::SafetensorsCheckpoint& checkpoint, std::string_view name) {
  const auto* entry = checkpoint.find(name);
  if (entry == nullptr) {
    throw std::invalid_argument(
        ts::detail::concat("safetensors checkpoint has no tensor '", name, "'"));
  }
  return *entry;
}

void bind_safetensors(nb::module_& m) {
  using Checkpoint = ts::SafetensorsCheckpoint;
  nb::class_<Checkpoint>(m, "SafetensorsCheckpoint",
                         "The validated headers of a safetensors checkpoint: a .safetensors file, "
                         "a Hugging Face checkpoint directory or an index file (immutable; "
                         "read_into may run in several threads at once).")
      .def(
          "__init__",
          [](Checkpoint* self, const fs::path& path) {
            new (self) Checkpoint(Checkpoint::open(path));
          },
          "path"_a, ReleaseGil(),
          "Opens every file of the checkpoint at `path` and validates its header (and the "
          "index, if any); raises FormatError / StoreIOError naming the file.")
      .def_prop_ro(
          "files",
          [](const Checkpoint& c) {
            std::vector<std::string> out;
            out.reserve(c.files().size());
            for (const auto& file : c.files()) out.push_back(file.path().string());
            return out;
          },
          "The paths of the checkpoint's files, in the order entries refer to them.")
      .def_prop_ro(
          "entries",
          [](const Checkpoint& c) {
            nb::list out;
            for (const auto& entry : c.entries()) out.append(safetensors_entry_dict(entry));
            return out;
          },
          "Every tensor, in file then offset order: dicts of name, dtype (torch name), shape, "
          "file (index into files), offset (absolute, in that file) and nbytes.")
      .def(
          "find",
          [](const Checkpoint& c, std::string_view name) -> nb::object {
            const auto* entry = c.find(name);
            if (entry == nullptr) return nb::none();
            return safetensors_entry_dict(*entry);
          },
          "name"_a, "The entry of tensor `name` (as in `entries`), or None.")
      .def(
          "__contains__",
          [](const Checkpoint& c, std::string_view name) { return c.find(name) != nullptr; },
          "name"_a)
      .def("__len__", [](const Checkpoint& c) { return c.entries().size(); })
      .def_prop_ro("total_bytes", &Checkpoint::total_bytes, "Sum of all tensors' bytes.")
      .def(
          "read_into",
          [](const Checkpoint& c, std::string_view name, std::uintptr_t ptr, std::uint64_t nbytes) {
            const auto& entry = safetensors_entry_or_throw(c, name);
            c.files()[entry.file].read(
                *entry.tensor,
                mutable_bytes(ptr, nbytes, ts::detail::concat("tensor '", name, "'")));
          },
          "name"_a, "ptr"_a, "nbytes"_a, ReleaseGil(),
          "Reads the bytes of tensor `name` into `nbytes` bytes of writable memory at address "
          "`ptr` (nbytes must equal the tensor's; ValueError otherwise, and for an unknown "
          "name).")
      .def("__repr__", [](const Checkpoint& c) {
        return ts::detail::concat("<tensorstream SafetensorsCheckpoint: ", c.files().size(),
                                  " files, ", c.entries().size(), " tensors>");
      });
}

// ---- compression: codec facts and chunk tables --------------------------------------------
void bind_compression(nb::module_& m) {
  m.def(
      "compression_info",
      [] {
        nb::dict d;
        d["available"] = ts::codec::available();
        d["codec"] = ts::codec::describe();
        d["min_level"] = ts::codec::kMinLevel;
        d["max_level"] = ts::codec::kMaxLevel;
        d["default_level"] = ts::codec::kDefaultLevel;
        d["chunk_size"] = ts::codec::kDefaultChunkSize;
        return d;
      },
      "Whether this build compresses stores (zstd), with the codec's version or why not.");
  m.def(
      "store_compression",
      [](const ts::Store& store) {
        nb::dict d;
        std::uint64_t raw = 0;
        std::uint64_t stored = 0;
        std::size_t compressed = 0;
        for (const auto& b : store.blocks()) {
          raw += b.raw_size;
          stored += b.stored_size;
          compressed += b.codec != ts::Codec::kNone;
        }
        int level = 0;
        std::size_t raw_chunks = 0;
        for (const auto& c : store.chunks()) {
          level = std::max<int>(level, c.level);
          raw_chunks += c.codec == ts::ChunkCodec::kRaw;
        }
        d["raw_size"] = raw;
        d["stored_size"] = stored;
        d["ratio"] = stored ? static_cast<double>(raw) / static_cast<double>(stored) : 1.0;
        d["compressed_blocks"] = compressed;
        d["chunks"] = store.chunks().size();
        d["raw_chunks"] = raw_chunks;
        d["level"] = level;  // the highest level any chunk was written with, 0 if none
        return d;
      },
      "store"_a, "Compression of an open store: sizes, ratio, chunk counts and level.");
  m.def(
      "block_chunks",
      [](const ts::Store& store, std::size_t block) {
        nb::list out;
        for (const auto& c : store.block_chunks(block)) {
          nb::dict d;
          d["raw_offset"] = c.raw_offset;
          d["raw_size"] = c.raw_size;
          d["stored_offset"] = c.stored_offset;
          d["stored_size"] = c.stored_size;
          d["checksum"] = c.checksum;
          d["codec"] = ts::codec::name(c.codec);
          d["plane_width"] = c.plane_width;
          d["level"] = c.level;
          out.append(d);
        }
        return out;
      },
      "store"_a, "block"_a, "The chunk table of block `block` (empty when uncompressed).");
  m.def(
      "read_tensor_into",
      [](const ts::Store& store, std::size_t tensor, std::uintptr_t ptr, std::uint64_t nbytes,
         bool verify) {
        store.read_tensor(tensor, mutable_bytes(ptr, nbytes, "read_tensor_into"), verify);
      },
      "store"_a, "tensor"_a, "ptr"_a, "nbytes"_a, "verify"_a = true, ReleaseGil(),
      "Reads tensor `tensor` alone (only the chunks holding it, of a compressed block) into "
      "`nbytes` bytes at `ptr` (its nbytes); with `verify`, checks its checksum.");
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "TensorStream engine bindings (torch-free; tensors pass as pointer + byte count).";
  m.attr("__version__") = ts::kVersion;
  m.attr("version") = ts::kVersion;
  m.attr("STORE_VERSION") = nb::make_tuple(ts::kStoreVersionMajor, ts::kStoreVersionMinor);
  m.attr("BLOCK_ALIGNMENT") = ts::kBlockAlignment;
  m.attr("SLOT_ALIGNMENT") = ts::kSlotAlignment;
  m.attr("TENSOR_ALIGNMENT") = ts::kTensorAlignment;
  m.attr("DEFAULT_STORE_FILE_NAME") = ts::kDefaultStoreFileName;

  register_exceptions(m);
  bind_engine(m);
  bind_safetensors(m);
  bind_compression(m);

  // ---- settings ----
  m.def(
      "settings",
      [] {
        nb::list out;
        for (const auto& row : ts::settings()) out.append(setting_dict(row));
        return out;
      },
      "The settings table (include/tensorstream/settings.hpp), one dict per setting: name, "
      "scope ('engine', 'io', 'python', 'environment'), kind ('bool', 'integer', 'choice', "
      "'text', 'path'), unit, optional, default, default_text, min, max, clamped, choices, env, "
      "config_field, config_note, meaning and engine_option (whether the options dict of "
      "Engine accepts it).");
  m.def(
      "structural_options",
      [] {
        nb::list out;
        for (const auto& option : ts::structural_options()) {
          nb::dict d;
          d["name"] = to_str(option.name);
          d["given_by"] = to_str(option.given_by);
          d["meaning"] = to_str(option.meaning);
          out.append(d);
        }
        return out;
      },
      "The engine options that are not scalars, and so not rows of settings(): name, given_by "
      "(where a caller gives them instead), meaning.");

  // ---- dtypes ----
  m.def(
      "dtype_names",
      [] {
        std::vector<std::string> names;
        for (unsigned raw = 0; raw <= 0xFF; ++raw) {
          if (ts::dtype_is_valid(static_cast<std::uint16_t>(raw))) {
            names.emplace_back(ts::dtype_name(static_cast<ts::DType>(raw)));
          }
        }
        return names;
      },
      "The torch-style names of every dtype a store can hold.");
  m.def(
      "dtype_size",
      [](const std::string& name) {
        const auto dtype = ts::dtype_from_name(name);
        if (!dtype) throw std::invalid_argument("unknown dtype '" + name + "'");
        return ts::dtype_size(*dtype);
      },
      "name"_a, "Bytes per element of dtype `name` (ValueError if unknown).");

  // ---- Store ----
  nb::class_<ts::Store>(m, "Store",
                        "An open, validated store (immutable; safe to read from several "
                        "threads).")
      .def(
          "__init__",
          [](ts::Store* self, const fs::path& path, bool decode_compressed) {
            new (self) ts::Store(ts::Store::open(path, ts::OpenOptions{decode_compressed}));
          },
          "path"_a, "decode_compressed"_a = false, ReleaseGil(),
          "Opens and validates the store file `path`. A store with compressed blocks is "
          "refused unless `decode_compressed` (its blocks are then read decoded).")
      .def_static(
          "open",
          [](const fs::path& path, bool decode_compressed) {
            return ts::Store::open(path, ts::OpenOptions{decode_compressed});
          },
          "path"_a, "decode_compressed"_a = false, ReleaseGil(),
          "Opens and validates the store file `path` (see __init__).")
      .def_prop_ro("path", [](const ts::Store& s) { return s.path().string(); })
      .def_prop_ro("info", &info_dict, "Store-wide facts from the superblock, as a dict.")
      .def_prop_ro(
          "blocks",
          [](const ts::Store& s) {
            nb::list out;
            for (const auto& b : s.blocks()) out.append(block_dict(b));
            return out;
          },
          "The blocks in file order, as dicts.")
      .def_prop_ro(
          "tensors",
          [](const ts::Store& s) {
            nb::list out;
            for (const auto& t : s.tensors()) out.append(tensor_dict(t));
            return out;
          },
          "The tensors in store order, as dicts.")
      .def(
          "block_tensors",
          [](const ts::Store& s, std::size_t block) {
            nb::list out;
            for (const auto& t : s.block_tensors(block)) out.append(tensor_dict(t));
            return out;
          },
          "block"_a)
      .def("find_block", &ts::Store::find_block, "name"_a)
      .def("find_tensor", &ts::Store::find_tensor, "name"_a)
      .def_prop_ro("max_block_size", &ts::Store::max_block_size)
      .def(
          "read_block_into",
          [](const ts::Store& s, std::size_t index, std::uintptr_t ptr, std::uint64_t nbytes,
             bool verify) {
            s.read_block(index, mutable_bytes(ptr, nbytes, "read_block_into"), verify);
          },
          "index"_a, "ptr"_a, "nbytes"_a, "verify"_a = true, ReleaseGil(),
          "Reads block `index` into `nbytes` bytes of writable memory at address `ptr` "
          "(nbytes must equal the block's raw_size). With `verify`, raises ChecksumError on "
          "a mismatch.")
      .def(
          "verify",
          [](const ts::Store& s) {
            std::vector<std::pair<std::uint32_t, std::string>> out;
            for (auto& p : s.verify()) out.emplace_back(p.block, std::move(p.message));
            return out;
          },
          ReleaseGil(), "Checks every block; returns [(block index, message)] of damaged ones.")
      .def("__repr__", [](const ts::Store& s) {
        return ts::detail::concat("<tensorstream Store '", s.path().string(),
                                  "': ", s.blocks().size(), " blocks, ", s.tensors().size(),
                                  " tensors>");
      });

  // ---- StoreWriter ----
  nb::class_<PyStoreWriter>(m, "StoreWriter",
                            "Writes a store block by block, crash-safely (temporary file + "
                            "rename on commit).")
      .def(
          "__init__",
          [](PyStoreWriter* self, const fs::path& path, std::uint32_t block_alignment,
             std::uint32_t tensor_alignment, bool durable, int compression_level,
             std::uint32_t chunk_size) {
            ts::WriterOptions options;
            options.block_alignment = block_alignment;
            options.tensor_alignment = tensor_alignment;
            options.durable = durable;
            options.compression.enabled = compression_level != 0;
            if (compression_level != 0) options.compression.level = compression_level;
            options.compression.chunk_size = chunk_size;
            new (self) PyStoreWriter(path, options);
          },
          "path"_a, "block_alignment"_a = ts::kBlockAlignment,
          "tensor_alignment"_a = ts::kTensorAlignment, "durable"_a = true,
          "compression_level"_a = 0, "chunk_size"_a = ts::codec::kDefaultChunkSize, ReleaseGil(),
          "A writer for `path`. `compression_level` 1..9 compresses the blocks losslessly "
          "(0: no compression); `chunk_size` is the raw bytes per compressed chunk.")
      .def_prop_ro("destination",
                   [](const PyStoreWriter& w) { return w.writer.destination().string(); })
      .def_prop_ro("temp_path",
                   [](const PyStoreWriter& w) { return w.writer.temp_path().string(); })
      .def(
          "begin_block",
          [](PyStoreWriter& w, const std::string& name) {
            std::lock_guard lock(w.mutex);
            w.writer.begin_block(name);
          },
          "name"_a, ReleaseGil())
      .def(
          "add_tensor",
          [](PyStoreWriter& w, const std::string& name, const std::string& dtype_name,
             const std::vector<std::int64_t>& shape, std::uintptr_t ptr, std::uint64_t nbytes) {
            const auto dtype = dtype_or_throw(dtype_name, name);
            const auto expected = expected_nbytes(dtype, shape, name);
            if (nbytes != expected) {
              throw std::invalid_argument(ts::detail::concat("tensor '", name, "': ", nbytes,
                                                             " bytes given but dtype ", dtype_name,
                                                             " × shape needs ", expected));
            }
            const auto data = const_bytes(ptr, nbytes, ts::detail::concat("tensor '", name, "'"));
            std::lock_guard lock(w.mutex);
            w.writer.add_tensor(name, dtype, shape, data);
          },
          "name"_a, "dtype"_a, "shape"_a, "ptr"_a, "nbytes"_a, ReleaseGil(),
          "Adds one tensor whose `nbytes` bytes lie at address `ptr` (read during the call).")
      .def(
          "begin_tensor",
          [](PyStoreWriter& w, const std::string& name, const std::string& dtype_name,
             const std::vector<std::int64_t>& shape) {
            const auto dtype = dtype_or_throw(dtype_name, name);
            (void)expected_nbytes(dtype, shape, name);
            std::lock_guard lock(w.mutex);
            w.writer.begin_tensor(name, dtype, shape);
          },
          "name"_a, "dtype"_a, "shape"_a, ReleaseGil())
      .def(
          "append",
          [](PyStoreWriter& w, std::uintptr_t ptr, std::uint64_t nbytes) {
            const auto data = const_bytes(ptr, nbytes, "append");
            std::lock_guard lock(w.mutex);
            w.writer.append(data);
          },
          "ptr"_a, "nbytes"_a, ReleaseGil())
      .def(
          "end_tensor",
          [](PyStoreWriter& w) {
            std::lock_guard lock(w.mutex);
            w.writer.end_tensor();
          },
          ReleaseGil())
      .def(
          "end_block",
          [](PyStoreWriter& w) {
            std::lock_guard lock(w.mutex);
            w.writer.end_block();
          },
          ReleaseGil())
      .def(
          "set_user_metadata",
          [](PyStoreWriter& w, std::string text) {
            std::lock_guard lock(w.mutex);
            w.writer.set_user_metadata(std::move(text));
          },
          "text"_a)
      .def(
          "commit",
          [](PyStoreWriter& w) {
            ts::WriteSummary summary;
            {
              nb::gil_scoped_release release;
              std::lock_guard lock(w.mutex);
              summary = w.writer.commit();
            }
            return summary_dict(summary, w.writer.destination());
          },
          "Makes the store durable and renames it into place; returns a summary dict.")
      .def(
          "abort",
          [](PyStoreWriter& w) {
            std::lock_guard lock(w.mutex);
            w.writer.abort();
          },
          ReleaseGil(), "Deletes the temporary file; idempotent.");

  // ---- free functions ----
  m.def(
      "cleanup_orphaned_files",
      [](const fs::path& path) {
        std::vector<std::string> out;
        for (const auto& p : ts::cleanup_orphaned_files(path)) out.push_back(p.string());
        return out;
      },
      "path"_a, ReleaseGil(),
      "Removes temporaries of dead writers in the directory of `path`; returns their paths.");
  m.def(
      "group_into_blocks",
      [](const std::vector<std::string>& names) {
        std::vector<std::pair<std::string, std::vector<std::string>>> out;
        for (auto& g : ts::group_into_blocks(names)) {
          out.emplace_back(std::move(g.name), std::move(g.tensors));
        }
        return out;
      },
      "names"_a, "Groups tensor names into blocks: [(block name, [tensor names])].");
  m.def("block_name_for", &ts::block_name_for, "name"_a);
  m.def(
      "checksum64",
      [](std::uintptr_t ptr, std::uint64_t nbytes) {
        return ts::checksum64(const_bytes(ptr, nbytes, "checksum64"));
      },
      "ptr"_a, "nbytes"_a, ReleaseGil(), "XXH3-64 of `nbytes` bytes at address `ptr`.");
  m.def(
      "checksum64",
      [](nb::bytes data) {
        return ts::checksum64(
            std::span<const std::byte>(static_cast<const std::byte*>(data.data()), data.size()));
      },
      "data"_a, "XXH3-64 of `data`.");
  m.def(
      "fingerprint",
      [](const std::vector<std::tuple<std::string, std::string, std::vector<std::int64_t>,
                                      std::uint64_t>>& tensors) {
        ts::FingerprintBuilder builder;
        for (const auto& [name, dtype, shape, checksum] : tensors) {
          builder.add(name, dtype_or_throw(dtype, name), shape, checksum);
        }
        return builder.finish().hex();
      },
      "tensors"_a, "Model fingerprint of [(name, dtype name, shape, checksum64 of the bytes)].");
  m.def(
      "convert_safetensors",
      [](const fs::path& source, const fs::path& destination, std::optional<nb::callable> progress,
         std::uint32_t block_alignment, std::uint32_t tensor_alignment, bool durable,
         int compression_level) {
        ts::ConvertOptions options;
        options.writer.block_alignment = block_alignment;
        options.writer.tensor_alignment = tensor_alignment;
        options.writer.durable = durable;
        options.writer.compression.enabled = compression_level != 0;
        if (compression_level != 0) options.writer.compression.level = compression_level;
        if (progress) {
          options.progress = [&progress](std::uint64_t done, std::uint64_t total) {
            nb::gil_scoped_acquire acquire;
            const nb::object result = (*progress)(done, total);
            // None (a callback without a return statement) means "go on".
            return result.is_none() || PyObject_IsTrue(result.ptr()) != 0;
          };
        }
        ts::WriteSummary summary;
        fs::path store_path;
        {
          nb::gil_scoped_release release;
          store_path = ts::resolve_store_path(destination);
          summary = ts::convert_safetensors(source, destination, options);
        }
        return summary_dict(summary, store_path);
      },
      "source"_a, "destination"_a, "progress"_a = nb::none(),
      "block_alignment"_a = ts::kBlockAlignment, "tensor_alignment"_a = ts::kTensorAlignment,
      "durable"_a = true, "compression_level"_a = 0,
      "Converts a .safetensors file or a Hugging Face checkpoint directory into a store. "
      "`progress(done_bytes, total_bytes)` is called along the way; returning False cancels "
      "(OperationCancelled). `compression_level` 1..9 compresses it (0: no compression).");
  m.def(
      "resolve_store_path",
      [](const fs::path& path) { return ts::resolve_store_path(path).string(); }, "path"_a,
      "`path`, or `path/model.tstore` when `path` is a directory.");

  // ---- CLI ----
  m.def(
      "cli_run",
      [](const std::vector<std::string>& args, bool interactive) {
        const int code = ts::cli::run(args, std::cout, std::cerr, interactive);
        flush_native_streams();
        return code;
      },
      "args"_a, "interactive"_a = false, ReleaseGil(),
      "Runs the native `tensorstream` CLI (args exclude the program name); prints to the "
      "process's stdout/stderr and returns the exit code.");
  m.def("native_commands", &ts::cli::native_commands, "Subcommands implemented by the native CLI.");

  // ---- platform ----
  m.def(
      "cuda_driver_status",
      [] {
        ts::cuda::DriverStatus status;
        bool compiled = false;
        {
          nb::gil_scoped_release release;
          status = ts::cuda::driver_status();
          compiled = ts::cuda::compiled_with_cuda();
        }
        nb::dict d;
        d["available"] = status.available;
        d["driver_version"] = status.driver_version;
        d["device_count"] = status.device_count;
        d["device0_name"] = to_str(status.device0_name);
        d["reason"] = to_str(status.reason);
        d["library"] = to_str(status.library);
        d["entry_points"] = to_str(status.entry_points);
        nb::list disabled;
        for (const auto& off : status.disabled) disabled.append(to_str(off));
        d["disabled"] = disabled;
        d["compiled_with_cuda"] = compiled;
        return d;
      },
      "What the process found when it looked for the CUDA driver (never raises).");
  m.def(
      "cufile_status",
      [] {
        ts::cuda::CuFileStatus status;
        {
          nb::gil_scoped_release release;
          status = ts::cuda::cufile_status();
        }
        nb::dict d;
        d["compiled"] = status.compiled;
        d["library_loaded"] = status.library_loaded;
        d["library"] = to_str(status.library);
        d["version"] = status.version;
        d["driver_opened"] = status.driver_opened;
        d["nvidia_fs"] = status.nvidia_fs;
        d["reason"] = to_str(status.reason);
        return d;
      },
      "What the process found when it looked for cuFile / GPUDirect Storage (never raises).");
}
