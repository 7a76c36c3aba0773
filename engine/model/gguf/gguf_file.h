// A GGUF file (version 2 or 3, little-endian) mapped read-only: metadata key/values, tensor
// infos and tensor bytes, every offset and length checked against the file at Open.
// Immutable after Open; safe to read from many threads.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/common/status.h"
#include "engine/model/gguf/ggml_type.h"

namespace helix::gguf {

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// "UINT32", "ARRAY", ...; "type N" for a value outside the enum.
std::string GgufValueTypeName(GgufValueType type);

struct GgufKv {
  std::string key;
  GgufValueType type;
  // Scalars: integers and bool in `i` (a UINT64 bit-cast, so read it through GetInt, which
  // refuses values past INT64_MAX), floats in `f`, strings in `str`.
  int64_t i = 0;
  double f = 0;
  std::string str;
  // Arrays: element type and count; the elements start at byte `array_offset` of the file.
  GgufValueType array_type = GgufValueType::kUint8;
  uint64_t array_count = 0;
  uint64_t array_offset = 0;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // dims, innermost first: ne = {in, out} is row-major [out][in]
  uint32_t type = 0;        // GgmlType value
  int64_t num_elements = 0;
  uint64_t offset = 0;  // from the start of the file (already includes the data section start)
  uint64_t size = 0;    // bytes

  // "[576, 49152]"
  std::string ShapeString() const;
};

class GgufFile {
 public:
  // Maps and parses `path`. Errors name the path and what was wrong: NotFound (cannot open),
  // InvalidArgument (not GGUF, bad alignment, absurd counts or dims, duplicate names),
  // Unimplemented (other versions, unknown tensor types), DataLoss (truncated anywhere,
  // tensor data past the end of the file), ResourceExhausted (out of memory).
  static StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  uint64_t file_size() const { return size_; }

  const std::vector<GgufKv>& metadata() const { return kvs_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const GgufKv* FindKey(std::string_view key) const;
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // Open refuses metadata arrays of more elements (the tokenizer's vocabulary limit).
  static constexpr uint64_t kMaxArrayElements = uint64_t{1} << 24;

  // Typed reads. NotFound names a missing key; InvalidArgument one of another type, or an
  // array of more than `max_count` elements (checked before anything is allocated).
  // GetInt accepts every integer type; GetFloat floats and integers.
  StatusOr<int64_t> GetInt(std::string_view key) const;
  StatusOr<double> GetFloat(std::string_view key) const;
  StatusOr<bool> GetBool(std::string_view key) const;
  StatusOr<std::string> GetString(std::string_view key) const;
  StatusOr<std::vector<std::string>> GetStringArray(std::string_view key,
                                                    uint64_t max_count = kMaxArrayElements) const;
  StatusOr<std::vector<float>> GetFloatArray(  // float32/64
      std::string_view key, uint64_t max_count = kMaxArrayElements) const;
  StatusOr<std::vector<int64_t>> GetIntArray(  // any integer
      std::string_view key, uint64_t max_count = kMaxArrayElements) const;

  // The tensor's bytes (info.size of them), inside the mapping; valid while this lives.
  std::span<const uint8_t> TensorData(const GgufTensorInfo& info) const {
    return {base_ + info.offset, static_cast<size_t>(info.size)};
  }

 private:
  GgufFile() = default;
  Status Parse();
  StatusOr<const GgufKv*> Find(std::string_view key, const char* expected) const;
  Status CheckArrayCount(const GgufKv& kv, uint64_t max_count) const;

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<GgufKv> kvs_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string_view, size_t> kv_index_;      // views of the keys in the mapping
  std::unordered_map<std::string_view, size_t> tensor_index_;  // views into tensors_[i].name
};

}  // namespace helix::gguf
