#include "engine/tokenizer/regex.h"

#include <algorithm>
#include <array>
#include <limits>
#include <utility>

namespace helix {

RegexInput::RegexInput(std::string_view text) : text_(text) {
  DecodeAll(text, &cp_, &offset_);
  cat_.reserve(cp_.size());
  for (uint32_t cp : cp_) cat_.push_back(CategoryOf(cp));
}

namespace {

using GC = GeneralCategory;
using Range = std::pair<uint32_t, uint32_t>;  // Inclusive.

constexpr CategoryMask kLetters = MaskOf(GC::kLu, GC::kLo);
constexpr CategoryMask kCasedLetters = MaskOf(GC::kLu, GC::kLt);
// Categories whose characters may have another case: a case-insensitive pattern must not rely on
// them beyond ASCII (see MayHaveCase).
constexpr CategoryMask kCased = kCasedLetters | MaskOf(GC::kNl);

// Groups and quantifiers within each other (each quantifier is a level: a{1}{1} has two). The
// syntax tree is at most about three nodes deep per level, which bounds the recursion over it
// (Nullable, Emit, ~Node) and the matcher's (through nested lookaheads and atomic groups).
constexpr int kMaxNesting = 100;
constexpr int kMaxRepeat = 1000;       // The largest n or m in {n,m}.
constexpr size_t kMaxInsts = 1 << 17;  // After counted repetitions are expanded.

// ---------------------------------------------------------------------------------------------
// Character sets and classes

// A union of code point ranges and general categories.
struct CharSet {
  std::vector<Range> ranges;  // Sorted and merged once Normalize() ran.
  CategoryMask categories = 0;

  void Add(uint32_t first, uint32_t last) { ranges.emplace_back(first, last); }
  void Add(const CharSet& other) {
    ranges.insert(ranges.end(), other.ranges.begin(), other.ranges.end());
    categories |= other.categories;
  }
  void Normalize() {
    std::sort(ranges.begin(), ranges.end());
    std::vector<Range> merged;
    for (const Range& r : ranges) {
      if (!merged.empty() && r.first <= merged.back().second + uint64_t{1}) {
        merged.back().second = std::max(merged.back().second, r.second);
      } else {
        merged.push_back(r);
      }
    }
    ranges = std::move(merged);
  }
  bool Contains(uint32_t cp, GC cat) const {
    if (categories & MaskOf(cat)) return true;
    auto it = std::upper_bound(ranges.begin(), ranges.end(), cp,
                               [](uint32_t v, const Range& r) { return v < r.first; });
    return it != ranges.begin() && cp <= (it - 1)->second;
  }
};

CharSet SpaceSet() {
  CharSet s;
  for (const auto& [first, last] : kWhiteSpaceRanges) s.Add(first, last);
  return s;
}

CharSet DigitSet() {
  CharSet s;
  s.categories = MaskOf(GC::kNd);
  return s;
}

CharSet HexDigitSet() {
  CharSet s;
  s.Add('0', '9');
  s.Add('A', 'F');
  s.Add('a', 'f');
  return s;
}

// Oniguruma's \w (measured against HF tokenizers' build): L, M, Nd, Nl and Pc, plus the Latin-1
// superscripts and fractions (No) and the circled, squared and negative squared Latin letters
// (So, Other_Alphabetic).
CharSet WordSet() {
  CharSet s;
  s.categories = kLetters | MaskOf(GC::kMn, GC::kMe) | MaskOf(GC::kNd, GC::kNl) | MaskOf(GC::kPc);
  for (Range r : {Range{0xB2, 0xB3}, Range{0xB9, 0xB9}, Range{0xBC, 0xBE}, Range{0x24B6, 0x24E9},
                  Range{0x1F130, 0x1F149}, Range{0x1F150, 0x1F169}, Range{0x1F170, 0x1F189}}) {
    s.Add(r.first, r.second);
  }
  s.Normalize();
  return s;
}

const CharSet& Word() {
  static const CharSet word = WordSet();
  return word;
}

// The ASCII letter a non-ASCII letter folds to (ſ -> s, K -> k), or 0.
uint32_t AsciiFoldOf(uint32_t cp) {
  if (cp == 0x17F) return 's';
  if (cp == 0x212A) return 'k';
  return 0;
}

// The other characters that match an ASCII-case-insensitive pattern character: ASCII case
// partners, and the two non-ASCII letters that Unicode case folding maps into ASCII.
std::array<uint32_t, 2> FoldVariants(uint32_t cp) {
  constexpr uint32_t kNone = kInvalidCodePoint;
  if (cp >= 'a' && cp <= 'z') return {cp - 32, kNone};
  if (cp >= 'A' && cp <= 'Z') return {cp + 32, kNone};
  if (const uint32_t lower = AsciiFoldOf(cp)) return {lower, lower - 32};
  return {kNone, kNone};
}

// Whether a character in [first, last] beyond ASCII may have another case (an over-estimate:
// cased letters, letter numbers such as Roman numerals, the circled letters, U+0345).
bool MayHaveCase(uint32_t first, uint32_t last) {
  first = std::max<uint32_t>(first, 0x80);
  if (first > last) return false;
  if (AnyCodePointIn(first, last, kCased)) return true;
  const auto overlaps = [&](uint32_t a, uint32_t b) { return first <= b && a <= last; };
  return overlaps(0x24B6, 0x24E9) || overlaps(0x345, 0x345);
}

struct CharClass {
  CharSet set;                       // Matches what is in it.
  std::vector<CharSet> complements;  // Each matches what is not in it (\S \W \D \H in [...]).
  bool negated = false;              // [^...]
  bool fold = false;                 // Under (?i): a character's ASCII case variants match too.
  std::array<uint64_t, 4> latin1{};  // Matches() for code points below 256, set by Finish().

  void Finish() {
    set.Normalize();
    for (CharSet& c : complements) c.Normalize();
    for (uint32_t cp = 0; cp < 256; ++cp) {
      if (Compute(cp, CategoryOf(cp))) latin1[cp >> 6] |= uint64_t{1} << (cp & 63);
    }
  }
  bool Matches(uint32_t cp, GC cat) const {
    if (cp < 256) return (latin1[cp >> 6] >> (cp & 63)) & 1;
    return Compute(cp, cat);
  }

 private:
  bool Contains(uint32_t cp, GC cat) const {
    if (set.Contains(cp, cat)) return true;
    for (const CharSet& c : complements) {
      if (!c.Contains(cp, cat)) return true;
    }
    return false;
  }
  bool Compute(uint32_t cp, GC cat) const {
    bool in = Contains(cp, cat);
    if (!in && fold) {
      for (uint32_t v : FoldVariants(cp)) {
        if (v != kInvalidCodePoint && Contains(v, CategoryOf(v))) {
          in = true;
          break;
        }
      }
    }
    return in != negated;
  }
};

// ---------------------------------------------------------------------------------------------
// Syntax tree

enum class AssertKind : uint8_t {
  kLineBegin,       // ^
  kLineEnd,         // $
  kTextBegin,       // \A
  kTextEnd,         // \z
  kTextEndNewline,  // \Z
  kWordBoundary,    // \b
  kNotWordBoundary  // \B
};

struct Node {
  enum class Kind : uint8_t {
    kEmpty,
    kChar,
    kClass,
    kConcat,
    kAlt,
    kRepeat,
    kLook,
    kAtomic,
    kAssert
  };
  Kind kind = Kind::kEmpty;
  uint32_t value = 0;    // kChar: the code point; kClass: its index; kAssert: an AssertKind.
  bool fold = false;     // kChar: an ASCII letter (lower case) that matches in either case.
  bool negate = false;   // kLook: (?! rather than (?=.
  bool greedy = true;    // kRepeat.
  int min = 0, max = 0;  // kRepeat; max < 0 for no limit.
  int levels = 0;        // Groups and quantifiers on the deepest path down from here, this one's.
  std::vector<Node> kids;

