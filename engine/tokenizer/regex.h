// A small backtracking regex engine for the Split patterns of Hugging Face tokenizer.json
// pre-tokenizers, with the Oniguruma semantics HF tokenizers runs them under. A compiled Regex is
// immutable and safe to share between threads; each search keeps its state in the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/common/status.h"
#include "engine/tokenizer/unicode.h"

namespace helix {

// A text decoded once for matching, possibly by several regexes: its characters, their general
// categories and byte offsets. An ill-formed UTF-8 byte is one character, kInvalidCodePoint of
// category kCn, which only negated classes (and `.`) match. Holds a view of the text.
class RegexInput {
 public:
  explicit RegexInput(std::string_view text);

  size_t size() const { return cp_.size(); }  // In characters.
  uint32_t cp(size_t i) const { return cp_[i]; }
  GeneralCategory category(size_t i) const { return cat_[i]; }
  // The byte offset of character i; offset(size()) is the text's length.
  size_t offset(size_t i) const { return offset_[i]; }
  std::string_view text() const { return text_; }

 private:
  std::string_view text_;
  std::vector<uint32_t> cp_;
  std::vector<GeneralCategory> cat_;
  std::vector<uint32_t> offset_;
};

// Character positions [begin, end) of a RegexInput.
struct CharSpan {
  size_t begin = 0, end = 0;
  bool operator==(const CharSpan&) const = default;
};

// The backtracking work that the searches over one text may do in all, shared by every search of
// it: every regex of a pre-tokenizer, every window an earlier regex left, every fragment between
// special tokens. Matching a text of n characters (or bytes) under one budget thus takes at most
// kBaseSteps + kStepsPerChar * n steps, however the regexes and the cuts fall; real tokenizer
// patterns take a few steps per character. A plain value; one per text, not shared by threads.
struct RegexBudget {
  static constexpr uint64_t kBaseSteps = uint64_t{1} << 20;
  static constexpr uint64_t kStepsPerChar = 256;
  // The deepest one search's backtracking stack may grow (24 bytes a frame); a search that would
  // need more ends as one that ran out of steps does. A greedy or lazy quantifier over a single
  // character or class takes one frame for its whole run.
  static constexpr size_t kMaxFrames = size_t{1} << 18;

  // kBaseSteps + kStepsPerChar * chars steps.
  static RegexBudget ForChars(size_t chars) { return {kBaseSteps + kStepsPerChar * chars}; }

  uint64_t steps_left = 0;  // An instruction takes one step; a quantifier's run one per character.
  size_t peak_frames = 0;   // The deepest backtracking stack a search used so far.
};

// Matching is leftmost-first: alternatives in order, quantifiers greedy (or lazy, or possessive)
// with backtracking, as Oniguruma (Ruby syntax) matches. What Compile accepts:
//   literals (UTF-8), `.` (anything but \n), ^ $ (line anchors), \A \z \Z \b \B;
//   escapes \t \n \r \f \v \a \e \xHH \x{H..} \uHHHH \o{..} \0, and any escaped punctuation;
//   \s \S (White_Space), \d \D (Nd), \w \W (Oniguruma's word characters), \h \H (hex digits);
//   \p{X} \P{X} \p{^X} for general categories: one- and two-letter names, LC, their long
//   names (Letter, Uppercase_Letter, ...) and Any, in any case, ignoring spaces, - and _;
//   classes [...] [^...] of those, literals and code point ranges;
//   * + ? {n} {n,} {,m} {n,m}, each greedy, lazy (?; not {n}) or possessive (+; not {..});
//   | ( ) (?: ) (?<name> ) (?> ) (?= ) (?! ) (?# ), and the flag i in (?i: ) (?-i: ) (?i) (?-i).
// Groups and quantifiers nest at most 100 deep, each quantifier one level (a{1}{1} is two), which
// bounds the recursion of compiling and matching.
// Case-insensitive matching covers ASCII letters (with U+017F ſ ~ s and U+212A K ~ k, as Unicode
// case folding has them); a pattern that would need more (a cased non-ASCII literal or range, a
// cased property in a class, a letter pair with a one-character fold such as ss ~ ß) is refused.
class Regex {
 public:
  // Parses `pattern` as a tokenizer.json holds it (after JSON unescaping).
  // Errors: InvalidArgument for a malformed pattern, Unimplemented for a construct this engine
  // does not implement (lookbehind, backreferences, scripts, nesting deeper than 100, ...); the
  // message names the construct and its byte offset in the pattern.
  static StatusOr<Regex> Compile(std::string_view pattern);

  // Each search below spends `budget` when one is given, else a budget of its own:
  // RegexBudget::ForChars of the window (of all the windows for SplitEach).

  // The leftmost match starting in [from, window.end] (an empty match may start at window.end).
  // The window stands for the whole subject: anchors and lookahead see nothing outside it.
  // REQUIRES: window.begin <= from <= window.end <= in.size().
  // Errors: ResourceExhausted when the budget's steps run out or the search would need more than
  // RegexBudget::kMaxFrames backtracking frames.
  StatusOr<std::optional<CharSpan>> Search(const RegexInput& in, CharSpan window, size_t from,
                                           RegexBudget* budget = nullptr) const;

  // Appends the matches HF's Split walks in `window`, empty ones included: the leftmost match,
  // then the leftmost from its end on, and so on (the onig crate's find_iter, which skips an
  // empty match right where the previous match ended by moving on one character).
  // Errors: ResourceExhausted as for Search; the matches found before it are appended.
  Status FindAll(const RegexInput& in, CharSpan window, std::vector<CharSpan>* out,
                 RegexBudget* budget = nullptr) const;

  // Appends the pieces of `window` as HF's Split(pattern, behavior=Isolated) cuts a text: every
  // match and every stretch between matches, in order; empty pieces (from empty matches) are left
  // out, so the pieces are non-empty and cover the window exactly. If a search runs out (of
  // steps or of stack), the rest of the window after the last match found is one piece (as
  // Oniguruma's retry limit ends HF's match iteration) and ResourceExhausted is returned.
  Status SplitIsolated(const RegexInput& in, CharSpan window, std::vector<CharSpan>* out,
                       RegexBudget* budget = nullptr) const;

  // SplitIsolated on each of `windows` in turn, each a whole subject, all on one budget; the
  // pieces of all of them are appended in order. Returns the first error; the later windows are
  // still split (once the steps are spent, each stays one piece).
  Status SplitEach(const RegexInput& in, const std::vector<CharSpan>& windows,
                   std::vector<CharSpan>* out, RegexBudget* budget = nullptr) const;

  const std::string& pattern() const { return pattern_; }

  // The compiled form; defined in regex.cc.
  struct Program;

 private:
  Regex() = default;

  std::string pattern_;
  std::shared_ptr<const Program> program_;  // Shared by copies; never null once compiled.
};

}  // namespace helix
