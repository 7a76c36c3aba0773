#!/usr/bin/env python3
"""Makes the regex and DeepSeek pre-tokenizer test data from Hugging Face tokenizers' outputs.

Needs `pip install tokenizers` (0.23.3 made the committed files): HF's Rust tokenizers, whose Split
runs Oniguruma, is the independent reference. It is not a project dependency: the C++ tests read
the files written here. Run from this folder:
  python3 make_deepseek_cases.py [--check-unicode]
It writes
  tiny_deepseek_v3/tokenizer.json, tokenizer_config.json: a byte-level BPE trained here on CORPUS,
      with DeepSeek V3's pre_tokenizer, special tokens and BOS template;
  tiny_deepseek_llm/tokenizer.json: the same model with DeepSeek LLM's pre_tokenizer;
  deepseek_cases.json: per text, HF's pre-tokenizer chunks and encode() ids under each
      pre-tokenizer in PRE_TOKENIZERS;
  regex_cases.json: per (pattern, text) of REGEX_CASES, HF's Split(Isolated) pieces, each marked
      as a match or not.
--check-unicode also checks that Oniguruma's general categories, \\s, \\d and \\w agree with this
Python's unicodedata (the source of unicode_tables.cc) on every code point that it assigns.
"""
import json
import os
import random
import sys
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

HERE = os.path.dirname(os.path.abspath(__file__))

# DeepSeek V3's pre_tokenizer Splits, as its tokenizer.json holds them (after JSON unescaping).
DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^""" "\r\n" r"""\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
    r""" ?[\p{P}\p{S}]+[""" "\r\n" r"""]*|\s*[""" "\r\n" r"""]+|\s+(?!\S)|\s+""",
]

# DeepSeek LLM's cased-letter ranges (the second Split), as code points.
LLM_LETTERS = [
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA),
    (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x376),
    (0x377, 0x377), (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A),
    (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F),
    (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15),
    (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59),
    (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC),
    (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107),
    (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126),
    (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F),
    (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2183), (0x2184, 0x2184), (0x2C00, 0x2C7B),
    (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF2), (0x2CF3, 0x2CF3), (0xA640, 0xA66D),
    (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2),
    (0x118A0, 0x118DF), (0x1E900, 0x1E943),
]
LLM_CLASS = "".join(chr(a) if a == b else chr(a) + "-" + chr(b) for a, b in LLM_LETTERS)
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# DeepSeek LLM's Splits as llama.cpp runs them for the GGUF name deepseek-llm. deepseek-llm-7b's
# tokenizer.json is said to have Digits(individual_digits) in place of the last one:
# tiny_deepseek_llm is made that way (deepseek_llm_json), and both forms are checked.
DEEPSEEK_LLM = [
    "[\r\n]",
    r"\s?[" + LLM_CLASS + "]+",
    r"\s?[!-/:-~" "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002" "]+",
    r"\s+$",
    DEEPSEEK_CJK,
    r"\p{N}+",
]
DEEPSEEK_CODER = ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"]

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def splits(patterns):
    return [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]


# name -> the pre-tokenizer steps before ByteLevel (which maps bytes and splits no further).
PRE_TOKENIZERS = {
    "deepseek_v3": splits(DEEPSEEK_V3),
    "deepseek_llm_json": splits(DEEPSEEK_LLM[:-1]) + [pre_tokenizers.Digits(individual_digits=True)],
    "deepseek_llm_gguf": splits(DEEPSEEK_LLM),
    "deepseek_coder_gguf": splits(DEEPSEEK_CODER),
    "gpt2": splits([GPT2]),
    "llama3": splits([LLAMA3]),
    "qwen2": splits([QWEN2]),
    "smollm": [pre_tokenizers.Digits(individual_digits=True)] + splits([GPT2]),
}

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps in the sun!
DeepSeek-V3 is a Mixture-of-Experts model with 671B parameters, 37B of them active per token.
Numbers: 1234567, 3.14159, 2024-12-26, $1,000,000 and 42%; call 555-0199 (ext. 12).
def encode(text: str) -> list[int]:
    return [ord(c) for c in text if c.isalnum()]  # comments too
