#!/usr/bin/env python3
"""Makes the small reference vocabularies the tokenizer tests use, and prints expected ids.

Needs `pip install tokenizers sentencepiece` (Hugging Face's Rust tokenizers and Google's
SentencePiece: independent implementations that the expectations come from). Run from this folder:
  python3 make_tiny_vocabs.py
It writes tiny_llama3/tokenizer.json and tokenizer_config.json (a byte-level BPE with Llama 3's
pre-tokenizer, ignore_merges and a BOS template, trained on CORPUS below) and prints the
SentencePiece BPE vocabulary and ids that spm_tokenizer_test.cc embeds.
"""
import io
import json
import os

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
A tokenizer turns text into tokens, and tokens back into text.
They're going to the market; we've seen it before and I'll see it again.
Numbers like 12345 and 2024 appear in the text, as do 3.14 and 1,000,000.
The server streams tokens to the client while the model generates the answer.
Hello world! Hello there, hello again. The the the and and and.
Les élèves étudient à l'école, où ils apprennent le français.
Der schnelle braune Fuchs springt über den faulen Hund.
東京は日本の首都です。日本語のテキストを分割します。
Привет, как дела? Всё хорошо, спасибо.
def encode(text): return [token for token in text.split()]
    indented code lines
with tabs\tand\tnewlines

and blank lines between paragraphs.
"""
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_SAMPLES = ["Hello world!", "The quick brown fox.", "they'RE here, I'll go", "12345 and 3.14",
               "  two  spaces\n\nnew paragraph", "école à Tokyo 東京", "emoji 😀!",
               "<|begin_of_text|>hi<|eot_id|>", "call <tool> now", "tokenizers tokenize"]
SPM_SAMPLES = ["Hello world", "the dog sleeps", "tokens into text", "école 東京", "  two spaces",
               "x\ny", "42 ü", "a <s> b", "Москва"]


def make_bpe():
    lines = CORPUS.split("\n") * 3
    tok = Tokenizer(BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, BpeTrainer(
        vocab_size=380, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]))
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    os.makedirs("tiny_llama3", exist_ok=True)
    tok.save("tiny_llama3/tokenizer.json", pretty=False)
    with open("tiny_llama3/tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                   "chat_template": "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"},
                  f, indent=1)
        f.write("\n")
    print("byte-level BPE (encode with add_special_tokens=True):")
    for s in BPE_SAMPLES:
        print("  ", json.dumps(s), tok.encode(s).ids)


def make_spm():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([l for l in (CORPUS.split("\n") * 3) if l.isascii()]),
        model_writer=model, vocab_size=330, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, user_defined_symbols=["<tool>"],
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    first = 4 + 256  # <unk> <s> </s> <tool>, then <0x00>..<0xFF>
    print("SentencePiece: %d pieces; from id %d:" % (sp.get_piece_size(), first))
    print(json.dumps([[sp.id_to_piece(i), sp.get_score(i)]
                      for i in range(first, sp.get_piece_size())], ensure_ascii=False))
    for s in SPM_SAMPLES:
        print("  ", json.dumps(s, ensure_ascii=False), sp.encode(s))


if __name__ == "__main__":
    make_bpe()
    make_spm()