  static Node Of(Kind kind, uint32_t value = 0) {
    Node n;
    n.kind = kind;
    n.value = value;
    return n;
  }
};

bool Nullable(const Node& n) {
  switch (n.kind) {
    case Node::Kind::kChar:
    case Node::Kind::kClass:
      return false;
    case Node::Kind::kConcat:
      return std::all_of(n.kids.begin(), n.kids.end(), Nullable);
    case Node::Kind::kAlt:
      return std::any_of(n.kids.begin(), n.kids.end(), Nullable);
    case Node::Kind::kRepeat:
      return n.min == 0 || Nullable(n.kids[0]);
    case Node::Kind::kAtomic:
      return Nullable(n.kids[0]);
    default:  // Empty, lookahead, assertions.
      return true;
  }
}

// ---------------------------------------------------------------------------------------------
// Parser: Oniguruma's Ruby syntax, the subset regex.h lists.

// One escape sequence: a character, a set of characters, or an assertion.
struct Escape {
  enum class Type { kChar, kSet, kAssert } type = Type::kChar;
  uint32_t cp = 0;
  CharSet set;
  bool set_negated = false;
  CategoryMask property = 0;  // The categories a \p{..} named (before negation), else 0.
  AssertKind assert = AssertKind::kLineBegin;
};

struct PropertyName {
  std::string_view name;  // Lower case, without spaces, '-' or '_'.
  CategoryMask mask;
};

// clang-format off
constexpr PropertyName kProperties[] = {
    {"l", MaskOf(GC::kLu, GC::kLo)}, {"letter", MaskOf(GC::kLu, GC::kLo)},
    {"lc", kCasedLetters}, {"casedletter", kCasedLetters},
    {"lu", MaskOf(GC::kLu)}, {"uppercaseletter", MaskOf(GC::kLu)},
    {"ll", MaskOf(GC::kLl)}, {"lowercaseletter", MaskOf(GC::kLl)},
    {"lt", MaskOf(GC::kLt)}, {"titlecaseletter", MaskOf(GC::kLt)},
    {"lm", MaskOf(GC::kLm)}, {"modifierletter", MaskOf(GC::kLm)},
    {"lo", MaskOf(GC::kLo)}, {"otherletter", MaskOf(GC::kLo)},
    {"m", MaskOf(GC::kMn, GC::kMe)}, {"mark", MaskOf(GC::kMn, GC::kMe)},
    {"combiningmark", MaskOf(GC::kMn, GC::kMe)},
    {"mn", MaskOf(GC::kMn)}, {"nonspacingmark", MaskOf(GC::kMn)},
    {"mc", MaskOf(GC::kMc)}, {"spacingmark", MaskOf(GC::kMc)},
    {"me", MaskOf(GC::kMe)}, {"enclosingmark", MaskOf(GC::kMe)},
    {"n", MaskOf(GC::kNd, GC::kNo)}, {"number", MaskOf(GC::kNd, GC::kNo)},
    {"nd", MaskOf(GC::kNd)}, {"decimalnumber", MaskOf(GC::kNd)},
    {"nl", MaskOf(GC::kNl)}, {"letternumber", MaskOf(GC::kNl)},
    {"no", MaskOf(GC::kNo)}, {"othernumber", MaskOf(GC::kNo)},
    {"p", MaskOf(GC::kPc, GC::kPo)}, {"punctuation", MaskOf(GC::kPc, GC::kPo)},
    {"pc", MaskOf(GC::kPc)}, {"connectorpunctuation", MaskOf(GC::kPc)},
    {"pd", MaskOf(GC::kPd)}, {"dashpunctuation", MaskOf(GC::kPd)},
    {"ps", MaskOf(GC::kPs)}, {"openpunctuation", MaskOf(GC::kPs)},
    {"pe", MaskOf(GC::kPe)}, {"closepunctuation", MaskOf(GC::kPe)},
    {"pi", MaskOf(GC::kPi)}, {"initialpunctuation", MaskOf(GC::kPi)},
    {"pf", MaskOf(GC::kPf)}, {"finalpunctuation", MaskOf(GC::kPf)},
    {"po", MaskOf(GC::kPo)}, {"otherpunctuation", MaskOf(GC::kPo)},
    {"s", MaskOf(GC::kSm, GC::kSo)}, {"symbol", MaskOf(GC::kSm, GC::kSo)},
    {"sm", MaskOf(GC::kSm)}, {"mathsymbol", MaskOf(GC::kSm)},
    {"sc", MaskOf(GC::kSc)}, {"currencysymbol", MaskOf(GC::kSc)},
    {"sk", MaskOf(GC::kSk)}, {"modifiersymbol", MaskOf(GC::kSk)},
    {"so", MaskOf(GC::kSo)}, {"othersymbol", MaskOf(GC::kSo)},
    {"z", MaskOf(GC::kZs, GC::kZp)}, {"separator", MaskOf(GC::kZs, GC::kZp)},
    {"zs", MaskOf(GC::kZs)}, {"spaceseparator", MaskOf(GC::kZs)},
    {"zl", MaskOf(GC::kZl)}, {"lineseparator", MaskOf(GC::kZl)},
    {"zp", MaskOf(GC::kZp)}, {"paragraphseparator", MaskOf(GC::kZp)},
    {"c", MaskOf(GC::kCc, GC::kCo) | MaskOf(GC::kCn)}, {"other", MaskOf(GC::kCc, GC::kCo) | MaskOf(GC::kCn)},
    {"cc", MaskOf(GC::kCc)}, {"control", MaskOf(GC::kCc)},
    {"cf", MaskOf(GC::kCf)}, {"format", MaskOf(GC::kCf)},
    {"cs", MaskOf(GC::kCs)}, {"surrogate", MaskOf(GC::kCs)},
    {"co", MaskOf(GC::kCo)}, {"privateuse", MaskOf(GC::kCo)},
    {"cn", MaskOf(GC::kCn)}, {"unassigned", MaskOf(GC::kCn)},
    {"any", kAllCategories},
};
// clang-format on

bool IsAsciiLetter(uint32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string CodePointName(uint32_t cp) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string digits;
  for (; cp != 0 || digits.size() < 4; cp >>= 4) digits.insert(digits.begin(), kHex[cp & 15]);
  return "U+" + digits;
}

class Parser {
 public:
  Parser(std::string_view pattern, std::vector<CharClass>* classes)
      : p_(pattern), classes_(classes) {}

  StatusOr<Node> Parse() {
    Node root;
    RETURN_IF_ERROR(ParseAlternation(/*icase=*/false, /*depth=*/0, &root));
    if (i_ < p_.size()) return Error(StatusCode::kInvalidArgument, i_, "unmatched )");
    return root;
  }

 private:
  bool AtEnd() const { return i_ >= p_.size(); }
  bool Next(std::string_view s) const { return p_.substr(i_, s.size()) == s; }

  Status Error(StatusCode code, size_t at, const std::string& what) const {
    return Status(code, what + " at offset " + std::to_string(at));
  }
  Status Unsupported(size_t at, const std::string& what) const {
    return Error(StatusCode::kUnimplemented, at, what + " is not supported");
  }
  Status TooDeep(size_t at) const {
    return Unsupported(at,
                       "nesting groups and quantifiers deeper than " + std::to_string(kMaxNesting));
  }
  // Sets n's levels: one more than `inner`'s.
  Status Wrap(Node* n, int inner, size_t at) const {
    if (inner + 1 > kMaxNesting) return TooDeep(at);
    n->levels = inner + 1;
    return Status::Ok();
  }
  static int MaxLevels(const std::vector<Node>& nodes) {
    int levels = 0;
    for (const Node& n : nodes) levels = std::max(levels, n.levels);
    return levels;
  }

