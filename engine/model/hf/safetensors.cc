#include "engine/model/hf/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "engine/common/json_nesting.h"
#include "kernels/dtype.h"

namespace helix::hf {
namespace {

// The safetensors format caps its header at 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Bytes per element, 0 for a dtype this file does not know.
uint64_t DtypeSize(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

std::string Str(uint64_t v) { return std::to_string(v); }

}  // namespace

std::string SafetensorsTensor::ShapeString() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever (no effect on a
  // regular file, the only kind accepted below).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    return NotFound("cannot open safetensors file '" + path + "': " + std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgument("'" + path + "' is not a regular file");
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->size_ = static_cast<uint64_t>(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    return DataLoss(path + ": too short for a safetensors header (" + Str(f->size_) + " bytes)");
  }
  void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int mmap_errno = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    return Internal("cannot map safetensors file '" + path + "': " + std::strerror(mmap_errno));
  }
  f->base_ = static_cast<const uint8_t*>(p);
  RETURN_IF_ERROR(f->Parse());
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

Status SafetensorsFile::Parse() {
  const std::string& path = path_;
  uint64_t header_len = 0;
  std::memcpy(&header_len, base_, 8);  // little-endian, as the format is
  if (header_len > kMaxHeaderBytes) {
    return InvalidArgument(path + ": safetensors header length " + Str(header_len) +
                           " is implausible (the format allows at most " + Str(kMaxHeaderBytes) +
                           ")");
  }
  if (header_len > size_ - 8) {
    return DataLoss(path + ": truncated safetensors file: the header needs " + Str(header_len) +
                    " bytes but only " + Str(size_ - 8) + " follow the length");
  }
  const char* begin = reinterpret_cast<const char*>(base_ + 8);
  RETURN_IF_ERROR(
      CheckJsonFileShape(std::string_view(begin, header_len), path + ": safetensors header"));
  nlohmann::json h = nlohmann::json::parse(begin, begin + header_len, nullptr,
                                           /*allow_exceptions=*/false);
  if (h.is_discarded() || !h.is_object()) {
    return InvalidArgument(path + ": safetensors header is not a JSON object");
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size_ - data_start;
  tensors_.reserve(h.size());
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string where = path + ": tensor '" + it.key() + "'";
    const nlohmann::json& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e["dtype"].is_string() || !e.contains("shape") ||
        !e["shape"].is_array() || !e.contains("data_offsets") || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2 || !e["data_offsets"][0].is_number_unsigned() ||
        !e["data_offsets"][1].is_number_unsigned()) {
      return InvalidArgument(where +
                             ": header entry needs dtype (string), shape (array) and "
                             "data_offsets ([begin, end])");
    }
    SafetensorsTensor t;
    t.name = it.key();
    t.dtype = e["dtype"].get<std::string>();
    int64_t elements = 1;
    for (const nlohmann::json& d : e["shape"]) {
      if (!d.is_number_unsigned()) return InvalidArgument(where + ": shape holds a non-integer");
      const uint64_t v = d.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (v != 0 && static_cast<uint64_t>(elements) >
                         static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / v)) {
        return InvalidArgument(where + ": implausible dimension " + Str(v));
      }
      t.shape.push_back(static_cast<int64_t>(v));
      elements *= static_cast<int64_t>(v);
    }
    t.num_elements = elements;
    const uint64_t b = e["data_offsets"][0].get<uint64_t>();
    const uint64_t end = e["data_offsets"][1].get<uint64_t>();
    if (b > end) {
      return InvalidArgument(where + ": data_offsets [" + Str(b) + ", " + Str(end) +
                             "] end before they begin");
    }
    if (end > data_size) {
      return DataLoss(where + ": data_offsets [" + Str(b) + ", " + Str(end) + "] reach past the " +
                      Str(data_size) + " data bytes of the file");
    }
    t.size = end - b;
    const uint64_t esize = DtypeSize(t.dtype);
    if (esize != 0 && (static_cast<uint64_t>(elements) > t.size / esize ||
                       static_cast<uint64_t>(elements) * esize != t.size)) {
      return InvalidArgument(
          where + ": " + t.dtype + " " + t.ShapeString() + " needs " +
          (static_cast<uint64_t>(elements) <= std::numeric_limits<uint64_t>::max() / esize
               ? Str(static_cast<uint64_t>(elements) * esize)
               : std::string("more than 2^64")) +
          " bytes but data_offsets span " + Str(t.size));
    }
    t.offset = data_start + b;
    tensors_.push_back(std::move(t));
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  // Overlapping ranges mean a corrupt header (the format forbids them).
  std::vector<const SafetensorsTensor*> by_offset;
  for (const SafetensorsTensor& t : tensors_) {
    if (t.size > 0) by_offset.push_back(&t);
  }
  std::sort(
      by_offset.begin(), by_offset.end(),
      [](const SafetensorsTensor* a, const SafetensorsTensor* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->offset < by_offset[i - 1]->offset + by_offset[i - 1]->size) {
      return InvalidArgument(path + ": tensors '" + by_offset[i - 1]->name + "' and '" +
                             by_offset[i]->name + "' overlap");
    }
  }
  return Status::Ok();
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Status SafetensorsFile::ReadFloat(const SafetensorsTensor& t, float* out) const {
  const uint8_t* p = base_ + t.offset;
  const int64_t n = t.num_elements;
  if (t.dtype == "F32") {
    if (n > 0) std::memcpy(out, p, static_cast<size_t>(n) * 4);
  } else if (t.dtype == "F16" || t.dtype == "BF16") {
    const bool half = t.dtype == "F16";
    for (int64_t i = 0; i < n; ++i) {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      out[i] = half ? kernels::HalfToFloat(v) : kernels::Bf16ToFloat(v);
    }
  } else {
    return Unimplemented(path_ + ": tensor '" + t.name + "' has dtype " + t.dtype +
                         " (supported: F32, F16, BF16)");
  }
  return Status::Ok();
}

}  // namespace helix::hf
