#include "engine/model/gguf/gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <new>

#include "engine/common/printable.h"

namespace helix::gguf {
namespace {

constexpr uint64_t kMaxDims = 4;      // ggml's GGML_MAX_DIMS
constexpr int kMaxArrayNesting = 3;   // arrays of arrays are legal; deeper is not plausible
constexpr uint64_t kMinKvBytes = 13;  // key length 8 + type 4 + at least 1 value byte
constexpr uint64_t kMinTensorBytes =
    32;  // name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8
// Real files hold tens of metadata entries and at most a few thousand tensors: far larger
// counts are damage, refused before they drive any allocation.
constexpr uint64_t kMaxKvCount = uint64_t{1} << 20;
constexpr uint64_t kMaxTensorCount = uint64_t{1} << 20;
// Vectors are grown as entries are read, not reserved from the header's counts.
constexpr uint64_t kMaxReserve = 1024;

std::string Str(uint64_t v) { return std::to_string(v); }

// Fixed size of a scalar value type, 0 for strings, arrays and unknown types.
uint64_t ScalarSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    default:
      return 0;
  }
}

bool IsInteger(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

bool IsFloat(GgufValueType t) {
  return t == GgufValueType::kFloat32 || t == GgufValueType::kFloat64;
}

bool IsKnownType(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kFloat64); }

template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Integer scalar at p (of a type IsInteger accepts) as int64; UINT64 is bit-cast.
int64_t LoadInt(GgufValueType t, const uint8_t* p) {
  switch (t) {
    case GgufValueType::kUint8:
      return Load<uint8_t>(p);
    case GgufValueType::kInt8:
      return Load<int8_t>(p);
    case GgufValueType::kUint16:
      return Load<uint16_t>(p);
    case GgufValueType::kInt16:
      return Load<int16_t>(p);
    case GgufValueType::kUint32:
      return Load<uint32_t>(p);
    case GgufValueType::kInt32:
      return Load<int32_t>(p);
    case GgufValueType::kUint64:
      return static_cast<int64_t>(Load<uint64_t>(p));
    case GgufValueType::kInt64:
      return Load<int64_t>(p);
    case GgufValueType::kBool:
      return Load<uint8_t>(p) != 0;
    default:
      return 0;
  }
}

// Bounds-checked reading over the mapping. Every error names the file, what was being read
// and where.
class Cursor {
 public:
  Cursor(const uint8_t* base, uint64_t size, const std::string& path)
      : base_(base), size_(size), path_(path) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  const uint8_t* here() const { return base_ + pos_; }

  Status Need(uint64_t n, std::string_view what) const {
    if (n <= remaining()) return Status::Ok();
    return DataLoss(path_ + ": truncated GGUF file: " + std::string(what) + " needs " + Str(n) +
                    " bytes at offset " + Str(pos_) + " but the file has " + Str(size_) + " bytes");
  }
  Status Skip(uint64_t n, std::string_view what) {
    RETURN_IF_ERROR(Need(n, what));
    pos_ += n;
    return Status::Ok();
  }
  template <typename T>
  Status Read(T* out, std::string_view what) {
    RETURN_IF_ERROR(Need(sizeof(T), what));
    *out = Load<T>(here());
    pos_ += sizeof(T);
    return Status::Ok();
  }
  // A GGUF string: uint64 length, then that many bytes (not NUL-terminated).
  Status ReadString(std::string* out, std::string_view what) {
    uint64_t len = 0;
    RETURN_IF_ERROR(Read(&len, what));
    RETURN_IF_ERROR(Need(len, what));
    out->assign(reinterpret_cast<const char*>(here()), len);
    pos_ += len;
    return Status::Ok();
  }
  Status SkipString(std::string_view what) {
    uint64_t len = 0;
    RETURN_IF_ERROR(Read(&len, what));
    return Skip(len, what);
  }

 private:
  const uint8_t* base_;
  uint64_t size_;
  const std::string& path_;
  uint64_t pos_ = 0;
};