  // alternation := concatenation ('|' concatenation)*, up to ')' or the end.
  Status ParseAlternation(bool icase, int depth, Node* out) {
    if (depth > kMaxNesting) return TooDeep(i_);
    std::vector<Node> alternatives;
    for (;;) {
      Node seq;
      RETURN_IF_ERROR(ParseConcatenation(icase, depth, &seq));
      alternatives.push_back(std::move(seq));
      if (AtEnd() || p_[i_] != '|') break;
      ++i_;
    }
    if (alternatives.size() == 1) {
      *out = std::move(alternatives[0]);
    } else {
      *out = Node::Of(Node::Kind::kAlt);
      out->levels = MaxLevels(alternatives);
      out->kids = std::move(alternatives);
    }
    return Status::Ok();
  }

  Status ParseConcatenation(bool icase, int depth, Node* out) {
    *out = Node::Of(Node::Kind::kConcat);
    std::vector<Node>& seq = out->kids;
    bool last_was_bare_fold = false;  // The previous item is an unquantified (?i) letter.
    size_t last_at = 0;
    while (!AtEnd() && p_[i_] != '|' && p_[i_] != ')') {
      const size_t at = i_;
      Node atom;
      std::optional<bool> inline_icase;
      RETURN_IF_ERROR(ParseAtom(icase, depth, &atom, &inline_icase));
      if (inline_icase) {
        // (?i) and (?-i) apply to the rest of the group, its later alternatives included.
        Node rest;
        RETURN_IF_ERROR(ParseAlternation(*inline_icase, depth + 1, &rest));
        RETURN_IF_ERROR(Wrap(&rest, rest.levels, at));
        out->levels = std::max(out->levels, rest.levels);
        seq.push_back(std::move(rest));
        break;
      }
      bool quantified = false;
      RETURN_IF_ERROR(ParseQuantifiers(&atom, &quantified));
      out->levels = std::max(out->levels, atom.levels);
      const bool bare_fold = !quantified && atom.kind == Node::Kind::kChar && atom.fold;
      if (bare_fold && last_was_bare_fold) {
        // Oniguruma matches e.g. (?i:ss) against ß and (?i:fi) against ﬁ (multi-character case
        // folding), which this engine does not do.
        const std::string pair = {static_cast<char>(seq.back().value),
                                  static_cast<char>(atom.value)};
        if (pair == "ss" || pair == "st" || pair == "ff" || pair == "fi" || pair == "fl") {
          return Unsupported(last_at, "case-insensitive \"" + pair +
                                          "\" (which Oniguruma also matches as one folded "
                                          "character, e.g. ß or ﬁ)");
        }
      }
      last_was_bare_fold = bare_fold;
      last_at = at;
      seq.push_back(std::move(atom));
    }
    if (seq.size() == 1) *out = Node(std::move(seq[0]));
    return Status::Ok();
  }

  // Reads {n}, {n,}, {,m} or {n,m} at i_ without consuming it; false when the text there is
  // not an interval (Oniguruma then reads '{' as a literal).
  bool PeekInterval(int* min, int* max, size_t* length, bool* too_large,
                    bool* exact = nullptr) const {
    size_t j = i_ + 1;
    auto number = [&](int* value) {
      const size_t start = j;
      int64_t v = 0;
      while (j < p_.size() && IsDigit(p_[j])) {
        v = std::min<int64_t>(v * 10 + (p_[j] - '0'), int64_t{1} << 40);
        ++j;
      }
      if (v > kMaxRepeat) *too_large = true;
      *value = static_cast<int>(std::min<int64_t>(v, kMaxRepeat + 1));
      return j > start;
    };
    *too_large = false;
    int lo = 0, hi = 0;
    const bool has_lo = number(&lo);
    if (exact != nullptr) *exact = false;
    if (j < p_.size() && p_[j] == '}') {
      if (!has_lo) return false;
      *min = *max = lo;
      if (exact != nullptr) *exact = true;
    } else if (j < p_.size() && p_[j] == ',') {
      ++j;
      const bool has_hi = number(&hi);
      if (!has_lo && !has_hi) return false;
      if (j >= p_.size() || p_[j] != '}') return false;
      *min = has_lo ? lo : 0;
      *max = has_hi ? hi : -1;
    } else {
      return false;
    }
    *length = j + 1 - i_;
    return true;
  }

  Status ParseQuantifiers(Node* atom, bool* quantified) {
    while (!AtEnd()) {
      const size_t at = i_;
      const char c = p_[i_];
      int min = 0, max = 0;
      size_t length = 1;
      bool interval = false, exact = false;
      if (c == '*') {
        min = 0, max = -1;
      } else if (c == '+') {
        min = 1, max = -1;
      } else if (c == '?') {
        min = 0, max = 1;
      } else if (c == '{') {
        bool too_large = false;
        if (!PeekInterval(&min, &max, &length, &too_large, &exact)) break;
        if (too_large) return Unsupported(at, "a repeat count above 1000");
        if (max >= 0 && min > max) {
          return Error(StatusCode::kInvalidArgument, at, "repeat range {n,m} with n > m");
        }
        interval = true;
      } else {
        break;
      }
      if (atom->kind == Node::Kind::kAssert || atom->kind == Node::Kind::kLook) {
        return Error(StatusCode::kInvalidArgument, at, "target of repeat operator is invalid");
      }
      i_ += length;
      bool greedy = true, possessive = false;
      // X{n}? is (X{n})? in Ruby syntax (read by the next turn); X{n,m}? is lazy.
      if (!exact && !AtEnd() && p_[i_] == '?') {
        greedy = false;
        ++i_;
      } else if (!interval && !AtEnd() && p_[i_] == '+') {
        // X*+ X++ X?+ are possessive; X{n,m}+ is (X{n,m})+ in Ruby syntax, read by the next turn.
        possessive = true;
        ++i_;
      }
      Node rep = Node::Of(Node::Kind::kRepeat);
      rep.min = min;
      rep.max = max;
      rep.greedy = greedy;
      RETURN_IF_ERROR(Wrap(&rep, atom->levels, at));
      rep.kids.push_back(std::move(*atom));
      if (possessive) {
        Node atomic = Node::Of(Node::Kind::kAtomic);
        atomic.levels = rep.levels;  // X*+ is one quantifier.
        atomic.kids.push_back(std::move(rep));
        *atom = std::move(atomic);
      } else {
        *atom = std::move(rep);
      }
      *quantified = true;
    }
    return Status::Ok();
  }

  // One atom at i_. For an inline flag group (?i) / (?-i), sets *inline_icase instead.
  Status ParseAtom(bool icase, int depth, Node* out, std::optional<bool>* inline_icase) {
    const size_t at = i_;
    const char c = p_[i_];
    switch (c) {
      case '(':
        return ParseGroup(icase, depth, out, inline_icase);
      case '[': {
        CharClass cls;
        RETURN_IF_ERROR(ParseClass(icase, &cls));
        *out = AddClass(std::move(cls));
        return Status::Ok();
      }
      case '.': {
        ++i_;
        CharClass cls;
        cls.set.Add('\n', '\n');
        cls.negated = true;
        *out = AddClass(std::move(cls));
        return Status::Ok();
      }
      case '^':
        ++i_;
        *out = Node::Of(Node::Kind::kAssert, static_cast<uint32_t>(AssertKind::kLineBegin));
        return Status::Ok();
      case '$':
        ++i_;
        *out = Node::Of(Node::Kind::kAssert, static_cast<uint32_t>(AssertKind::kLineEnd));
        return Status::Ok();
      case '*':
      case '+':
      case '?':
        return Error(StatusCode::kInvalidArgument, at,
                     "target of repeat operator is not specified");
      case '{': {
        int min, max;
        size_t length;
        bool too_large;
        if (PeekInterval(&min, &max, &length, &too_large)) {
          return Error(StatusCode::kInvalidArgument, at,
                       "target of repeat operator is not specified");
        }
        ++i_;
        *out = Node::Of(Node::Kind::kChar, '{');
        return Status::Ok();
      }
      case '\\': {
        Escape e;
        RETURN_IF_ERROR(ParseEscape(/*in_class=*/false, &e));
        if (e.type == Escape::Type::kAssert) {
          *out = Node::Of(Node::Kind::kAssert, static_cast<uint32_t>(e.assert));
          return Status::Ok();
        }
        if (e.type == Escape::Type::kSet) {
          // A bare \p{Lu} stays case-sensitive under (?i), as in Oniguruma.
          CharClass cls;
          cls.set = std::move(e.set);
          cls.negated = e.set_negated;
          *out = AddClass(std::move(cls));
          return Status::Ok();
        }
        return Literal(e.cp, icase, at, out);
      }
      default: {
        uint32_t cp;
        RETURN_IF_ERROR(ReadChar(&cp));
        return Literal(cp, icase, at, out);
      }
    }
  }

