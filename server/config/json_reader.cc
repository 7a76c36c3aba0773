#include "server/config/json_reader.h"

#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <system_error>
#include <vector>

namespace helix::config {

StatusOr<nlohmann::json> ParseJsonText(const std::string& text, const std::string& source_name) {
  // A key given twice in one object: the parser keeps the last, silently; refused instead (a
  // setting written twice is a mistake in one of them).
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto track = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) {
      open_objects.emplace_back();
    } else if (event == Event::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == Event::key && !open_objects.empty() && parsed.is_string()) {
      if (!open_objects.back().insert(parsed.get<std::string>()).second && duplicate.empty()) {
        duplicate = parsed.get<std::string>();
      }
    }
    return true;
  };
  try {
    nlohmann::json j = nlohmann::json::parse(text, track);
    if (!duplicate.empty()) {
      return InvalidArgument(source_name + ": key '" + duplicate +
                             "' appears twice in one object (only the last would count)");
    }
    return j;
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is the 1-based offset of the failing byte; turn it into line and column.
    size_t line = 1, col = 1;
    size_t limit = e.byte == 0 ? 0 : std::min<size_t>(e.byte - 1, text.size());
    for (size_t i = 0; i < limit; ++i) {
      if (text[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    std::string what = e.what();
    // nlohmann's message starts with "[json.exception.parse_error.101] parse error at ...".
    auto pos = what.find("] ");
    if (pos != std::string::npos) what = what.substr(pos + 2);
    std::ostringstream m;
    m << source_name << ":" << line << ":" << col << ": invalid JSON: " << what;
    return InvalidArgument(m.str());
  }
}

StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (status.type() == std::filesystem::file_type::not_found) {
    return NotFound("cannot open config file '" + path + "': no such file");
  }
  if (!ec && !std::filesystem::is_regular_file(status)) {
    return InvalidArgument("config file '" + path + "' is not a regular file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return NotFound("cannot open config file '" + path + "': " + std::strerror(errno));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ParseJsonText(ss.str(), path);
}

std::string DescribeJson(const nlohmann::json& j) {
  std::string d = j.dump();
  if (d.size() > 60) d = d.substr(0, 57) + "...";
  switch (j.type()) {
    case nlohmann::json::value_t::string:
      return "string " + d;
    case nlohmann::json::value_t::boolean:
      return "boolean " + d;
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float:
      return "number " + d;
    case nlohmann::json::value_t::object:
      return "object " + d;
    case nlohmann::json::value_t::array:
      return "array " + d;
    case nlohmann::json::value_t::null:
      return "null";
    default:
      return d;
  }
}

JsonReader::JsonReader(const nlohmann::json& j, std::string path, Status* error)
    : j_(j), path_(std::move(path)), error_(error ? error : &own_error_) {
  if (!j_.is_object() && error_->ok()) {
    *error_ =
        InvalidArgument((path_.empty() ? std::string("config") : "config field '" + path_ + "'") +
                        ": expected an object, got " + DescribeJson(j_));
  }
}

std::string JsonReader::FieldPath(const char* key) const {
  return path_.empty() ? std::string(key) : path_ + "." + key;
}

const nlohmann::json* JsonReader::Find(const char* key) {
  seen_.insert(key);
  auto it = j_.find(key);
  if (it == j_.end()) return nullptr;
  return &*it;
}

void JsonReader::Fail(const char* key, const std::string& what) {
  if (!error_->ok()) return;
  std::string m = "config field '" + FieldPath(key) + "'";
  if (auto it = j_.find(key); it != j_.end()) m += " = " + it->dump();
  m += ": " + what;
  *error_ = InvalidArgument(m);
}

void JsonReader::TypeError(const char* key, const char* expected, const nlohmann::json& got) {
  if (!error_->ok()) return;
  *error_ = InvalidArgument("config field '" + FieldPath(key) + "': expected " + expected +
                            ", got " + DescribeJson(got));
}

void JsonReader::Int(const char* key, int64_t* out) {
  const nlohmann::json* v = Find(key);
  if (!v) return;
  // The parser stores integers in [2^63, 2^64) as unsigned, and is_number_integer() holds for
  // those too: check them first, or get<int64_t>() wraps them to negative values.
  if (v->is_number_unsigned() &&
      v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    TypeError(key, "a signed 64-bit integer (at most 9223372036854775807)", *v);
  } else if (v->is_number_integer()) {
    *out = v->get<int64_t>();
  } else {
    TypeError(key, "an integer", *v);
  }
}

void JsonReader::Int(const char* key, int* out) {
  int64_t v = *out;
  const nlohmann::json* j = j_.contains(key) ? &j_.at(key) : nullptr;
  Int(key, &v);
  if (!j || !error_->ok()) return;
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
    TypeError(key, "a 32-bit integer", *j);
    return;
  }
  *out = static_cast<int>(v);
}

void JsonReader::OptionalInt(const char* key, std::optional<int64_t>* out) {
  const nlohmann::json* v = Find(key);
  if (!v || v->is_null()) return;
  int64_t x = 0;
  Int(key, &x);
  if (error_->ok()) *out = x;
}

void JsonReader::Double(const char* key, double* out) {
  const nlohmann::json* v = Find(key);
  if (!v) return;
  if (v->is_number()) {
    *out = v->get<double>();
  } else {
    TypeError(key, "a number", *v);
  }
}

void JsonReader::OptionalDouble(const char* key, std::optional<double>* out) {
  const nlohmann::json* v = Find(key);
  if (!v || v->is_null()) return;
  double x = 0;
  Double(key, &x);
  if (error_->ok()) *out = x;
}

void JsonReader::Bool(const char* key, bool* out) {
  const nlohmann::json* v = Find(key);
  if (!v) return;
  if (v->is_boolean()) {
    *out = v->get<bool>();
  } else {
    TypeError(key, "true or false", *v);
  }
}

void JsonReader::String(const char* key, std::string* out) {
  const nlohmann::json* v = Find(key);
  if (!v) return;
  if (v->is_string()) {
    *out = v->get<std::string>();
  } else {
    TypeError(key, "a string", *v);
  }
}

void JsonReader::OptionalString(const char* key, std::optional<std::string>* out) {
  const nlohmann::json* v = Find(key);
  if (!v || v->is_null()) return;
  std::string s;
  String(key, &s);
  if (error_->ok()) *out = s;
}

void JsonReader::StringList(const char* key, std::vector<std::string>* out) {
  const nlohmann::json* v = Find(key);
  if (!v) return;
  if (!v->is_array()) {
    TypeError(key, "an array of strings", *v);
    return;
  }
  std::vector<std::string> items;
  for (const auto& e : *v) {
    if (!e.is_string()) {
      TypeError(key, "an array of strings", *v);
      return;
    }
    items.push_back(e.get<std::string>());
  }
  *out = std::move(items);
}

bool JsonReader::Object(const char* key, const std::function<void(JsonReader&)>& read) {
  const nlohmann::json* v = Find(key);
  if (!v) return false;
  if (!v->is_object()) {
    TypeError(key, "an object", *v);
    return false;
  }
  JsonReader sub(*v, FieldPath(key), error_);
  read(sub);
  Status st = sub.Finish();
  (void)st;  // recorded in *error_ already
  return true;
}

void JsonReader::Require(const char* key) {
  if (!error_->ok() || j_.contains(key)) return;
  *error_ = InvalidArgument("config field '" + FieldPath(key) + "' is required but missing");
}

Status JsonReader::Finish() {
  if (error_->ok()) {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (!seen_.count(it.key())) {
        std::string known;
        for (const auto& k : seen_) known += (known.empty() ? "" : ", ") + k;
        *error_ = InvalidArgument("unknown config field '" + FieldPath(it.key().c_str()) +
                                  "' (known fields here: " + known + ")");
        break;
      }
    }
  }
  return *error_;
}

Status ValidateHostPort(const std::string& field, const std::string& url) {
  const std::string prefix = "config field '" + field + "' = " + nlohmann::json(url).dump();
  // The urls are gRPC targets; "http://h:p" passes the port check but never connects.
  if (auto scheme = url.find("://"); scheme != std::string::npos) {
    const std::string drop = url.substr(0, scheme + 3);
    return InvalidArgument(prefix + ": expected \"host:port\" (the server's gRPC target), not " +
                           "a URL; drop \"" + drop + "\"");
  }
  auto colon = url.rfind(':');
  bool ok = colon != std::string::npos && colon > 0 && colon + 1 < url.size();
  if (ok) {
    // from_chars rejects overlong digit strings (std::stol threw out_of_range on them).
    const char* first = url.data() + colon + 1;
    const char* last = url.data() + url.size();
    int port = 0;
    auto [end, ec] = std::from_chars(first, last, port);
    ok = ec == std::errc() && end == last && port > 0 && port <= 65535;
  }
  if (ok) return Status::Ok();
  return InvalidArgument(prefix + ": expected \"host:port\" with a port in 1..65535");
}

}  // namespace helix::config