// Skips the elements of an array whose header (type, count) has been read.
Status SkipArray(Cursor& c, const std::string& path, GgufValueType type, uint64_t count, int depth,
                 const std::string& what) {
  if (!IsKnownType(static_cast<uint32_t>(type))) {
    return InvalidArgument(path + ": " + what + " has unknown element type " +
                           Str(static_cast<uint32_t>(type)));
  }
  // The largest real arrays are vocabularies (at most a few hundred thousand entries); walking
  // the strings of a far larger one would take seconds, and reading it far more memory.
  if (count > GgufFile::kMaxArrayElements) {
    return InvalidArgument(path + ": " + what + " holds " + Str(count) + " elements (at most " +
                           Str(GgufFile::kMaxArrayElements) + " are supported)");
  }
  if (const uint64_t esize = ScalarSize(type); esize > 0) {
    if (count > c.remaining() / esize) {
      return DataLoss(path + ": truncated GGUF file: " + what + " holds " + Str(count) +
                      " elements of " + Str(esize) + " bytes but only " + Str(c.remaining()) +
                      " bytes remain");
    }
    return c.Skip(count * esize, what);
  }
  if (type == GgufValueType::kString) {
    if (count > c.remaining() / 8) {
      return DataLoss(path + ": truncated GGUF file: " + what + " holds " + Str(count) +
                      " strings but only " + Str(c.remaining()) + " bytes remain");
    }
    for (uint64_t i = 0; i < count; ++i) RETURN_IF_ERROR(c.SkipString(what));
    return Status::Ok();
  }
  // Nested arrays.
  if (depth >= kMaxArrayNesting) {
    return InvalidArgument(path + ": " + what + " nests arrays more than " + Str(kMaxArrayNesting) +
                           " deep");
  }
  if (count > c.remaining() / 12) {
    return DataLoss(path + ": truncated GGUF file: " + what + " holds " + Str(count) +
                    " arrays but only " + Str(c.remaining()) + " bytes remain");
  }
  for (uint64_t i = 0; i < count; ++i) {
    uint32_t sub_type = 0;
    uint64_t sub_count = 0;
    RETURN_IF_ERROR(c.Read(&sub_type, what));
    RETURN_IF_ERROR(c.Read(&sub_count, what));
    RETURN_IF_ERROR(
        SkipArray(c, path, static_cast<GgufValueType>(sub_type), sub_count, depth + 1, what));
  }
  return Status::Ok();
}

}  // namespace

std::string GgufValueTypeName(GgufValueType type) {
  static const char* const kNames[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                       "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                       "UINT64", "INT64",   "FLOAT64"};
  const auto v = static_cast<uint32_t>(type);
  return IsKnownType(v) ? kNames[v] : "type " + Str(v);
}

std::string GgufTensorInfo::ShapeString() const {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(ne[i]);
  }
  return s + "]";
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a FIFO: no wait
  if (fd < 0) return NotFound("cannot open GGUF file '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgument("'" + path + "' is not a regular file");
  }
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->size_ = static_cast<uint64_t>(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    return DataLoss(path + ": too short for a GGUF header (" + Str(f->size_) + " bytes)");
  }
  void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int mmap_errno = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    return Internal("cannot map GGUF file '" + path + "': " + std::strerror(mmap_errno));
  }
  f->base_ = static_cast<const uint8_t*>(p);
  try {
    RETURN_IF_ERROR(f->Parse());
  } catch (const std::bad_alloc&) {
    return ResourceExhausted(path + ": out of host memory while reading the GGUF header");
  }
  return f;
}

GgufFile::~GgufFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

