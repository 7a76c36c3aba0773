// LoadHfTokenizerJson: a Hugging Face tokenizer.json (+ tokenizer_config.json) with a byte-level
// BPE model, read into VocabData. nlohmann::json exceptions stay inside this file.
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/common/json_nesting.h"
#include "engine/common/printable.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/regex.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix {
namespace {

using nlohmann::json;

constexpr size_t kMaxVocabSize = size_t{1} << 24;
// Real tokenizer.json files are 7 to 35 MB.
constexpr uintmax_t kMaxFileBytes = uintmax_t{256} << 20;

StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) return NotFound(path + ": no such file");
  if (ec) return Unavailable(path + ": cannot stat: " + ec.message());
  if (!std::filesystem::is_regular_file(st)) return InvalidArgument(path + ": not a regular file");
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return Unavailable(path + ": cannot get the size: " + ec.message());
  if (size > kMaxFileBytes) {
    return InvalidArgument(path + ": " + std::to_string(size) + " bytes is too large (at most " +
                           std::to_string(kMaxFileBytes) + ")");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    return Status(err == EACCES ? StatusCode::kPermissionDenied : StatusCode::kUnavailable,
                  path + ": cannot open: " + std::strerror(err));
  }
  std::string data(static_cast<size_t>(size), '\0');
  if (!in.read(data.data(), static_cast<std::streamsize>(size))) {
    return DataLoss(path + ": read failed (file changed while loading?)");
  }
  return data;
}

StatusOr<json> ParseJsonFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path));
  RETURN_IF_ERROR(CheckJsonFileShape(text, path));
  json j = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(path + ": not valid JSON");
  if (!j.is_object()) return InvalidArgument(path + ": the top level is not a JSON object");
  return j;
}

// A token named in tokenizer_config.json: a string, an AddedToken object ({"content": ...}), or
// null / absent (nullopt).
StatusOr<std::optional<std::string>> TokenText(const json& config, const char* key,
                                               const std::string& where) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return std::optional<std::string>(c->get<std::string>());
  }
  return InvalidArgument(where + ": " + key + " is neither a string nor {\"content\": string}");
}

// Sequences nest one or two deep in real tokenizers; far deeper is a broken file (and cost
// memory quadratic in the depth, for the names).
constexpr int kMaxSequenceDepth = 16;

// Flattens a pre_tokenizer (a Sequence or a single one), `name` in the file, into its steps.
Status Flatten(const json& node, const std::string& name, std::vector<const json*>* out,
               int depth = 0) {
  if (!node.is_object()) return InvalidArgument(name + " is not an object");
  auto type = node.find("type");
  if (type != node.end() && *type == "Sequence") {
    if (depth >= kMaxSequenceDepth) {
      return InvalidArgument(name + ": Sequence pre_tokenizers nested deeper than " +
                             std::to_string(kMaxSequenceDepth));
    }
    auto list = node.find("pretokenizers");
    if (list == node.end() || !list->is_array()) {
      return InvalidArgument(name + ".pretokenizers is not an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(
          Flatten((*list)[i], name + ".pretokenizers[" + std::to_string(i) + "]", out, depth + 1));
    }
    return Status::Ok();
  }
  out->push_back(&node);
  return Status::Ok();
}

std::string TypeOf(const json& node) {
  auto t = node.find("type");
  return t != node.end() && t->is_string() ? t->get<std::string>() : std::string("?");
}