if (x != y && !flag) { printf("%d\\n", x); } else { return -1; }
<html><body class="main">Hello, world!</body></html>
They're going; we've seen it, and I'll see it again. Don't stop!!! Really?!
Les élèves étudient à l'école, où ils apprennent le français. Ça va?
Der schnelle braune Fuchs springt über den faulen Hund. Größe: 5 µm.
深度求索发布了新的语言模型。我们今天学习中文和日本語のテキスト。
東京は日本の首都です。カタカナとひらがなを混ぜて書きます。ラーメンが好き！
한국어 문장도 조금 있습니다. 안녕하세요, 만나서 반갑습니다.
Привет, как дела? Всё хорошо, спасибо. Ελληνικά: καλημέρα κόσμε.
مرحبا بالعالم، هذه جملة عربية. שלום עולם. नमस्ते दुनिया, यह हिंदी है।
Emoji: 😀 👍🏽 🎉 ❤️ — symbols € © ® ™ ± × ÷ → ∑ ∞ ≈ ≠ ≤ °C.
Combining: e\u0301 a\u0308 n\u0303; café naïve São Paulo Ångström.
\tTabs\tand  double  spaces   and trailing spaces   
CRLF line\r\nnext line\r\n\r\nblank line above
"""

BASE_TEXTS = [
    "", " ", "  ", "\n", "\r\n", "\t", "a", "!", "!!", "!abc", "!abc!def", "?Hello", "@user", "#tag",
    "a!b", "hello world", "Hello, World!", "  leading", "trailing   ", "x  \n y", "\t\tfoo",
    "a\n\nb", "a\r\nb\r\n\r\nc", "line\r", "\r\r\n\n", "   \n\n   ", " \u3000 x",
    "1", "12", "123", "1234", "1234567", "12,345.67", "v1.2.3", "a1b22c333d4444", "3.14e-10",
    "٣٤٥٦ ١٢", "²³ ½ Ⅻ ①②", "０１２３４",
    "一", "一二三四五", "深度求索", "日本語のテキスト", "ひらがな", "カタカナー", "ｶﾀｶﾅ",
    "漢字とかな混じり文です。", "한국어 텍스트", "안녕하세요!", "中文，标点！「引号」",
    "e\u0301", "cafe\u0301", " \u0301x", "\u0301\u0302", "a\u0308\u0301b", "क्षत्रिय", "हिंदी।",
    "ภาษาไทย", "مرحبا بالعالم", "العربية، نص.", "שלום", "Ελληνικά", "Привет, мир!",
    "😀", "😀😀 🎉", "👍🏽", "👨‍👩‍👧", "❤️", "€100", "©2024 ®", "±×÷", "→ ∑ ∞", "°C", "£$¥",
    "def f(x):\n    return x**2  # square\n", "if (a && b) { c++; }", "x=3.14159; y=-2e10",
    "<html><b>bold</b></html>", "path/to/file.txt", "https://example.com/a?b=c&d=e",
    "user@example.com", "snake_case_name", "CamelCaseName", "kebab-case-name", "--flag=value",
    "...", "?!?!", "!!!abc", "[abc]", "(abc)", "{abc}", "'quoted'", "\"double\"", "`code`",
    "it's", "IT'S", "don't", "we've", "I'll", "they'RE", "'s", "ſ's", "'ſ", "K'K",
    "mixed English 中文 日本語 한국어 123 !?", "tab\tsep\tvalues\n", "a\u00a0b", "a\u2028b",
    "\u200b\u200c\u200d", "\ufeffBOM", "\x00nul\x01", "\x7fdel", "\ue000private", "\U0010ffff",
    "\ufffd", "\uffff", "\u0378", "\x1c\x1d", "ﬁ ﬂ ß ẞ", "Ⓐⓑ", "µm", "K Ω Å",
    "<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>", "<｜User｜>question<｜Assistant｜>answer",
    "Ǆǅǆ ǈ", "ΐΰ ᾼ", "𐐀𐐨", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ℌℑℜ", "\u3040\u309f\u30a0\u30ff",
]

RANDOM_POOL = ["a", "Z", "q", " ", " ", "  ", "\n", "\r\n", "\r", "\t", "0", "7", "42", "'s", "'T",
               ".", ",", "!", "?", "-", "_", "/", "\"", "(", ")", "é", "ß", "Ω", "ж", "日", "本",
               "一", "あ", "ア", "ー", "한", "ب", "क", "ि", "😀", "👍🏽", "²", "\u00a0", "\u3000",
               "\u0301", "€", "©", "、", "。", "！", "ｱ", "Ⅻ", "٣"]


def random_texts(n, seed=7):
    rng = random.Random(seed)
    return ["".join(rng.choice(RANDOM_POOL) for _ in range(rng.randint(1, 24))) for _ in range(n)]


TEXTS = BASE_TEXTS + random_texts(80)

# (pattern, text) pairs for the regex engine, each run through HF's Split(Isolated).
REGEX_CASES = [
    # Alternation order and backtracking.
    ("a|ab", "abab"), ("ab|a", "abab"), ("a*ab", "aaab"), ("(a|ab)(c|bcd)", "abcd xabc"),
    ("x(a|b)*y", "xababy xy xaby"), ("(ab|a)(bc|c)?d", "abcd acd abd"),
    # Quantifiers: counted, lazy, possessive, nested.
    (r"\p{N}{1,3}", "1234567 89 x0"), ("a{2}", "aaaaa"), ("a{2,}", "a aa aaa"), ("a{,2}", "aaa"),
    ("a{0}b", "ab"), ("a{2}?b", "aab b"), (r"\W{2}??", "a    "), ("a{1,3}+", "aaaaaaa"), ("a{2}{3}", "aaaaaaa"), ("a+?", "aaa"),
    ("a*?b", "aab"), ("a{2,3}?", "aaaaa"), ("a??b", "ab b"), ("a*+a", "aaa"), ("a++b", "aab ab"),
    ("a?+a", "aa a"), ("(?>a+)b", "aab"), ("(?>ab|a)c", "ac abc"), ("a**", "aaa b"),
    ("(a*)*b", "aab"), ("(a|)+c", "aac"), ("(?:a?)*x", "aax"), ("(?:a|b?)+", "abba c"),
    # Literal braces.
    ("a{2", "a{2 aa"), ("{", "a{b"), ("a{,}", "a{,}"), ("x{1,2", "x{1,2"), ("}", "}}"),
    # Lookahead and anchors.
    (r"\s+(?!\S)", "a   b  "), (r"\s+(?!\S)|\s+", "a   b \t c   "), ("a(?=b)", "ab ac"),
    ("a(?!b)", "ab ac a"), ("(?=a)", "bab"), (r"(?!\s)\w+", "foo bar"), ("^a", "a\na\r\na"),
    ("a$", "a\r\na\na"), (r"\s+$", "a  \n  b  "), (r"\s+$", "a  \r\n  b"), ("^", "ab"),
    ("$", "a\nb"), (r"\n^", "a\nb\n"), (r"\Aa", "aa\na"), (r"a\z", "a\na"), (r"a\Z", "a\na\n"), (r"\bx", "x ax _x éx 1x"),
    (r"\Bx", "x ax _x"), (r"\b", "ab cd"), (r"x\b", "x xy x."),
    # Classes.
    ("[a-c]+", "abcdcba"), ("[^a-c]+", "abxyzc"), ("[]a]+", "]a]b"), ("[a-]+", "a-b"),
    (r"[\]\\\-]+", "a]\\-b"), ("[--/]+", "a-./b"), ("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                                                     "日本語のテキスト、한국어ー"),
    (r"[\x{4e00}-\x{9fa5}]+", "一龥a"), (r"[\s\S]+", "a b\n"), (r"[\S]+", "ab cd"),
    (r"[^\s\p{L}]+", "ab 12!? \u00e9"), (r"[\p{L}\p{M}]+", "e\u0301a b"), (r"[\w]+", "a_b c"),
    (r"[^\W\d]+", "ab12cd_"), (r"[\D]+", "ab12"), (r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+",
                                                   " abc !def 1ghi"),
    (r"[\p{P}\p{S}]+", "a!?€©b"), ("[!-/:-@]+", "a!/:@b"), ("[😀-😂]+", "x😀😁y"),
    # Escapes.
    (r"\t+", "a\t\tb"), (r"\x41", "BAB"), (r"\x{263A}", "a☺b"), (r"\u263A", "a☺b"),
    (r"\0", "a\x00b"), (r"\.\-\/", "a.-/b"), (r"\e", "a\x1bb"), (r"\v", "a\x0bb"), (r"\f", "a\x0cb"),
    (r"\o{101}", "A"),
    # Properties, \s \d \w \h and dot.
    (r"\p{L}+", "abc 日本 é1"), (r"\p{Lu}+", "ABc DE"), (r"\p{Ll}+", "ABc de"), (r"\P{L}+", "ab12 c"),
    (r"\p{^L}+", "ab12"), (r"\p{Letter}+", "ab1"),
    (r"\p{ l }+", "ab1"), (r"\p{Mark}+", "e\u0301\u0302"), (r"\p{Combining_Mark}", "e\u0301"),
    (r"\p{LC}+", "aB\u01c5ª"), (r"\p{Any}", "a\u0378"), (r"\p{Cn}", "a\u0378b"),
    (r"\p{C}+", "\x01\u0378\ue000\u200b"), (r"\p{Co}", "\ue000"), (r"\p{Zs}+", " \u3000\u2028"),
    (r"\p{Z}+", " \u3000\u2028"), (r"\p{Sc}+", "$€¥a"), (r"\p{Pd}+", "a-–—b"),
    (r"\p{So}+", "©®😀a"), (r"\p{Sm}", "+<=>"), (r"\p{Nd}+", "12٣²"), (r"\p{Nl}+", "ⅫⅰA"),
    (r"\p{No}+", "½²③"), (r"\p{Lm}", "ʰˇ"), (r"\p{Lo}+", "日ªא"), (r"\p{Lt}", "ǅ"),
    (r"\p{Mc}", "\u0903"), (r"\p{Me}", "\u20dd"), (r"\p{Mn}", "\u0301"), (r"\p{Pc}+", "_‿"),
    (r"\p{Ps}\p{Pe}", "()[]"), (r"\p{Pi}\p{Pf}", "«»"), (r"\p{Po}+", "!?."), (r"\p{Sk}+", "^`"),
    (r"\p{Zl}\p{Zp}", "\u2028\u2029"), (r"\p{Cc}+", "\x01\x7f"), (r"\p{Cf}+", "\u200b\ufeff"),
    (r"\s+", "a\u00a0\u3000\u2028\x85b\x1c\x1d"), (r"\S+", "a\u00a0b"), (r"\d+", "12٣²"),
    (r"\D+", "ab12"), (r"\w+", "a_b\u0301c\u24b6 x\u00b2\u2160\u200c\u203f"), (r"\w+", "a\u20ddb\u0488 \u00bd\u2153"), (r"\W+", "a, b!"),
    (r"\h+", "deadBEEF xyz"), (r"\H+", "dead xyz"), (".+", "a\nb\rc\u2028d"), (".", "\r\n\x85"),
    # Case-insensitive groups and flags.
    ("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "'S 'T 'Re 'rE 'ſ 'LL 'D 'x"), ("(?i)ab|cd", "AB cd CD aB"),
    ("x(?i)ab|cd", "xAB CD cd xcD"), ("(?i:k)", "kK\u212a"), ("(?i)[a-z]+", "ABCſK\u212a"),
    ("(?i)[^a]+", "xAa"), ("(?-i:a)(?i)b", "aB AB ab"), ("(?i)[ſ]", "sSſ"),
    ("(?i:x)y", "XY xy Xy xY"), ("(?i)\\p{Lu}+", "ABcd"), ("(?i:s)", "sSſ"), ("(?i)[^s]", "sSſx"),
    ("(?i)\\x{212a}", "kK"), ("(?i:a(?-i:b)c)", "ABC AbC aBc"),
    # Empty matches.
    ("x*", "abx"), ("a|", "bab"), ("(?:)", "ab"), ("(?#comment)a", "ba"), ("(?<n>a)+", "baab"),
    ("(?'n'b)", "abc"), ("a?", "baac"),
    # Ill-formed-ish text.
    ("[^a]+", "\U0010ffff\ufffd\uffff\x00"), (r"\p{L}", "\U00020000𝔘"),
]


def check_unicode():
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(chr(c) for c in cps)
    assigned = {c for c in cps if unicodedata.category(chr(c)) != "Cn"}

    def matched(pattern):
        pieces = pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text)
        left = {ord(ch) for piece, _ in pieces for ch in piece}
        return {c for c in assigned if c not in left}

    def word(c):
        cat = unicodedata.category(chr(c))
        return (cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or c in (0xB2, 0xB3, 0xB9)
                or 0xBC <= c <= 0xBE or 0x24B6 <= c <= 0x24E9 or 0x1F130 <= c <= 0x1F149
                or 0x1F150 <= c <= 0x1F169 or 0x1F170 <= c <= 0x1F189)

    space = {0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000}
    space |= set(range(0x09, 0x0E)) | set(range(0x2000, 0x200B))
    checks = {r"\s": {c for c in assigned if c in space},
              r"\d": {c for c in assigned if unicodedata.category(chr(c)) == "Nd"},
              r"\w": {c for c in assigned if word(c)}}
    for cat in ["L", "M", "N", "P", "S", "Z", "C", "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me",
                "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So",
                "Zs", "Zl", "Zp", "Cc", "Cf", "Co"]:
        checks[r"\p{%s}" % cat] = {c for c in assigned
                                   if unicodedata.category(chr(c)).startswith(cat)}
    for pattern, want in checks.items():
        got = matched(pattern)
        diff = sorted(got ^ want)
        print("%-8s %7d code points, %d differ %s" % (
            pattern, len(want), len(diff), ["U+%04X" % c for c in diff[:8]]))


def byte_level(s):
    """GPT-2's bytes_to_unicode applied to the UTF-8 of s."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, n = {}, 0
    for b in range(256):
        if b in bs:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return "".join(table[b] for b in s.encode("utf-8"))