Status GgufFile::Parse() {
  const std::string& path = path_;
  Cursor c(base_, size_, path);
  if (std::memcmp(base_, "GGUF", 4) != 0) {
    return InvalidArgument(path + ": not a GGUF file (the first 4 bytes are not \"GGUF\")");
  }
  RETURN_IF_ERROR(c.Skip(4, "magic"));
  RETURN_IF_ERROR(c.Read(&version_, "version"));
  if (version_ != 2 && version_ != 3) {
    std::string hint = (version_ & 0xffff) == 0 ? " (a big-endian file?)" : "";
    return Unimplemented(path + ": GGUF version " + Str(version_) + hint +
                         " is not supported (only little-endian versions 2 and 3)");
  }
  uint64_t tensor_count = 0, kv_count = 0;
  RETURN_IF_ERROR(c.Read(&tensor_count, "tensor count"));
  RETURN_IF_ERROR(c.Read(&kv_count, "metadata key/value count"));
  if (kv_count > kMaxKvCount) {
    return InvalidArgument(path + ": metadata key/value count " + Str(kv_count) +
                           " is implausible (at most " + Str(kMaxKvCount) + " are supported)");
  }
  if (tensor_count > kMaxTensorCount) {
    return InvalidArgument(path + ": tensor count " + Str(tensor_count) +
                           " is implausible (at most " + Str(kMaxTensorCount) + " are supported)");
  }
  // Every entry takes some bytes, so a count the remaining file cannot hold is corrupt.
  if (kv_count > c.remaining() / kMinKvBytes) {
    return InvalidArgument(path + ": implausible metadata key/value count " + Str(kv_count) +
                           " for a file of " + Str(size_) + " bytes");
  }
  if (tensor_count > c.remaining() / kMinTensorBytes) {
    return InvalidArgument(path + ": implausible tensor count " + Str(tensor_count) +
                           " for a file of " + Str(size_) + " bytes");
  }

  kvs_.reserve(std::min(kv_count, kMaxReserve));
  for (uint64_t i = 0; i < kv_count; ++i) {
    GgufKv kv;
    const std::string entry = "metadata entry " + Str(i);
    const uint64_t key_at = c.pos() + 8;  // the key's bytes, after its length
    RETURN_IF_ERROR(c.ReadString(&kv.key, entry + " key"));
    // Duplicates are found as they are read: a table of millions of identical entries fails
    // at its second one. The index views the key's bytes in the mapping, which stay put.
    const std::string_view key_bytes(reinterpret_cast<const char*>(base_ + key_at), kv.key.size());
    if (auto [at, added] = kv_index_.emplace(key_bytes, kvs_.size()); !added) {
      return InvalidArgument(path + ": metadata key '" + Printable(kv.key) + "' appears twice (" +
                             entry + " and metadata entry " + Str(at->second) + ")");
    }
    const std::string what = "metadata value of '" + Printable(kv.key) + "'";
    uint32_t type = 0;
    RETURN_IF_ERROR(c.Read(&type, what));
    if (!IsKnownType(type)) {
      return InvalidArgument(path + ": " + what + " has unknown type " + Str(type));
    }
    kv.type = static_cast<GgufValueType>(type);
    if (kv.type == GgufValueType::kString) {
      RETURN_IF_ERROR(c.ReadString(&kv.str, what));
    } else if (kv.type == GgufValueType::kArray) {
      uint32_t elem = 0;
      RETURN_IF_ERROR(c.Read(&elem, what));
      RETURN_IF_ERROR(c.Read(&kv.array_count, what));
      kv.array_type = static_cast<GgufValueType>(elem);
      kv.array_offset = c.pos();
      RETURN_IF_ERROR(SkipArray(c, path, kv.array_type, kv.array_count, 1, what));
    } else {
      const uint64_t n = ScalarSize(kv.type);
      RETURN_IF_ERROR(c.Need(n, what));
      if (IsFloat(kv.type)) {
        kv.f = kv.type == GgufValueType::kFloat32 ? Load<float>(c.here()) : Load<double>(c.here());
      } else {
        kv.i = LoadInt(kv.type, c.here());
      }
      RETURN_IF_ERROR(c.Skip(n, what));
    }
    kvs_.push_back(std::move(kv));
  }

  if (const GgufKv* a = FindKey("general.alignment"); a != nullptr) {
    if (!IsInteger(a->type) || a->i <= 0 || (a->i & (a->i - 1)) != 0 || a->i > (1 << 30)) {
      return InvalidArgument(
          path + ": general.alignment must be a positive power of two, got " +
          (IsInteger(a->type) ? std::to_string(a->i) : "a " + GgufValueTypeName(a->type)));
    }
    alignment_ = static_cast<uint64_t>(a->i);
  }

  if (tensor_count > c.remaining() / kMinTensorBytes) {
    return DataLoss(path + ": truncated GGUF file: " + Str(tensor_count) +
                    " tensor infos cannot fit in the " + Str(c.remaining()) +
                    " bytes after the metadata");
  }
  tensors_.reserve(std::min(tensor_count, kMaxReserve));
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensorInfo t;
    RETURN_IF_ERROR(c.ReadString(&t.name, "name of tensor " + Str(i)));
    const std::string what = "info of tensor '" + Printable(t.name) + "'";
    uint32_t n_dims = 0;
    RETURN_IF_ERROR(c.Read(&n_dims, what));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return InvalidArgument(path + ": tensor '" + Printable(t.name) + "' has " + Str(n_dims) +
                             " dimensions (expected 1 to " + Str(kMaxDims) + ")");
    }
    int64_t elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne = 0;
      RETURN_IF_ERROR(c.Read(&ne, what));
      if (ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (ne != 0 && static_cast<uint64_t>(elements) >
                          static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / ne)) {
        return InvalidArgument(path + ": tensor '" + Printable(t.name) +
                               "' has an implausible dimension " + Str(ne));
      }
      t.ne.push_back(static_cast<int64_t>(ne));
      elements *= static_cast<int64_t>(ne);
    }
    t.num_elements = elements;
    RETURN_IF_ERROR(c.Read(&t.type, what));
    uint64_t rel_offset = 0;
    RETURN_IF_ERROR(c.Read(&rel_offset, what));
    const GgmlTypeInfo* ti = GetGgmlTypeInfo(t.type);
    if (ti == nullptr) {
      return Unimplemented(path + ": tensor '" + Printable(t.name) + "' has unknown ggml type " +
                           Str(t.type));
    }
    if (t.ne[0] % ti->block_size != 0) {
      return InvalidArgument(path + ": tensor '" + Printable(t.name) + "' of type " + ti->name +
                             " has a row of " + Str(t.ne[0]) +
                             " elements, not a multiple of its block size " + Str(ti->block_size));
    }
    // elements / block_size blocks of block_bytes; both factors are below 2^63 / 1.
    const uint64_t blocks = static_cast<uint64_t>(elements / ti->block_size);
    if (blocks > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(ti->block_bytes)) {
      return InvalidArgument(path + ": tensor '" + Printable(t.name) + "' is implausibly large");
    }
    t.size = blocks * static_cast<uint64_t>(ti->block_bytes);
    if (rel_offset % alignment_ != 0) {
      return InvalidArgument(path + ": tensor '" + Printable(t.name) + "' data offset " +
                             Str(rel_offset) + " is not a multiple of the alignment " +
                             Str(alignment_));
    }
    t.offset = rel_offset;  // made absolute below, once the data section start is known
    tensors_.push_back(std::move(t));
  }

  // Tensors follow each other in the data section in the order they are listed, each padded to
  // the alignment (ggml's own reader requires exactly that): overlapping tensors, or a tensor
  // whose type was changed under its data, break the chain.
  uint64_t next = 0;
  for (const GgufTensorInfo& t : tensors_) {
    if (t.offset != next) {
      return InvalidArgument(path + ": tensor '" + Printable(t.name) + "' starts at data offset " +
                             Str(t.offset) + ", but the tensor before it ends at " + Str(next) +
                             " (GGUF tensors follow each other, each padded to the alignment " +
                             Str(alignment_) + ")");
    }
    if (t.size > std::numeric_limits<uint64_t>::max() - alignment_ - next) break;  // checked below
    next += (t.size + alignment_ - 1) / alignment_ * alignment_;
  }
  // The data section starts at the next multiple of the alignment.
  data_offset_ = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  for (GgufTensorInfo& t : tensors_) {
    const uint64_t avail = size_ > data_offset_ ? size_ - data_offset_ : 0;
    if (t.offset > avail || t.size > avail - t.offset) {
      return DataLoss(path + ": truncated GGUF file: tensor '" + Printable(t.name) + "' (" +
                      GgmlTypeName(t.type) + " " + t.ShapeString() + ", " + Str(t.size) +
                      " bytes at data offset " + Str(t.offset) + ") ends past the end of the " +
                      Str(size_) + "-byte file");
    }
    t.offset += data_offset_;
  }
  // Nor does anything follow the last tensor (beyond its padding): bytes there mean that the
  // header does not describe the file, e.g. a tensor count one short, which would move the
  // data section's start and read every tensor from the wrong place.
  if (size_ > data_offset_ && size_ - data_offset_ > next) {
    return InvalidArgument(path + ": " + Str(size_ - data_offset_ - next) +
                           " bytes follow the last tensor's data (" + Str(tensors_.size()) +
                           " tensors listed): the header's tensor count or tensor list does "
                           "not match the file");
  }
  for (size_t i = 0; i < tensors_.size(); ++i) {
    if (!tensor_index_.emplace(tensors_[i].name, i).second) {
      return InvalidArgument(path + ": tensor '" + Printable(tensors_[i].name) + "' appears twice");
    }
  }
  return Status::Ok();
}