  Status Literal(uint32_t cp, bool icase, size_t at, Node* out) {
    *out = Node::Of(Node::Kind::kChar, cp);
    if (!icase) return Status::Ok();
    if (IsAsciiLetter(cp) || AsciiFoldOf(cp) != 0) {
      out->value = IsAsciiLetter(cp) ? (cp | 0x20) : AsciiFoldOf(cp);  // Lower case.
      out->fold = true;
    } else if (MayHaveCase(cp, cp)) {
      return Unsupported(at, "case-insensitive matching of " + CodePointName(cp));
    }
    return Status::Ok();
  }

  // Decodes the UTF-8 character at i_ and moves past it.
  Status ReadChar(uint32_t* cp) {
    const Utf8Char c = DecodeUtf8(p_, i_);
    if (c.cp == kInvalidCodePoint) {
      return Error(StatusCode::kInvalidArgument, i_, "ill-formed UTF-8 in the pattern");
    }
    *cp = c.cp;
    i_ += c.len;
    return Status::Ok();
  }

  Node AddClass(CharClass cls) {
    cls.Finish();
    classes_->push_back(std::move(cls));
    return Node::Of(Node::Kind::kClass, static_cast<uint32_t>(classes_->size() - 1));
  }

  Status ParseGroup(bool icase, int depth, Node* out, std::optional<bool>* inline_icase) {
    const size_t at = i_;
    ++i_;                                   // '('
    Node::Kind kind = Node::Kind::kConcat;  // A plain group: just its contents.
    bool negate = false;
    bool group_icase = icase;
    if (Next("?")) {
      ++i_;
      if (Next(":")) {
        ++i_;
      } else if (Next("=") || Next("!")) {
        kind = Node::Kind::kLook;
        negate = p_[i_] == '!';
        ++i_;
      } else if (Next(">")) {
        kind = Node::Kind::kAtomic;
        ++i_;
      } else if (Next("<=") || Next("<!")) {
        return Unsupported(at, "lookbehind (?<= / (?<!");
      } else if (Next("<") || Next("'")) {
        // A named group; names only matter for backreferences, which are not supported.
        const char close = p_[i_] == '<' ? '>' : '\'';
        const size_t end = p_.find(close, i_ + 1);
        if (end == std::string_view::npos || end == i_ + 1) {
          return Error(StatusCode::kInvalidArgument, at, "invalid group name");
        }
        i_ = end + 1;
      } else if (Next("#")) {
        const size_t end = p_.find(')', i_);
        if (end == std::string_view::npos) {
          return Error(StatusCode::kInvalidArgument, at, "end pattern in group");
        }
        i_ = end + 1;
        *out = Node::Of(Node::Kind::kEmpty);
        return Status::Ok();
      } else if (Next("~")) {
        return Unsupported(at, "the absent operator (?~");
      } else {
        // Option flags: (?i) (?-i) (?i:...) (?i-x:...); only i is implemented.
        if (Next(")")) return Error(StatusCode::kInvalidArgument, at, "empty group option (?)");
        bool on = true;
        while (!AtEnd() && p_[i_] != ':' && p_[i_] != ')') {
          const char f = p_[i_];
          if (f == '-') {
            on = false;
          } else if (f == 'i') {
            group_icase = on;
          } else if (IsAsciiLetter(static_cast<unsigned char>(f))) {
            return Unsupported(i_, std::string("the regex option '") + f + "'");
          } else {
            return Error(StatusCode::kInvalidArgument, at, "undefined group option");
          }
          ++i_;
        }
        if (AtEnd()) return Error(StatusCode::kInvalidArgument, at, "end pattern in group");
        if (p_[i_] == ')') {
          ++i_;
          *inline_icase = group_icase;
          return Status::Ok();
        }
        ++i_;  // ':'
      }
    }
    Node inner;
    RETURN_IF_ERROR(ParseAlternation(group_icase, depth + 1, &inner));
    if (AtEnd()) return Error(StatusCode::kInvalidArgument, at, "end pattern with unmatched (");
    ++i_;  // ')'
    const int inner_levels = inner.levels;
    if (kind == Node::Kind::kConcat) {
      *out = std::move(inner);
    } else {
      *out = Node::Of(kind);
      out->negate = negate;
      out->kids.push_back(std::move(inner));
    }
    return Wrap(out, inner_levels, at);
  }

  // A \p / \P property at i_ (after the letter).
  Status ParseProperty(size_t at, bool negated, Escape* e) {
    std::string name;
    if (Next("{")) {
      const size_t end = p_.find('}', i_);
      if (end == std::string_view::npos) {
        return Error(StatusCode::kInvalidArgument, at, "invalid character property name");
      }
      std::string_view raw = p_.substr(i_ + 1, end - i_ - 1);
      i_ = end + 1;
      if (!raw.empty() && raw[0] == '^') {
        negated = !negated;
        raw.remove_prefix(1);
      }
      for (char ch : raw) {
        if (ch == ' ' || ch == '_' || ch == '-') continue;
        name.push_back(ch >= 'A' && ch <= 'Z' ? static_cast<char>(ch + 32) : ch);
      }
    } else {
      // Ruby syntax reads \pL as the letters pL, not as a property.
      return Unsupported(at, "\"\\" + std::string(1, p_[at + 1]) + "\" without braces");
    }
    for (const PropertyName& p : kProperties) {
      if (p.name == name) {
        e->type = Escape::Type::kSet;
        e->set.categories = p.mask;
        e->set_negated = negated;
        e->property = p.mask;
        return Status::Ok();
      }
    }
    return Unsupported(at, "the character property \"" + std::string(p_.substr(at, i_ - at)) +
                               "\" (only general categories are)");
  }

  // Reads up to max_digits digits of `base` at i_ (at least one).
  Status ReadNumber(size_t at, int base, size_t max_digits, uint32_t* value) {
    uint64_t v = 0;
    size_t n = 0;
    while (n < max_digits && !AtEnd()) {
      const int d = HexValue(p_[i_]);
      if (d < 0 || d >= base) break;
      v = v * base + d;
      ++i_;
      ++n;
    }
    if (n == 0 || v > 0x10FFFF) {
      return Error(StatusCode::kInvalidArgument, at, "invalid code point value");
    }
    *value = static_cast<uint32_t>(v);
    return Status::Ok();
  }

