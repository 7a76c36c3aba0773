// A .safetensors file mapped read-only: its JSON header (dtype, shape and byte range of each
// tensor) parsed and checked against the file at Open. Immutable after Open; safe to read from
// many threads.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/common/status.h"

namespace helix::hf {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;           // "F32", "BF16", ...
  std::vector<int64_t> shape;  // outermost first: a Linear weight is [out, in]
  int64_t num_elements = 0;
  uint64_t offset = 0;  // from the start of the file
  uint64_t size = 0;    // bytes

  std::string ShapeString() const;  // "[576, 49152]"
};

class SafetensorsFile {
 public:
  // Errors name the path: NotFound (cannot open), DataLoss (shorter than its header says,
  // data ranges past the end), InvalidArgument (header length implausible, header not JSON or
  // of the wrong shape, a range that does not match dtype and shape, overlapping ranges).
  static StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // nullptr when absent.
  const SafetensorsTensor* Find(std::string_view name) const;

  // Converts t (F32, F16 or BF16) to fp32 in out[0, t.num_elements); Unimplemented for other
  // dtypes.
  Status ReadFloat(const SafetensorsTensor& t, float* out) const;

 private:
  SafetensorsFile() = default;
  Status Parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::unordered_map<std::string_view, size_t> index_;  // views into tensors_[i].name
};

}  // namespace helix::hf
