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
    b.ready_ = std::make_shared<cuda::Event>(*device);
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

BlockBuffer BlockBuffer::view(const BlockBuffer& parent, std::uint64_t offset,
                              std::uint64_t bytes) {
  BlockBuffer b(bytes);
  b.device_ = parent.device_;
  if (parent.host_.data() != nullptr) {
    b.host_ = AlignedBuffer::adopt(parent.host_.data() + offset, static_cast<std::size_t>(bytes),
                                   [](std::byte*, std::size_t) {});
  }
  if (parent.device_ != nullptr) {
    b.dev_ptr_ = parent.dev_ptr_ + offset;
    b.ready_ = std::make_shared<cuda::Event>(*parent.device_);
  }
  return b;
}

void BlockBuffer::inherit(BlockBuffer&& displaced) {
  if (displaced.ready_ && displaced.ready_recorded_) fences_.push_back(displaced.ready_);
  for (std::size_t i = 0; i < displaced.done_count_; ++i) fences_.push_back(displaced.done_[i]);
  for (auto& f : displaced.fences_) fences_.push_back(std::move(f));
  if (displaced.copy_source_) inherited_sources_.push_back(std::move(*displaced.copy_source_));
  for (auto& s : displaced.inherited_sources_) inherited_sources_.push_back(std::move(s));
  displaced.fences_.clear();
  displaced.copy_source_.reset();
  displaced.inherited_sources_.clear();
  displaced.done_count_ = 0;
}

void BlockBuffer::add_fence(SharedEvent event) {
  if (event) fences_.push_back(std::move(event));
}

void BlockBuffer::make_wait_for_ready(cuda::StreamHandle stream) const {
  if (ready_) cuda::stream_wait_event(*device_, stream, *ready_);
}

bool BlockBuffer::record_done(cuda::StreamHandle stream) {
  if (device_ == nullptr) return false;
  if (done_count_ == done_.size()) done_.push_back(std::make_shared<cuda::Event>(*device_));
  done_[done_count_++]->record(stream);
  return true;
}

void BlockBuffer::wait_until_unused() {
  if (device_ == nullptr) return;
  for (const auto& f : fences_) f->synchronize();
  for (std::size_t i = 0; i < done_count_; ++i) done_[i]->synchronize();
  if (ready_recorded_) ready_->synchronize();
  fences_.clear();
  done_count_ = 0;
}

void BlockBuffer::order_after_uses(cuda::StreamHandle copy_stream) {
  if (device_ == nullptr) return;
  // cuStreamWaitEvent waits for the record current at the call: the events may be recorded
  // again afterwards.
  for (const auto& f : fences_) cuda::stream_wait_event(*device_, copy_stream, *f);
  for (std::size_t i = 0; i < done_count_; ++i) {
    cuda::stream_wait_event(*device_, copy_stream, *done_[i]);
  }
  fences_.clear();
  done_count_ = 0;
}

void BlockBuffer::record_ready(cuda::StreamHandle copy_stream) {
  ready_->record(copy_stream);
  ready_recorded_ = true;
}

void BlockBuffer::wait_for_copy() const {
  if (ready_) ready_->synchronize();
}

void BlockBuffer::copy_from_host(const std::byte* source, std::size_t bytes,
                                 std::span<const CopyRange> copies,
                                 cuda::StreamHandle copy_stream) {
  if (device_ != nullptr) {
    order_after_uses(copy_stream);
    if (copies.empty()) {
      cuda::memcpy_htod_async(*device_, dev_ptr_, source, bytes, copy_stream);
    } else {
      for (const auto& c : copies) {
        cuda::memcpy_htod_async(*device_, dev_ptr_ + c.to, source + c.from,
                                static_cast<std::size_t>(c.nbytes), copy_stream);
      }
    }
    record_ready(copy_stream);
    return;
  }
  if (copies.empty()) {
    if (source != host_.data()) std::memcpy(host_.data(), source, bytes);
    return;
  }
  for (const auto& c : copies) {
    std::memmove(host_.data() + c.to, source + c.from, static_cast<std::size_t>(c.nbytes));
  }
}

void BlockBuffer::finish_previous_copy() {
  if (!copy_source_ && inherited_sources_.empty()) return;
  // The copies of the previous fills may still read from these pinned sources: let them
  // finish. The inherited ones were displaced units' copies, whose ready events are fences.
  for (const auto& f : fences_) f->synchronize();
  if (ready_recorded_) ready_->synchronize();
  copy_source_.reset();
  inherited_sources_.clear();
}

void BlockBuffer::register_with_cufile() {
  cufile_registration_.emplace(*device_, dev_ptr_, static_cast<std::size_t>(size_));
}

std::uint64_t resident_buffer_bytes(std::uint64_t size) noexcept {
  return align_up(std::max<std::uint64_t>(size, 1), kSlotAlignment);
}

}  // namespace tensorstream::engine::detail