  Status ParseEscape(bool in_class, Escape* e) {
    const size_t at = i_;
    ++i_;  // '\\'
    if (AtEnd()) return Error(StatusCode::kInvalidArgument, at, "end pattern at escape");
    const char c = p_[i_];
    const auto set = [&](CharSet s, bool negated) {
      ++i_;
      e->type = Escape::Type::kSet;
      e->set = std::move(s);
      e->set_negated = negated;
      return Status::Ok();
    };
    const auto chr = [&](uint32_t cp) {
      ++i_;
      e->type = Escape::Type::kChar;
      e->cp = cp;
      return Status::Ok();
    };
    const auto assertion = [&](AssertKind k) {
      if (in_class) {
        return Unsupported(at, "\"\\" + std::string(1, c) + "\" in a character class");
      }
      ++i_;
      e->type = Escape::Type::kAssert;
      e->assert = k;
      return Status::Ok();
    };
    e->type = Escape::Type::kChar;
    switch (c) {
      case 't':
        return chr('\t');
      case 'n':
        return chr('\n');
      case 'r':
        return chr('\r');
      case 'f':
        return chr('\f');
      case 'v':
        return chr('\v');
      case 'a':
        return chr('\a');
      case 'e':
        return chr(0x1B);
      case 's':
      case 'S':
        return set(SpaceSet(), c == 'S');
      case 'd':
      case 'D':
        return set(DigitSet(), c == 'D');
      case 'w':
      case 'W':
        return set(Word(), c == 'W');
      case 'h':
      case 'H':
        return set(HexDigitSet(), c == 'H');
      case 'p':
      case 'P':
        ++i_;
        return ParseProperty(at, c == 'P', e);
      case 'x':
        ++i_;
        if (Next("{")) {
          ++i_;
          RETURN_IF_ERROR(ReadNumber(at, 16, 8, &e->cp));
          if (!Next("}"))
            return Error(StatusCode::kInvalidArgument, at, "invalid code point value");
          ++i_;
          return Status::Ok();
        }
        return ReadNumber(at, 16, 2, &e->cp);
      case 'u':
        ++i_;
        for (size_t k = 0; k < 4; ++k) {
          if (i_ + k >= p_.size() || HexValue(p_[i_ + k]) < 0) {
            return Error(StatusCode::kInvalidArgument, at, "\\u needs four hex digits");
          }
        }
        return ReadNumber(at, 16, 4, &e->cp);
      case 'o':
        ++i_;
        if (!Next("{")) return Unsupported(at, "\"\\o\" without braces");
        ++i_;
        RETURN_IF_ERROR(ReadNumber(at, 8, 11, &e->cp));
        if (!Next("}")) return Error(StatusCode::kInvalidArgument, at, "invalid code point value");
        ++i_;
        return Status::Ok();
      case '0':
        ++i_;
        e->cp = 0;
        for (int n = 0; n < 2 && !AtEnd() && p_[i_] >= '0' && p_[i_] <= '7'; ++n, ++i_) {
          e->cp = e->cp * 8 + (p_[i_] - '0');
        }
        return Status::Ok();
      case 'b':
        if (in_class) return chr('\b');
        return assertion(AssertKind::kWordBoundary);
      case 'B':
        return assertion(AssertKind::kNotWordBoundary);
      case 'A':
        return assertion(AssertKind::kTextBegin);
      case 'z':
        return assertion(AssertKind::kTextEnd);
      case 'Z':
        return assertion(AssertKind::kTextEndNewline);
      default:
        break;
    }
    if (IsDigit(c)) return Unsupported(at, "the backreference \"\\" + std::string(1, c) + "\"");
    if (IsAsciiLetter(static_cast<unsigned char>(c))) {
      // \G \K \R \X \N \O \g \k \y \Y \c \C \M and unknown letters.
      return Unsupported(at, "the escape \"\\" + std::string(1, c) + "\"");
    }
    return ReadChar(&e->cp);  // Escaped punctuation or any other character stands for itself.
  }

  // A bracket class at i_ ('[').
  Status ParseClass(bool icase, CharClass* cls) {
    const size_t at = i_;
    ++i_;
    cls->fold = icase;
    if (Next("^")) {
      cls->negated = true;
      ++i_;
    }
    bool first = true;
    for (;; first = false) {
      if (AtEnd()) return Error(StatusCode::kInvalidArgument, at, "premature end of char-class");
      const size_t item_at = i_;
      const char c = p_[i_];
      if (c == ']' && !first) {
        ++i_;
        return Status::Ok();
      }
      if (c == '[') {
        return Unsupported(item_at,
                           Next("[:") ? "a POSIX bracket [:name:]" : "a nested character class");
      }
      if (Next("&&")) return Unsupported(item_at, "class intersection &&");
      Escape item;
      RETURN_IF_ERROR(ParseClassItem(&item));
      const bool range = Next("-") && i_ + 1 < p_.size() && p_[i_ + 1] != ']';
      if (item.type == Escape::Type::kSet) {
        if (range) return Unsupported(item_at, "a range starting at a class escape");
        if (icase && (item.property & kCasedLetters) != 0 &&
            (item.property & kLetters) != kLetters) {
          return Unsupported(item_at, "a cased-letter property in a case-insensitive class");
        }
        if (item.set_negated) {
          cls->complements.push_back(std::move(item.set));
        } else {
          cls->set.Add(item.set);
        }
        continue;
      }
      uint32_t last = item.cp;
      if (range) {
        ++i_;  // '-'
        const size_t end_at = i_;
        Escape end;
        RETURN_IF_ERROR(ParseClassItem(&end));
        if (end.type != Escape::Type::kChar) {
          return Unsupported(end_at, "a range ending at a class escape");
        }
        last = end.cp;
        if (last < item.cp) {
          return Error(StatusCode::kInvalidArgument, item_at, "empty range in char class");
        }
      }
      if (icase && item.cp == last && AsciiFoldOf(item.cp) != 0) {
        const uint32_t lower = AsciiFoldOf(item.cp);
        cls->set.Add(lower, lower);
        cls->set.Add(lower - 32, lower - 32);
      } else if (icase && MayHaveCase(item.cp, last)) {
        return Unsupported(item_at, "case-insensitive matching of " + CodePointName(item.cp) +
                                        (last != item.cp ? ".." + CodePointName(last) : ""));
      }
      cls->set.Add(item.cp, last);
    }
  }

  Status ParseClassItem(Escape* item) {
    if (p_[i_] == '\\') return ParseEscape(/*in_class=*/true, item);
    item->type = Escape::Type::kChar;
    return ReadChar(&item->cp);
  }

  std::string_view p_;
  size_t i_ = 0;
  std::vector<CharClass>* classes_;
};

// ---------------------------------------------------------------------------------------------
// Program: a backtracking machine's instructions.

enum class Op : uint8_t {
  kChar,        // arg: the code point.
  kCharFold,    // arg: a lower-case ASCII letter, matched in either case (and ſ for s, K for k).
  kClass,       // arg: the class index.
  kRun,         // arg: the index of a RunSpec: a quantifier over one character, as one instruction.
  kSplit,       // Try x; on failure y.
  kJmp,         // Go to x.
  kSaveReg,     // reg[arg] = position (undone on backtracking).
  kEmptyCheck,  // If reg[arg] == position (the loop body matched empty), go to x.
  kAssert,      // flag: an AssertKind.
  kLook,        // Lookahead: the sub-program at x must (flag 0) or must not (flag 1) match; then y.
  kAtomic,      // The sub-program at x, its first match only; then y.
  kSucceed,     // The end of the program or of a sub-program.
};

struct Inst {
  Op op;
  uint8_t flag = 0;
  uint32_t arg = 0;
  int32_t x = 0, y = 0;
};

// A quantifier over a single character or class (\s+, [a-z]*?, \p{N}{1,3}, a*+). It takes its
// whole run in one instruction and at most one backtracking frame, which gives back (or, lazy,
// takes) one character at a time, where a loop would push a frame per character.
struct RunSpec {
  Op what;                   // kChar, kCharFold or kClass, with
  uint32_t arg;              // that instruction's arg.
  int32_t min = 0, max = 0;  // max < 0 for no limit.
  bool greedy = true;
  bool possessive = false;  // X*+ X++ X?+ (greedy): never gives back.
  // Greedy, not possessive, and in no loop body with an empty check: then whether the rest of the
  // (sub-)program matches from a position depends on that position alone (loop registers are set
  // afresh before any check they meet), so the run may remember the ends from which the rest
  // failed and skip them when tried again from a later start.
  bool remember_failures = false;
};

}  // namespace

struct Regex::Program {
  std::vector<Inst> insts;
  std::vector<CharClass> classes;
  std::vector<RunSpec> runs;
  uint32_t num_regs = 0;
};

namespace {

class Compiler {
 public:
  explicit Compiler(Regex::Program* prog) : prog_(prog) {}