def make_tokenizer(steps):
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def train():
    tok = make_tokenizer(PRE_TOKENIZERS["deepseek_v3"])
    tok.train_from_iterator(CORPUS.split("\n") * 3, BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[BOS, EOS]))
    tok.add_tokens([AddedToken("<｜User｜>", special=False, normalized=False),
                    AddedToken("<｜Assistant｜>", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single=BOS + " $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def with_pre_tokenizer(tok, steps):
    other = Tokenizer.from_str(tok.to_str())
    other.pre_tokenizer = pre_tokenizers.Sequence(
        steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return other


def chunks(steps, text):
    return [piece for piece, _ in pre_tokenizers.Sequence(steps).pre_tokenize_str(text)]


def regex_cases():
    out = []
    for pattern, text in REGEX_CASES:
        isolated = pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)
        removed = pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text)
        unmatched = {offsets for _, offsets in removed}
        out.append({"pattern": pattern, "text": text,
                    "pieces": [[piece, offsets not in unmatched] for piece, offsets in isolated]})
    return out


def write_cases(path, cases):
    """{"cases": [...]} with one case a line (ASCII, \\u escapes for the rest)."""
    with open(path, "w") as f:
        f.write('{"generator": "make_deepseek_cases.py", "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=True, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")


def main():
    if "--check-unicode" in sys.argv:
        check_unicode()
    # Every case character must be one whose categories Python's tables (Unicode 14) and HF's
    # Oniguruma (16) agree on: assigned in 14, or unassigned in both.
    for text in TEXTS + [t for _, t in REGEX_CASES]:
        for ch in text:
            if unicodedata.category(ch) == "Cn":
                assert ord(ch) in (0x378, 0x3040, 0xFFFF, 0x10FFFF), "U+%04X is unassigned" % ord(ch)

    tok = train()
    v3_dir = os.path.join(HERE, "tiny_deepseek_v3")
    llm_dir = os.path.join(HERE, "tiny_deepseek_llm")
    os.makedirs(v3_dir, exist_ok=True)
    os.makedirs(llm_dir, exist_ok=True)
    tok.save(os.path.join(v3_dir, "tokenizer.json"), pretty=False)
    with open(os.path.join(v3_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "bos_token": BOS, "eos_token": EOS}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")
    with_pre_tokenizer(tok, PRE_TOKENIZERS["deepseek_llm_json"]).save(
        os.path.join(llm_dir, "tokenizer.json"), pretty=False)

    cases = []
    for text in TEXTS:
        case = {"text": text}
        for name, steps in PRE_TOKENIZERS.items():
            pieces = chunks(steps, text)
            assert "".join(pieces) == text
            full = [p for p, _ in with_pre_tokenizer(tok, steps).pre_tokenizer.pre_tokenize_str(text)]
            assert full == [byte_level(p) for p in pieces], (name, text)
            entry = {"chunks": pieces}
            if name.startswith("deepseek"):
                entry["ids"] = with_pre_tokenizer(tok, steps).encode(text).ids
            case[name] = entry
        cases.append(case)
    write_cases(os.path.join(HERE, "deepseek_cases.json"), cases)
    write_cases(os.path.join(HERE, "regex_cases.json"), regex_cases())
    print("%d texts, %d regex cases, vocab %d" % (len(TEXTS), len(REGEX_CASES),
                                                  tok.get_vocab_size()))


if __name__ == "__main__":
    main()
