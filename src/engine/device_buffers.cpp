#include "tensorstream/engine/detail/device_buffers.hpp"

#include <algorithm>
#include <cstring>

#include "tensorstream/alignment.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

BlockBuffer BlockBuffer::allocate(const cuda::Device* device,
                                  const std::optional<MemoryProvider>& provider,
                                  std::uint64_t bytes, bool resident) {
  BlockBuffer b(bytes, resident);
  b.device_ = device;
  std::uint64_t address = 0;
  if (provider) {
    address = provider->allocate(bytes);
    TS_EXPECT(address != 0, Error, "device_memory.allocate(", bytes, ") returned null");
  }
  if (device != nullptr) {
    if (provider) {
      TS_EXPECT(address % kDeviceAddressAlignment == 0, std::invalid_argument,
                "device_memory.allocate returned an address not aligned to ",
                kDeviceAddressAlignment, " bytes");
      b.dev_ptr_ = address;
      auto release = provider->release;
      b.provided_ = std::shared_ptr<void>(
          nullptr, [release, address, bytes](void*) { release(address, bytes); });
    } else {
      b.dev_.emplace(*device, bytes);
      b.dev_ptr_ = b.dev_->ptr();
    }
    b.ready_.emplace(*device);
    b.done_.emplace(*device);
  } else if (provider) {
    auto release = provider->release;
    b.host_ = AlignedBuffer::adopt(reinterpret_cast<std::byte*>(address), bytes,
                                   [release](std::byte* data, std::size_t size) {
                                     release(reinterpret_cast<std::uint64_t>(data), size);
                                   });
  } else {
    b.host_ = AlignedBuffer(bytes);
    // Fault slots in now: a slot's first fill would otherwise pay for allocating (and, for
    // huge pages, compacting) its memory inside the streaming path (measured: the first
    // two 256 MiB fills ran at a third of the speed of the rest).
    if (!resident) std::memset(b.host_.data(), 0, bytes);
  }
  return b;
}

void BlockBuffer::make_wait_for_ready(cuda::StreamHandle stream) const {
  if (ready_) cuda::stream_wait_event(*device_, stream, *ready_);
}

bool BlockBuffer::record_done(cuda::StreamHandle stream) const {
  if (!done_) return false;
  done_->record(stream);
  return true;
}

void BlockBuffer::wait_until_unused(bool wait_for_release) const {
  if (wait_for_release) done_->synchronize();
  ready_->synchronize();
}

void BlockBuffer::record_ready(cuda::StreamHandle copy_stream) const {
  ready_->record(copy_stream);
}

void BlockBuffer::wait_for_copy() const {
  if (ready_) ready_->synchronize();
}

void BlockBuffer::copy_from_host(const std::byte* source, std::size_t bytes,
                                 cuda::StreamHandle copy_stream, bool wait_for_release) {
  if (device_ != nullptr) {
    if (wait_for_release) cuda::stream_wait_event(*device_, copy_stream, *done_);
    cuda::memcpy_htod_async(*device_, dev_ptr_, source, bytes, copy_stream);
    ready_->record(copy_stream);
  } else if (source != host_.data()) {
    std::memcpy(host_.data(), source, bytes);
  }
}

void BlockBuffer::finish_previous_copy() {
  if (!copy_source_) return;
  // The previous fill's copy may still read from this pinned source: let it finish.
  ready_->synchronize();
  copy_source_.reset();
}

void BlockBuffer::register_with_cufile() {
  cufile_registration_.emplace(*device_, dev_ptr_, static_cast<std::size_t>(size_));
}

std::uint64_t resident_buffer_bytes(std::uint64_t size) noexcept {
  return align_up(std::max<std::uint64_t>(size, 1), kSlotAlignment);
}

std::vector<BlockBuffer> allocate_block_buffers(const ResidencyPlan& plan,
                                                const std::vector<std::uint64_t>& sizes,
                                                const cuda::Device* device,
                                                const std::optional<MemoryProvider>& provider,
                                                bool with_memory) {
  TS_EXPECT(!provider || (provider->allocate && provider->release), std::invalid_argument,
            "device_memory needs both allocate and release");
  std::vector<BlockBuffer> buffers;
  const auto make = [&](std::uint64_t bytes, bool resident) {
    buffers.push_back(with_memory ? BlockBuffer::allocate(device, provider, bytes, resident)
                                  : BlockBuffer(bytes, resident));
  };
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (plan.resident[i]) make(resident_buffer_bytes(sizes[i]), true);
  }
  for (unsigned s = 0; s < plan.slots; ++s) make(plan.slot_size, false);
  return buffers;
}

}  // namespace tensorstream::engine::detail