  Status Compile(const Node& root) {
    RETURN_IF_ERROR(Emit(root));
    return Push({Op::kSucceed});
  }

 private:
  int32_t Pc() const { return static_cast<int32_t>(prog_->insts.size()); }
  Inst& At(int32_t pc) { return prog_->insts[pc]; }
  Status Push(Inst inst) {
    if (prog_->insts.size() >= kMaxInsts) {
      return Unimplemented("a pattern this large (counted repetitions expand it) is not supported");
    }
    prog_->insts.push_back(inst);
    return Status::Ok();
  }

  static bool IsOneChar(const Node& n) {
    return n.kind == Node::Kind::kChar || n.kind == Node::Kind::kClass;
  }

  Status Emit(const Node& n) {
    switch (n.kind) {
      case Node::Kind::kEmpty:
        return Status::Ok();
      case Node::Kind::kChar:
        return Push({n.fold ? Op::kCharFold : Op::kChar, 0, n.value});
      case Node::Kind::kClass:
        return Push({Op::kClass, 0, n.value});
      case Node::Kind::kAssert:
        return Push({Op::kAssert, static_cast<uint8_t>(n.value)});
      case Node::Kind::kConcat:
        for (const Node& k : n.kids) RETURN_IF_ERROR(Emit(k));
        return Status::Ok();
      case Node::Kind::kAlt: {
        std::vector<int32_t> jumps;
        for (size_t i = 0; i + 1 < n.kids.size(); ++i) {
          const int32_t split = Pc();
          RETURN_IF_ERROR(Push({Op::kSplit, 0, 0, split + 1}));
          RETURN_IF_ERROR(Emit(n.kids[i]));
          jumps.push_back(Pc());
          RETURN_IF_ERROR(Push({Op::kJmp}));
          At(split).y = Pc();
        }
        RETURN_IF_ERROR(Emit(n.kids.back()));
        for (int32_t j : jumps) At(j).x = Pc();
        return Status::Ok();
      }
      case Node::Kind::kAtomic: {
        const Node& kid = n.kids[0];
        if (kid.kind == Node::Kind::kRepeat && kid.greedy && IsOneChar(kid.kids[0])) {
          return EmitRun(kid, /*possessive=*/true);
        }
        [[fallthrough]];
      }
      case Node::Kind::kLook: {
        const int32_t start = Pc();
        const Op op = n.kind == Node::Kind::kLook ? Op::kLook : Op::kAtomic;
        RETURN_IF_ERROR(Push({op, static_cast<uint8_t>(n.negate ? 1 : 0), 0, start + 1}));
        RETURN_IF_ERROR(Emit(n.kids[0]));
        RETURN_IF_ERROR(Push({Op::kSucceed}));
        At(start).y = Pc();
        return Status::Ok();
      }
      case Node::Kind::kRepeat:
        if (IsOneChar(n.kids[0])) return EmitRun(n, /*possessive=*/false);
        return EmitRepeat(n);
    }
    return Status::Ok();
  }

  Status EmitRun(const Node& n, bool possessive) {
    const Node& c = n.kids[0];
    RunSpec run;
    run.what = c.kind == Node::Kind::kClass ? Op::kClass : c.fold ? Op::kCharFold : Op::kChar;
    run.arg = c.value;
    run.min = n.min;
    run.max = n.max;
    run.greedy = n.greedy;
    run.possessive = possessive;
    run.remember_failures = n.greedy && !possessive && checked_loops_ == 0;
    RETURN_IF_ERROR(Push({Op::kRun, 0, static_cast<uint32_t>(prog_->runs.size())}));
    prog_->runs.push_back(run);
    return Status::Ok();
  }

  Status EmitRepeat(const Node& n) {
    const Node& body = n.kids[0];
    for (int i = 0; i < n.min; ++i) RETURN_IF_ERROR(Emit(body));
    if (n.max < 0) return EmitStar(body, n.greedy);
    // Nested optional copies: once one is skipped, no later one is tried.
    std::vector<int32_t> splits;
    for (int i = n.min; i < n.max; ++i) {
      splits.push_back(Pc());
      RETURN_IF_ERROR(Push({Op::kSplit}));
      RETURN_IF_ERROR(Emit(body));
    }
    for (int32_t s : splits) {
      At(s).x = n.greedy ? s + 1 : Pc();
      At(s).y = n.greedy ? Pc() : s + 1;
    }
    return Status::Ok();
  }

  Status EmitStar(const Node& body, bool greedy) {
    // A body that can match empty gets Oniguruma's empty check: an iteration that consumed
    // nothing ends the loop instead of repeating forever.
    const bool nullable = Nullable(body);
    const uint32_t reg = nullable ? prog_->num_regs++ : 0;
    const int32_t loop = Pc();
    RETURN_IF_ERROR(Push({Op::kSplit}));
    if (nullable) RETURN_IF_ERROR(Push({Op::kSaveReg, 0, reg}));
    checked_loops_ += nullable ? 1 : 0;
    const Status body_status = Emit(body);
    checked_loops_ -= nullable ? 1 : 0;
    RETURN_IF_ERROR(body_status);
    int32_t check = -1;
    if (nullable) {
      check = Pc();
      RETURN_IF_ERROR(Push({Op::kEmptyCheck, 0, reg}));
    }
    RETURN_IF_ERROR(Push({Op::kJmp, 0, 0, loop}));
    const int32_t end = Pc();
    At(loop).x = greedy ? loop + 1 : end;
    At(loop).y = greedy ? end : loop + 1;
    if (check >= 0) At(check).x = end;
    return Status::Ok();
  }

  Regex::Program* prog_;
  int checked_loops_ = 0;  // Loops with an empty check around what is being emitted.
};

// What a search or a run of the machine came to, besides a match's end (>= 0).
constexpr int64_t kNoMatch = -1;
constexpr int64_t kOutOfSteps = -2;  // The budget's steps are spent.
constexpr int64_t kOutOfStack = -3;  // It would need more than RegexBudget::kMaxFrames frames.

bool GaveUp(int64_t result) { return result == kOutOfSteps || result == kOutOfStack; }

// The state of the searches of one call: the backtracking stack, the loop registers, what the runs
// learnt in the current window, over one input; steps come from the caller's budget.
class Matcher {
 public:
  Matcher(const Regex::Program& prog, const RegexInput& in, RegexBudget* budget)
      : prog_(prog),
        in_(in),
        budget_(budget),
        regs_(prog.num_regs, std::numeric_limits<size_t>::max()),
        memos_(prog.runs.size()) {}

  // Starts on `window`; the buffers are kept from window to window, what the runs learnt is not.
  void Start(CharSpan window) {
    window_ = window;
    ++generation_;
  }