const GgufKv* GgufFile::FindKey(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second];
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

StatusOr<const GgufKv*> GgufFile::Find(std::string_view key, const char* expected) const {
  const GgufKv* kv = FindKey(key);
  if (kv == nullptr) {
    return NotFound(path_ + ": GGUF metadata has no key '" + std::string(key) + "' (" + expected +
                    ")");
  }
  return kv;
}

namespace {

Status WrongType(const std::string& path, const GgufKv& kv, const char* expected) {
  std::string got = GgufValueTypeName(kv.type);
  if (kv.type == GgufValueType::kArray) got += " of " + GgufValueTypeName(kv.array_type);
  return InvalidArgument(path + ": GGUF key '" + Printable(kv.key) + "' is " + got + ", expected " +
                         expected);
}

}  // namespace

StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  ASSIGN_OR_RETURN(const GgufKv* kv, Find(key, "an integer"));
  if (!IsInteger(kv->type)) return WrongType(path_, *kv, "an integer");
  if (kv->type == GgufValueType::kUint64 && kv->i < 0) {
    return InvalidArgument(path_ + ": GGUF key '" + Printable(kv->key) +
                           "' = " + Str(static_cast<uint64_t>(kv->i)) + " is out of range");
  }
  return kv->i;
}

StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  ASSIGN_OR_RETURN(const GgufKv* kv, Find(key, "a number"));
  if (IsFloat(kv->type)) return kv->f;
  if (IsInteger(kv->type)) return static_cast<double>(kv->i);
  return WrongType(path_, *kv, "a number");
}

StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  ASSIGN_OR_RETURN(const GgufKv* kv, Find(key, "a bool"));
  if (kv->type != GgufValueType::kBool) return WrongType(path_, *kv, "BOOL");
  return kv->i != 0;
}

StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  ASSIGN_OR_RETURN(const GgufKv* kv, Find(key, "a string"));
  if (kv->type != GgufValueType::kString) return WrongType(path_, *kv, "STRING");
  return kv->str;
}

// An array's count against the caller's bound, before anything is allocated for it: in memory
// an element can take far more than its bytes in the file (a UINT8 becomes an int64, an empty
// string 32 bytes), so a file's size alone does not bound it.
Status GgufFile::CheckArrayCount(const GgufKv& kv, uint64_t max_count) const {
  if (kv.array_count <= max_count) return Status::Ok();
  return InvalidArgument(path_ + ": GGUF key '" + Printable(kv.key) + "' holds " +
                         Str(kv.array_count) + " elements, more than the " + Str(max_count) +
                         " expected");
}

StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key,
                                                            uint64_t max_count) const {
  ASSIGN_OR_RETURN(const GgufKv* kv, Find(key, "an array of strings"));
  if (kv->type != GgufValueType::kArray || kv->array_type != GgufValueType::kString) {
    return WrongType(path_, *kv, "ARRAY of STRING");
  }
  RETURN_IF_ERROR(CheckArrayCount(*kv, max_count));
  // Open checked every length; re-walk them.
  std::vector<std::string> out(kv->array_count);
  uint64_t pos = kv->array_offset;
  for (std::string& s : out) {
    const uint64_t len = Load<uint64_t>(base_ + pos);
    s.assign(reinterpret_cast<const char*>(base_ + pos + 8), len);
    pos += 8 + len;
  }
  return out;
}

StatusOr<std::vector<float>> GgufFile::GetFloatArray(std::string_view key,
                                                     uint64_t max_count) const {
  ASSIGN_OR_RETURN(const GgufKv* kv, Find(key, "an array of floats"));
  if (kv->type != GgufValueType::kArray || !IsFloat(kv->array_type)) {
    return WrongType(path_, *kv, "ARRAY of FLOAT32");
  }
  RETURN_IF_ERROR(CheckArrayCount(*kv, max_count));
  std::vector<float> out(kv->array_count);
  const uint8_t* p = base_ + kv->array_offset;
  const bool f32 = kv->array_type == GgufValueType::kFloat32;
  for (uint64_t i = 0; i < kv->array_count; ++i) {
    out[i] = f32 ? Load<float>(p + 4 * i) : static_cast<float>(Load<double>(p + 8 * i));
  }
  return out;
}

StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key,
                                                     uint64_t max_count) const {
  ASSIGN_OR_RETURN(const GgufKv* kv, Find(key, "an array of integers"));
  if (kv->type != GgufValueType::kArray || !IsInteger(kv->array_type)) {
    return WrongType(path_, *kv, "ARRAY of an integer type");
  }
  RETURN_IF_ERROR(CheckArrayCount(*kv, max_count));
  std::vector<int64_t> out(kv->array_count);
  const uint8_t* p = base_ + kv->array_offset;
  const uint64_t esize = ScalarSize(kv->array_type);
  for (uint64_t i = 0; i < kv->array_count; ++i) out[i] = LoadInt(kv->array_type, p + esize * i);
  return out;
}

}  // namespace helix::gguf