bool BoolOr(const json& node, const char* key, bool fallback) {
  auto it = node.find(key);
  return it != node.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// A Split pattern {"String": s} as a regex matching s literally.
std::string EscapeLiteral(const std::string& s) {
  std::string out;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && std::ispunct(u)) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

struct PreTokenizerFields {
  std::string pre;
  std::vector<std::string> regexes;
};

// Reads the pre_tokenizer into VocabData's pre / pre_regexes, or says what is not supported.
StatusOr<PreTokenizerFields> DetectPre(const json& root, const std::string& where) {
  auto pt = root.find("pre_tokenizer");
  if (pt == root.end() || pt->is_null()) {
    return Unimplemented(where + ": no pre_tokenizer; only byte-level BPE is supported");
  }
  std::vector<const json*> steps;
  RETURN_IF_ERROR(Flatten(*pt, "pre_tokenizer", &steps).WithPrefix(where));
  // Every step but ByteLevel's mapping is a split into isolated pieces; ByteLevel must come last,
  // since a Split after it would see the mapped characters.
  std::vector<std::string> regexes;
  bool byte_level = false;
  for (const json* step : steps) {
    const std::string type = TypeOf(*step);
    if (byte_level) {
      return Unimplemented(where + ": pre_tokenizer " + Printable(type) +
                           " after ByteLevel is not supported");
    }
    if (type == "ByteLevel") {
      byte_level = true;
      if (BoolOr(*step, "add_prefix_space", false)) {
        return Unimplemented(where +
                             ": pre_tokenizer ByteLevel with add_prefix_space is not "
                             "supported");
      }
      if (BoolOr(*step, "use_regex", true)) {
        regexes.push_back(PreTokenizerRegexes(PreTokenizer::kGpt2)[0]);
      }
    } else if (type == "Digits") {
      // Digits splits at char::is_numeric, i.e. \p{N}: each digit alone, or runs of them.
      regexes.push_back(BoolOr(*step, "individual_digits", false) ? "\\p{N}" : "\\p{N}+");
    } else if (type == "Split") {
      auto pattern = step->find("pattern");
      auto behavior = step->find("behavior");
      const bool is_regex = pattern != step->end() && pattern->is_object() &&
                            pattern->contains("Regex") && (*pattern)["Regex"].is_string();
      const bool is_string = pattern != step->end() && pattern->is_object() &&
                             pattern->contains("String") && (*pattern)["String"].is_string();
      if (!is_regex && !is_string) {
        return Unimplemented(where +
                             ": pre_tokenizer Split without a Regex or String pattern is not "
                             "supported");
      }
      const bool inverted = BoolOr(*step, "invert", false);
      if (behavior == step->end() || *behavior != "Isolated" || inverted) {
        const std::string got = (behavior == step->end() ? std::string("no behavior")
                                                         : "behavior " + behavior->dump()) +
                                (inverted ? ", inverted" : "");
        return Unimplemented(where +
                             ": pre_tokenizer Split is supported with behavior Isolated, not "
                             "inverted; this one has " +
                             Printable(got));
      }
      regexes.push_back(is_regex ? (*pattern)["Regex"].get<std::string>()
                                 : EscapeLiteral((*pattern)["String"].get<std::string>()));
    } else {
      return Unimplemented(where + ": pre_tokenizer type " + Printable(type) + " is not supported");
    }
  }
  if (!byte_level) {
    return Unimplemented(where +
                         ": not a byte-level BPE (no ByteLevel pre_tokenizer); "
                         "SentencePiece-style tokenizer.json files (Llama 2) are not "
                         "supported, load the GGUF vocabulary instead");
  }
  if (regexes.empty()) {
    return Unimplemented(where + ": ByteLevel without a regex split is not supported");
  }
  PreTokenizerFields fields;
  if (std::optional<PreTokenizer> kind = PreTokenizerForRegexes(regexes)) {
    fields.pre = std::string(PreTokenizerName(*kind));
    return fields;
  }
  for (const std::string& r : regexes) {
    StatusOr<Regex> compiled = Regex::Compile(r);
    if (!compiled.ok()) {
      return Status(compiled.status().code(), where + ": pre_tokenizer Split regex \"" +
                                                  Printable(r) +
                                                  "\": " + compiled.status().message());
    }
  }
  fields.regexes = std::move(regexes);
  return fields;
}

// The first token of the post_processor's single-sequence template when it is a special token
// (how Llama 3's tokenizer.json adds BOS).
std::optional<std::string> TemplateBos(const json& root) {
  auto pp = root.find("post_processor");
  if (pp == root.end() || !pp->is_object()) return std::nullopt;
  std::vector<const json*> nodes = {&*pp};
  if (TypeOf(*pp) == "Sequence") {
    nodes.clear();
    auto list = pp->find("processors");
    if (list == pp->end() || !list->is_array()) return std::nullopt;
    for (const json& p : *list) nodes.push_back(&p);
  }
  for (const json* n : nodes) {
    if (TypeOf(*n) != "TemplateProcessing") continue;
    auto single = n->find("single");
    if (single == n->end() || !single->is_array() || single->empty()) continue;
    const json& first = (*single)[0];
    if (!first.is_object()) continue;
    auto st = first.find("SpecialToken");
    if (st != first.end() && st->is_object() && st->contains("id") && (*st)["id"].is_string()) {
      return (*st)["id"].get<std::string>();
    }
  }
  return std::nullopt;
}

StatusOr<VocabData> Load(const std::string& path, const std::string& config_path) {
  ASSIGN_OR_RETURN(json root, ParseJsonFile(path));
  auto model_it = root.find("model");
  if (model_it == root.end() || !model_it->is_object()) {
    return InvalidArgument(path + ": no \"model\" object");
  }
  const json& model = *model_it;
  auto type_it = model.find("type");
  if (type_it != model.end() && !type_it->is_string()) {
    return InvalidArgument(path + ": model.type is not a string");
  }
  // Files from before "type" was written hold a BPE model when they have merges.
  const std::string type = type_it != model.end()     ? type_it->get<std::string>()
                           : model.contains("merges") ? "BPE"
                                                      : "";
  if (type != "BPE") {
    return Unimplemented(path + ": model.type \"" + Printable(type) +
                         "\" is not supported; only BPE");
  }
  if (BoolOr(model, "byte_fallback", false)) {
    return Unimplemented(path +
                         ": model.byte_fallback (SentencePiece-style BPE) is not "
                         "supported; load the GGUF vocabulary instead");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() &&
        !(it->is_string() && it->get<std::string>().empty())) {
      return Unimplemented(path + ": model." + key + " is not supported");
    }
  }
  if (auto norm = root.find("normalizer"); norm != root.end() && !norm->is_null()) {
    // NFC (Qwen2) is accepted without being applied: prompts are nearly always NFC already.
    if (TypeOf(*norm) != "NFC") {
      return Unimplemented(path + ": normalizer " + Printable(TypeOf(*norm)) + " is not supported");
    }
  }

  VocabData data;
  data.model = "gpt2";
  data.add_space_prefix = false;
  data.add_bos = false;
  // HF's BPE takes a chunk that is itself a piece whole (Llama 3 sets it); absent means false.
  data.ignore_merges = false;
  if (auto it = model.find("ignore_merges"); it != model.end() && !it->is_null()) {
    if (!it->is_boolean()) return InvalidArgument(path + ": model.ignore_merges is not a bool");
    data.ignore_merges = it->get<bool>();
  }
  ASSIGN_OR_RETURN(PreTokenizerFields pre, DetectPre(root, path));
  data.pre = std::move(pre.pre);
  data.pre_regexes = std::move(pre.regexes);

  // Vocabulary: ids may leave holes (filled as unused) and added tokens may extend it.
  auto vocab_it = model.find("vocab");
  if (vocab_it == model.end() || !vocab_it->is_object()) {
    return InvalidArgument(path + ": model.vocab is not an object of piece -> id");
  }
  const auto bad_id = [](const json& id) {
    // Unsigned first: one past INT64_MAX would read as a negative int64.
    return id.is_number_unsigned()
               ? id.get<uint64_t>() >= kMaxVocabSize
               : id.get<int64_t>() < 0 || id.get<int64_t>() >= static_cast<int64_t>(kMaxVocabSize);
  };
  std::vector<std::pair<int64_t, std::string>> entries;
  entries.reserve(vocab_it->size());
  for (auto it = vocab_it->begin(); it != vocab_it->end(); ++it) {
    if (!it.value().is_number_integer()) {
      return InvalidArgument(path + ": model.vocab[\"" + Printable(it.key()) +
                             "\"] is not an integer id");
    }
    if (bad_id(it.value())) {
      return InvalidArgument(path + ": model.vocab[\"" + Printable(it.key()) + "\"] has id " +
                             it.value().dump() + " out of range");
    }
    entries.emplace_back(it.value().get<int64_t>(), it.key());
  }
  auto added_it = root.find("added_tokens");
  if (added_it != root.end() && !added_it->is_null() && !added_it->is_array()) {
    return InvalidArgument(path + ": added_tokens is not an array");
  }
  struct Added {
    int64_t id;
    std::string content;
    bool special;
  };
  std::vector<Added> added;
  if (added_it != root.end() && added_it->is_array()) {
    for (size_t i = 0; i < added_it->size(); ++i) {
      const json& a = (*added_it)[i];
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string()) {
        return InvalidArgument(path + ": added_tokens[" + std::to_string(i) +
                               "] needs an integer id and a string content");
      }
      if (bad_id(a["id"])) {
        return InvalidArgument(path + ": added_tokens id " + a["id"].dump() + " out of range");
      }
      added.push_back(
          {a["id"].get<int64_t>(), a["content"].get<std::string>(), BoolOr(a, "special", false)});
    }
  }
  int64_t max_id = -1;
  for (const auto& [id, piece] : entries) max_id = std::max(max_id, id);
  for (const Added& a : added) max_id = std::max(max_id, a.id);
  if (max_id < 0) return InvalidArgument(path + ": model.vocab is empty");
  // Ids index a dense table: a handful of tokens with a huge id would allocate millions of
  // empty entries. Real vocabularies leave at most a few gaps.
  std::unordered_set<int64_t> distinct;
  for (const auto& e : entries) distinct.insert(e.first);
  for (const Added& a : added) distinct.insert(a.id);
  const int64_t listed = static_cast<int64_t>(distinct.size());
  if (max_id >= 2 * listed + 1024) {
    return InvalidArgument(path + ": token ids are sparse: " + std::to_string(listed) +
                           " tokens but the largest id is " + std::to_string(max_id));
  }
  data.tokens.resize(static_cast<size_t>(max_id + 1));
  data.token_types.assign(data.tokens.size(), kTokenUnused);
  for (const auto& [id, piece] : entries) {
    if (data.token_types[id] != kTokenUnused) {
      return InvalidArgument(path + ": model.vocab gives id " + std::to_string(id) + " to both \"" +
                             Printable(data.tokens[id]) + "\" and \"" + Printable(piece) + "\"");
    }
    data.tokens[id] = piece;
    data.token_types[id] = kTokenNormal;
  }
  for (const Added& a : added) {
    data.tokens[a.id] = a.content;
    data.token_types[a.id] = a.special ? kTokenControl : kTokenUserDefined;
  }

  auto merges_it = model.find("merges");
  if (merges_it == model.end() || !merges_it->is_array()) {
    return InvalidArgument(path + ": model.merges is not an array");
  }
  data.merges.reserve(merges_it->size());
  for (size_t i = 0; i < merges_it->size(); ++i) {
    const json& m = (*merges_it)[i];
    if (m.is_string()) {
      data.merges.push_back(m.get<std::string>());
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      data.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    } else {
      return InvalidArgument(path + ": model.merges[" + std::to_string(i) +
                             "] is neither \"a b\" nor [\"a\", \"b\"]");
    }
  }

  // Token text -> id; added tokens take precedence over the vocab.
  std::unordered_map<std::string, int32_t> ids;
  for (const auto& [id, piece] : entries) ids.emplace(piece, static_cast<int32_t>(id));
  for (const Added& a : added) ids[a.content] = static_cast<int32_t>(a.id);
  auto find_id = [&](const std::string& text) -> int32_t {
    auto it = ids.find(text);
    return it == ids.end() ? -1 : it->second;
  };
  if (auto unk = model.find("unk_token"); unk != model.end() && unk->is_string()) {
    data.unk_id = find_id(unk->get<std::string>());
  }

  std::optional<bool> add_bos_token;
  if (!config_path.empty()) {
    ASSIGN_OR_RETURN(json config, ParseJsonFile(config_path));
    const std::pair<const char*, int32_t*> named[] = {{"bos_token", &data.bos_id},
                                                      {"eos_token", &data.eos_id},
                                                      {"pad_token", &data.pad_id},
                                                      {"unk_token", &data.unk_id}};
    for (const auto& [key, field] : named) {
      ASSIGN_OR_RETURN(std::optional<std::string> text, TokenText(config, key, config_path));
      if (!text) continue;
      const int32_t id = find_id(*text);
      if (id < 0) {
        return InvalidArgument(config_path + ": " + key + " \"" + Printable(*text) +
                               "\" is not in the vocabulary");
      }
      *field = id;
    }
    if (auto it = config.find("add_bos_token"); it != config.end() && it->is_boolean()) {
      add_bos_token = it->get<bool>();
    }
    if (auto it = config.find("chat_template"); it != config.end() && !it->is_null()) {
      if (it->is_string()) {
        data.chat_template = it->get<std::string>();
      } else if (it->is_array()) {
        // [{"name": ..., "template": ...}]: the "default" one, else the first.
        for (const json& t : *it) {
          if (!t.is_object() || !t.contains("template") || !t["template"].is_string()) {
            return InvalidArgument(config_path + ": chat_template entries need a string template");
          }
          const bool is_default = t.contains("name") && t["name"] == "default";
          if (data.chat_template.empty() || is_default) {
            data.chat_template = t["template"].get<std::string>();
          }
          if (is_default) break;
        }
      } else {
        return InvalidArgument(config_path + ": chat_template is neither a string nor a list");
      }
    }
  }
  const std::optional<std::string> template_bos = TemplateBos(root);
  if (template_bos && data.bos_id < 0) data.bos_id = find_id(*template_bos);
  if (add_bos_token) {
    data.add_bos = *add_bos_token;
  } else {
    data.add_bos = template_bos && data.bos_id >= 0 && find_id(*template_bos) == data.bos_id;
  }
  if (const int32_t eot = find_id("<|eot_id|>"); eot >= 0 && eot != data.eos_id) {
    data.eot_id = eot;
  }
  return data;
}

}  // namespace

StatusOr<VocabData> LoadHfTokenizerJson(const std::string& tokenizer_json_path,
                                        const std::string& tokenizer_config_json_path) {
  try {
    return Load(tokenizer_json_path, tokenizer_config_json_path);
  } catch (const json::exception& e) {
    // Type checks above should leave nothing to throw; this keeps the promise of no exceptions.
    return InvalidArgument(tokenizer_json_path + ": unexpected JSON shape: " + e.what());
  } catch (const std::bad_alloc&) {
    return ResourceExhausted(tokenizer_json_path + ": out of memory");
  }
}

}  // namespace helix