  // The leftmost match starting at or after `from`: {begin, end}, or {kNoMatch, 0},
  // {kOutOfSteps, 0} or {kOutOfStack, 0}.
  std::pair<int64_t, int64_t> Search(size_t from) {
    steps_left_ = budget_->steps_left;
    std::pair<int64_t, int64_t> result = {kNoMatch, 0};
    for (size_t start = from; start <= window_.end; ++start) {
      const int64_t end = Run(0, start);
      if (GaveUp(end)) {
        result = {end, 0};
        break;
      }
      if (end >= 0) {
        result = {static_cast<int64_t>(start), end};
        break;
      }
    }
    budget_->steps_left = steps_left_;
    budget_->peak_frames = std::max(budget_->peak_frames, peak_frames_);
    return result;
  }

 private:
  struct Frame {
    enum Kind : uint8_t {
      kBranch,     // Resume at pc, pos.
      kRestore,    // Set register aux back to pos.
      kGreedyRun,  // The run at pc ended at pos gives back a character (not below aux).
      kLazyRun,    // The run at pc (which started at aux) ended at pos takes another character.
    };
    size_t pos;
    size_t aux;
    int32_t pc;
    Kind kind;
  };

  // What a run instruction learnt in the current window (generation): the characters of
  // [match_from, match_end) all match it and the one at match_end does not (or is the window's
  // end); the rest of the program after it fails from every position in [fail_lo, fail_hi].
  struct RunMemo {
    uint64_t generation = 0;
    size_t match_from = 1, match_end = 0;  // Empty.
    size_t fail_lo = 1, fail_hi = 0;       // Empty.
  };

  bool IsWord(size_t i) const { return Word().Contains(in_.cp(i), in_.category(i)); }

  // Whether the character at pos (< window end) matches kChar, kCharFold or kClass `arg`.
  bool CharMatches(Op op, uint32_t arg, size_t pos) const {
    const uint32_t cp = in_.cp(pos);
    switch (op) {
      case Op::kChar:
        return cp == arg;
      case Op::kCharFold:
        return ((cp | 0x20) == arg && IsAsciiLetter(cp)) || (arg == 's' && cp == 0x17F) ||
               (arg == 'k' && cp == 0x212A);
      default:
        return prog_.classes[arg].Matches(cp, in_.category(pos));
    }
  }

  bool Check(AssertKind kind, size_t pos) const {
    const size_t b = window_.begin, e = window_.end;
    switch (kind) {
      case AssertKind::kLineBegin:  // Not at the very end, even after a newline.
        return pos == b || (pos < e && in_.cp(pos - 1) == '\n');
      case AssertKind::kLineEnd:
        return pos == e || in_.cp(pos) == '\n';
      case AssertKind::kTextBegin:
        return pos == b;
      case AssertKind::kTextEnd:
        return pos == e;
      case AssertKind::kTextEndNewline:
        return pos == e || (pos + 1 == e && in_.cp(pos) == '\n');
      case AssertKind::kWordBoundary:
      case AssertKind::kNotWordBoundary: {
        const bool before = pos > b && IsWord(pos - 1);
        const bool after = pos < e && IsWord(pos);
        return (before != after) == (kind == AssertKind::kWordBoundary);
      }
    }
    return false;
  }

  bool Push(Frame f) {
    if (stack_.size() >= RegexBudget::kMaxFrames) return false;
    stack_.push_back(f);
    peak_frames_ = std::max(peak_frames_, stack_.size());
    return true;
  }

  RunMemo& Memo(uint32_t run) {
    RunMemo& m = memos_[run];
    if (m.generation != generation_) m = RunMemo{generation_};
    return m;
  }

  // How far the run's characters match from pos, up to limit; one step per character read.
  size_t RunEnd(const RunSpec& run, RunMemo& memo, size_t pos, size_t limit) {
    if (memo.match_from <= pos && pos <= memo.match_end) return std::min(memo.match_end, limit);
    size_t end = pos;
    while (end < limit && CharMatches(run.what, run.arg, end)) ++end;
    steps_left_ -= std::min<uint64_t>(steps_left_, end - pos);
    if (end < limit || end == window_.end) {  // Where the characters stop matching.
      memo.match_from = pos;
      memo.match_end = end;
    }
    return end;
  }

  // Notes that the rest of the program failed from `end`.
  static void NoteFailure(RunMemo& memo, size_t end) {
    if (memo.fail_lo <= end && end <= memo.fail_hi) return;
    if (end + 1 == memo.fail_lo) {
      memo.fail_lo = end;
    } else if (end == memo.fail_hi + 1 && memo.fail_lo <= memo.fail_hi) {
      memo.fail_hi = end;
    } else {
      memo.fail_lo = memo.fail_hi = end;
    }
  }

  // Starts the run of instruction pc at *pos: moves *pos to its first end and pushes the frame
  // that tries the others. kNoMatch, kOutOfStack, or 0.
  int64_t StartRun(int32_t pc, size_t* pos) {
    const uint32_t index = prog_.insts[pc].arg;
    const RunSpec& run = prog_.runs[index];
    RunMemo& memo = Memo(index);
    const size_t start = *pos;
    const size_t room = window_.end - start;
    const size_t low = start + static_cast<size_t>(run.min);
    if (static_cast<size_t>(run.min) > room) return kNoMatch;
    if (!run.greedy) {
      if (RunEnd(run, memo, start, low) < low) return kNoMatch;
      const bool more = run.max < 0 || run.max > run.min;
      if (more && low < window_.end && !Push({low, start, pc, Frame::kLazyRun})) {
        return kOutOfStack;
      }
      *pos = low;
      return 0;
    }
    const size_t limit = run.max < 0 ? window_.end : start + std::min<size_t>(run.max, room);
    size_t end = RunEnd(run, memo, start, limit);
    if (end < low) return kNoMatch;
    if (run.remember_failures && memo.fail_lo <= end && end <= memo.fail_hi) {
      if (memo.fail_lo <= low) return kNoMatch;
      end = memo.fail_lo - 1;
    }
    if (!run.possessive && end > low && !Push({end, low, pc, Frame::kGreedyRun})) {
      return kOutOfStack;
    }
    *pos = end;
    return 0;
  }

  // Resumes the run frame on top of the stack after the rest failed from its end: the next end to
  // try, or nullopt (the frame is popped) when there is none.
  std::optional<size_t> ResumeRun() {
    Frame& f = stack_.back();
    const uint32_t index = prog_.insts[f.pc].arg;
    const RunSpec& run = prog_.runs[index];
    size_t end = f.pos;
    bool last = false;
    if (f.kind == Frame::kGreedyRun) {
      if (run.remember_failures) {
        RunMemo& memo = Memo(index);
        NoteFailure(memo, end);
        end = memo.fail_lo;  // Every end from there to f.pos failed.
      }
      if (end <= f.aux) {
        stack_.pop_back();
        return std::nullopt;
      }
      --end;
      last = end == f.aux;
    } else {
      const bool room = run.max < 0 || end - f.aux < static_cast<size_t>(run.max);
      if (!room || end >= window_.end || !CharMatches(run.what, run.arg, end)) {
        stack_.pop_back();
        return std::nullopt;
      }
      ++end;
      last = end >= window_.end || (run.max >= 0 && end - f.aux >= static_cast<size_t>(run.max));
    }
    if (last) {
      stack_.pop_back();
    } else {
      f.pos = end;
    }
    return end;
  }

