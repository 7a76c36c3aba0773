// Reads one JSON object into option structs, field by field, recording the first error
// with the field's full path ("kv_cache_config.tokens_per_block"), and rejects unknown keys.
// Not thread-safe; one reader per object being parsed.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/common/status.h"

namespace helix::config {

// Parses JSON text; a syntax error names the source, line and column.
StatusOr<nlohmann::json> ParseJsonText(const std::string& text, const std::string& source_name);
// Reads and parses a file; a missing file or bad JSON is an error naming the path.
StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);
// A gRPC target "host:port" (port 1..65535, no URL scheme), named as config field `field`.
Status ValidateHostPort(const std::string& field, const std::string& url);

// A short description of a JSON value for error messages: `string "32"`, `number 1.5`.
std::string DescribeJson(const nlohmann::json& j);

class JsonReader {
 public:
  // `path` is the dotted path of `j` from the document root ("" for the root).
  // Errors are shared with the parent reader when one is given.
  JsonReader(const nlohmann::json& j, std::string path, Status* error = nullptr);

  // Each getter leaves *out unchanged when the key is absent (so defaults survive) and
  // records an error naming the field when the value has the wrong type.
  void Int(const char* key, int64_t* out);
  void Int(const char* key, int* out);
  void OptionalInt(const char* key, std::optional<int64_t>* out);
  void Double(const char* key, double* out);
  void OptionalDouble(const char* key, std::optional<double>* out);
  void Bool(const char* key, bool* out);
  void String(const char* key, std::string* out);
  void OptionalString(const char* key, std::optional<std::string>* out);
  void StringList(const char* key, std::vector<std::string>* out);
  // Calls `read` with a reader for the sub-object at `key`, when present; returns whether it was.
  bool Object(const char* key, const std::function<void(JsonReader&)>& read);
  void Require(const char* key);

  // Records an error about field `key` of this object: "<path.key> = <value>: <what>".
  void Fail(const char* key, const std::string& what);
  std::string FieldPath(const char* key) const;
  bool Has(const char* key) const { return j_.contains(key); }

  // Reports unknown keys (the first in sorted order) and returns the first error recorded.
  Status Finish();

 private:
  const nlohmann::json* Find(const char* key);
  void TypeError(const char* key, const char* expected, const nlohmann::json& got);

  const nlohmann::json& j_;
  std::string path_;
  Status own_error_;
  Status* error_;
  std::set<std::string> seen_;
};

}  // namespace helix::config