  // Runs the (sub-)program from pc at pos: the end of its first match, kNoMatch, kOutOfSteps or
  // kOutOfStack. Leaves the stack as it found it. Recurses only into lookaheads and atomic groups,
  // so no deeper than the pattern's nesting (kMaxNesting).
  int64_t Run(int32_t pc, size_t pos) {
    const size_t base = stack_.size();
    const Inst* insts = prog_.insts.data();
    const auto give_up = [&](int64_t why) {
      stack_.resize(base);
      return why;
    };
    for (;;) {
      if (steps_left_ == 0) return give_up(kOutOfSteps);
      --steps_left_;
      const Inst& inst = insts[pc];
      bool ok = true;
      switch (inst.op) {
        case Op::kChar:
        case Op::kCharFold:
        case Op::kClass:
          ok = pos < window_.end && CharMatches(inst.op, inst.arg, pos);
          ++pos, ++pc;
          break;
        case Op::kRun: {
          const int64_t started = StartRun(pc, &pos);
          if (started == kOutOfStack) return give_up(kOutOfStack);
          ok = started == 0;
          ++pc;
          break;
        }
        case Op::kSplit:
          if (!Push({pos, 0, inst.y, Frame::kBranch})) return give_up(kOutOfStack);
          pc = inst.x;
          break;
        case Op::kJmp:
          pc = inst.x;
          break;
        case Op::kSaveReg:
          if (!Push({regs_[inst.arg], inst.arg, 0, Frame::kRestore})) return give_up(kOutOfStack);
          regs_[inst.arg] = pos;
          ++pc;
          break;
        case Op::kEmptyCheck:
          pc = regs_[inst.arg] == pos ? inst.x : pc + 1;
          break;
        case Op::kAssert:
          ok = Check(static_cast<AssertKind>(inst.flag), pos);
          ++pc;
          break;
        case Op::kLook:
        case Op::kAtomic: {
          const int64_t end = Run(inst.x, pos);
          if (GaveUp(end)) return give_up(end);
          if (inst.op == Op::kLook) {
            ok = (end >= 0) != (inst.flag != 0);
          } else {
            ok = end >= 0;
            if (ok) pos = static_cast<size_t>(end);
          }
          pc = inst.y;
          break;
        }
        case Op::kSucceed:
          // Alternatives left inside a lookahead or atomic group are dropped. Registers they set
          // belong to loops inside the group, which save them afresh before any later check.
          stack_.resize(base);
          return static_cast<int64_t>(pos);
      }
      while (!ok) {
        if (stack_.size() == base) return kNoMatch;
        const Frame f = stack_.back();
        switch (f.kind) {
          case Frame::kBranch:
            stack_.pop_back();
            pc = f.pc;
            pos = f.pos;
            ok = true;
            break;
          case Frame::kRestore:
            stack_.pop_back();
            regs_[f.aux] = f.pos;
            break;
          case Frame::kGreedyRun:
          case Frame::kLazyRun:
            if (const std::optional<size_t> end = ResumeRun()) {
              pc = f.pc + 1;
              pos = *end;
              ok = true;
            }
            break;
        }
      }
    }
  }

  const Regex::Program& prog_;
  const RegexInput& in_;
  RegexBudget* budget_;
  CharSpan window_;
  uint64_t generation_ = 0;
  uint64_t steps_left_ = 0;  // The budget's, while a search runs.
  size_t peak_frames_ = 0;
  std::vector<Frame> stack_;
  std::vector<size_t> regs_;
  std::vector<RunMemo> memos_;  // By run index.
};

// Calls on_match(begin, end) for each match HF's Split walks in the matcher's window (see
// Regex::FindAll): kNoMatch when the walk is complete, else kOutOfSteps or kOutOfStack.
template <typename OnMatch>
int64_t WalkMatches(Matcher& m, CharSpan window, OnMatch on_match) {
  m.Start(window);
  size_t search_from = window.begin;
  std::optional<size_t> last_match_end;
  while (search_from <= window.end) {
    const auto [begin, end] = m.Search(search_from);
    if (GaveUp(begin)) return begin;
    if (begin == kNoMatch) break;
    const size_t b = static_cast<size_t>(begin), e = static_cast<size_t>(end);
    if (b == e && last_match_end == e) {
      ++search_from;
      continue;
    }
    on_match(b, e);
    search_from = e;
    last_match_end = e;
  }
  return kNoMatch;
}

// Regex::SplitIsolated with a matcher that may be reused; returns as WalkMatches.
int64_t SplitWindow(Matcher& m, CharSpan window, std::vector<CharSpan>* out) {
  size_t piece_begin = window.begin;  // Of the text not yet cut off.
  const int64_t result = WalkMatches(m, window, [&](size_t b, size_t e) {
    if (piece_begin < b) out->push_back({piece_begin, b});
    if (b < e) out->push_back({b, e});
    piece_begin = e;
  });
  if (piece_begin < window.end) out->push_back({piece_begin, window.end});
  return result;
}

Status GaveUpError(const std::string& pattern, int64_t why, CharSpan window) {
  constexpr size_t kShown = 80;  // Of the pattern, which may be long.
  const std::string shown = pattern.size() <= kShown ? pattern : pattern.substr(0, kShown) + "...";
  const std::string where = " in a window of " + std::to_string(window.end - window.begin) +
                            " characters at character " + std::to_string(window.begin);
  if (why == kOutOfStack) {
    return ResourceExhausted("regex \"" + shown + "\" needs more than " +
                             std::to_string(RegexBudget::kMaxFrames) + " backtracking frames" +
                             where);
  }
  return ResourceExhausted("regex \"" + shown + "\" used up the text's budget of backtracking " +
                           "steps (" + std::to_string(RegexBudget::kBaseSteps) + " + " +
                           std::to_string(RegexBudget::kStepsPerChar) + " per character)" + where);
}

// `budget`, or `own` set up for `chars` characters.
RegexBudget* BudgetOr(RegexBudget* budget, RegexBudget* own, size_t chars) {
  if (budget != nullptr) return budget;
  *own = RegexBudget::ForChars(chars);
  return own;
}

}  // namespace

StatusOr<Regex> Regex::Compile(std::string_view pattern) {
  auto prog = std::make_shared<Program>();
  Parser parser(pattern, &prog->classes);
  ASSIGN_OR_RETURN(Node root, parser.Parse());
  RETURN_IF_ERROR(Compiler(prog.get()).Compile(root));
  Regex re;
  re.pattern_ = std::string(pattern);
  re.program_ = std::move(prog);
  return re;
}

StatusOr<std::optional<CharSpan>> Regex::Search(const RegexInput& in, CharSpan window, size_t from,
                                                RegexBudget* budget) const {
  RegexBudget own;
  Matcher m(*program_, in, BudgetOr(budget, &own, window.end - window.begin));
  m.Start(window);
  const auto [begin, end] = m.Search(from);
  if (GaveUp(begin)) return GaveUpError(pattern_, begin, window);
  if (begin == kNoMatch) return std::optional<CharSpan>();
  return std::optional<CharSpan>(CharSpan{static_cast<size_t>(begin), static_cast<size_t>(end)});
}

Status Regex::FindAll(const RegexInput& in, CharSpan window, std::vector<CharSpan>* out,
                      RegexBudget* budget) const {
  RegexBudget own;
  Matcher m(*program_, in, BudgetOr(budget, &own, window.end - window.begin));
  const int64_t result = WalkMatches(m, window, [&](size_t b, size_t e) {
    out->push_back({b, e});
  });
  if (GaveUp(result)) return GaveUpError(pattern_, result, window);
  return Status::Ok();
}

Status Regex::SplitIsolated(const RegexInput& in, CharSpan window, std::vector<CharSpan>* out,
                            RegexBudget* budget) const {
  return SplitEach(in, {window}, out, budget);
}

Status Regex::SplitEach(const RegexInput& in, const std::vector<CharSpan>& windows,
                        std::vector<CharSpan>* out, RegexBudget* budget) const {
  size_t chars = 0;
  for (const CharSpan& w : windows) chars += w.end - w.begin;
  RegexBudget own;
  Matcher m(*program_, in, BudgetOr(budget, &own, chars));
  Status status;
  for (const CharSpan& w : windows) {
    const int64_t result = SplitWindow(m, w, out);
    if (GaveUp(result) && status.ok()) status = GaveUpError(pattern_, result, w);
  }
  return status;
}

}  // namespace helix
