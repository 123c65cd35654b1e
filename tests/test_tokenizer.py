"""Tests for models/llama/tokenizer.py: SentencePiece and llama2.c tokenizers, file errors."""

from __future__ import annotations

import pathlib
import random
import struct

import pytest
import sentencepiece as spm

from models.llama.tokenizer import (
    LLAMA2C_MIN_MERGE_SCORE, Llama2cTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer)

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
LLAMA2_MODEL = ASSETS / "tokenizers" / "llama2_tokenizer.model"
TOK512_BIN = ASSETS / "stories260K" / "tok512.bin"

STORY_SENTENCE = "Once upon a time, there was a little girl."
SENTENCES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, Apollo 11 landed on the Moon; pi is roughly 3.14159 (not 22/7).",
    "Multiple   spaces   between\twords, and a trailing space ",
    " A leading space, then   three.",
    "Newlines\nand\n\ndouble newlines.\n",
    "Non-ASCII: naïve café, Zürich, São Paulo — “curly quotes” and ‘apostrophes’.",
    "Symbols: @#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "Emoji and rare characters fall back to bytes: 🦙🔥 ꙮ.",
    "Tokyo is 東京 and Moscow is Москва.",
    "",
]
# Building blocks of random texts: words, digits, punctuation, runs of spaces, newlines, non-ASCII
# characters tok512.bin has (é) and lacks (ü), and one neither vocabulary has (the llama emoji).
RANDOM_TEXT_PARTS = [
    "the", "little", "girl", "dog", "Once", "upon", "time", "happy", "Tom", "said", "play",
    " ", " ", " ", "  ", "\n", ",", ".", "!", "?", "'", '"', "0", "7", "42", "é", "ü", "🦙",
    "x", "Q",
]


def _write_llama2c_bin(path: pathlib.Path, pieces: list[bytes], scores: list[float]) -> None:
  """Writes a llama2.c tokenizer file: int32 max length, then (float32, int32, bytes) per token."""
  with open(path, "wb") as f:
    f.write(struct.pack("<i", max(len(piece) for piece in pieces)))
    for piece, score in zip(pieces, scores):
      f.write(struct.pack("<fi", score, len(piece)))
      f.write(piece)


def _reference_llama2c_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
  """llama2.c's encode (no BOS/EOS) spelled out as its O(n^2) loop: the oracle for the heap."""
  id_of_piece = {}
  for token_id, piece in enumerate(pieces):
    id_of_piece.setdefault(piece, token_id)
  tokens = [id_of_piece[b" "]] if text else []
  for char in text:
    utf8 = char.encode("utf-8")
    tokens += [id_of_piece[utf8]] if utf8 in id_of_piece else [3 + byte for byte in utf8]
  while True:
    best_score, best_index, best_id = LLAMA2C_MIN_MERGE_SCORE, None, None
    for index in range(len(tokens) - 1):
      merged_id = id_of_piece.get(pieces[tokens[index]] + pieces[tokens[index + 1]])
      if merged_id is not None and scores[merged_id] > best_score:
        best_score, best_index, best_id = scores[merged_id], index, merged_id
    if best_index is None:
      return tokens
    tokens[best_index:best_index + 2] = [best_id]


def _random_texts(seed: int, count: int, parts: int) -> list[str]:
  rng = random.Random(seed)
  return ["".join(rng.choices(RANDOM_TEXT_PARTS, k=parts)) for _ in range(count)]


@pytest.fixture(scope="module")
def llama2_processor() -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


@pytest.fixture(scope="module")
def exported_llama2_bin(tmp_path_factory, llama2_processor) -> pathlib.Path:
  """The real LLaMA-2 SentencePiece model exported to llama2.c's format, as llama2.c exports it.

  Every piece with "▁" turned into " ", its SentencePiece score, BOS/EOS pieces as "\\n<s>\\n" and
  "\\n</s>\\n".
  """
  sp = llama2_processor
  special = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}
  pieces = [
      special.get(i, sp.id_to_piece(i)).replace("▁", " ").encode("utf-8")
      for i in range(sp.get_piece_size())]
  scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
  path = tmp_path_factory.mktemp("llama2c") / "llama2_tokenizer.bin"
  _write_llama2c_bin(path, pieces, scores)
  return path


@pytest.fixture(scope="module")
def tok512() -> Llama2cTokenizer:
  return Llama2cTokenizer(TOK512_BIN)


# SentencePiece.


def test_sentencepiece_llama2_known_facts():
  tokenizer = SentencePieceTokenizer(LLAMA2_MODEL)
  assert isinstance(tokenizer, Tokenizer)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)


@pytest.mark.parametrize("text", SENTENCES)
def test_sentencepiece_matches_library_and_round_trips(text, llama2_processor):
  tokenizer = SentencePieceTokenizer(LLAMA2_MODEL)
  library_ids = llama2_processor.encode(text)
  assert tokenizer.encode(text) == [1] + library_ids
  assert tokenizer.encode(text, bos=False) == library_ids
  assert tokenizer.encode(text, bos=True, eos=True) == [1] + library_ids + [2]
  assert tokenizer.decode(tokenizer.encode(text, eos=True)) == text


def test_sentencepiece_decode_rejects_out_of_range_id():
  with pytest.raises(ValueError, match="32000 at position=1"):
    SentencePieceTokenizer(LLAMA2_MODEL).decode([1, 32000])


# llama2.c format with the real LLaMA-2 vocabulary: must agree with SentencePiece.


@pytest.mark.parametrize("text", SENTENCES)
def test_llama2c_export_of_llama2_matches_sentencepiece(
    text, exported_llama2_bin, llama2_processor):
  # Both merge the adjacent pair whose piece scores best (leftmost on ties) starting from one
  # symbol per codepoint after a dummy-prefix space, and spell codepoints missing from the
  # vocabulary as byte tokens. SentencePiece falls back to bytes after merging, llama2.c before,
  # which agrees because no piece concatenation equals a byte piece "<0xBB>". The texts avoid the
  # cases where the two are defined to differ: a literal "▁" (SentencePiece's whitespace mark,
  # which the export turns into " "), and text that spells a special piece such as "<0x41>".
  tokenizer = Llama2cTokenizer(exported_llama2_bin)
  assert tokenizer.vocab_size == 32000
  library_ids = llama2_processor.encode(text)
  assert tokenizer.encode(text, bos=False) == library_ids
  assert tokenizer.encode(text, eos=True) == [1] + library_ids + [2]
  assert tokenizer.decode(tokenizer.encode(text, eos=True)) == text


def test_llama2c_export_of_llama2_matches_sentencepiece_on_random_texts(
    exported_llama2_bin, llama2_processor):
  tokenizer = Llama2cTokenizer(exported_llama2_bin)
  for text in _random_texts(seed=0, count=20, parts=60):
    library_ids = llama2_processor.encode(text)
    assert tokenizer.encode(text, bos=False) == library_ids, text
    assert tokenizer.decode([1] + library_ids) == llama2_processor.decode(library_ids) == text


# llama2.c format: tok512.bin (stories260K).


def test_tok512_story_sentence_round_trips(tok512):
  assert isinstance(tok512, Tokenizer)
  assert (tok512.bos_id, tok512.eos_id, tok512.vocab_size) == (1, 2, 512)
  ids = tok512.encode(STORY_SENTENCE)
  assert ids[0] == 1 and 1 not in ids[1:]
  assert all(0 <= i < 512 for i in ids)
  assert len(ids) < len(STORY_SENTENCE) // 2  # merges happened
  assert tok512.decode(ids) == STORY_SENTENCE
  assert tok512.encode(STORY_SENTENCE, eos=True) == ids + [2]


@pytest.mark.parametrize("char", ["ü", "🦙"])
def test_tok512_byte_fallback_round_trips(char, tok512):
  utf8 = char.encode("utf-8")
  assert utf8 not in tok512.pieces
  text = f"The café had a {char}."
  ids = tok512.encode(text)
  byte_ids = [3 + byte for byte in utf8]
  assert any(ids[i:i + len(byte_ids)] == byte_ids for i in range(len(ids)))
  assert [tok512.pieces[i] for i in byte_ids] == [b"<0x%02X>" % byte for byte in utf8]
  assert tok512.decode(ids) == text


def test_tok512_matches_reference_merge_loop_on_random_texts(tok512):
  pieces, scores = list(tok512.pieces), list(tok512.scores)
  for text in _random_texts(seed=1, count=30, parts=40):
    ids = tok512.encode(text, bos=False)
    assert ids == _reference_llama2c_encode(pieces, scores, text), text
    assert tok512.decode([1] + ids) == text


def test_tok512_decode_keeps_dummy_space_without_bos(tok512):
  # llama2.c strips the dummy-prefix space only from the piece that follows BOS.
  assert tok512.decode(tok512.encode(STORY_SENTENCE, bos=False)) == " " + STORY_SENTENCE


def test_tok512_empty_text_has_no_dummy_prefix(tok512):
  assert tok512.encode("") == [1]
  assert tok512.encode("", bos=False, eos=True) == [2]
  assert tok512.decode([]) == ""


def test_tok512_decode_replaces_invalid_utf8(tok512):
  lone_continuation_byte = 3 + 0xA9
  assert tok512.decode([1, lone_continuation_byte]) == "\ufffd"


def test_tok512_decode_rejects_out_of_range_id(tok512):
  with pytest.raises(ValueError, match="512 at position=0"):
    tok512.decode([512])


# llama2.c format: hand-written vocabularies for the merge rules.


def test_llama2c_merges_leftmost_pair_on_equal_scores(tmp_path):
  pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"aa"]
  path = tmp_path / "tie.bin"
  _write_llama2c_bin(path, pieces, [-1.0] * len(pieces))
  tokenizer = Llama2cTokenizer(path)
  assert tokenizer.encode("aaa", bos=False) == [3, 5, 4]
  assert tokenizer.encode("aaaaa", bos=False) == [3, 5, 5, 4]
  assert tokenizer.decode(tokenizer.encode("aaaaa")) == "aaaaa"


def test_llama2c_prefers_higher_score_and_skips_scores_at_the_floor(tmp_path):
  pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"b", b"c", b"ab", b"bc", b"xy",
            b"x", b"y"]
  scores = [0.0] * 7 + [-5.0, -2.0, LLAMA2C_MIN_MERGE_SCORE, 0.0, 0.0]
  path = tmp_path / "scores.bin"
  _write_llama2c_bin(path, pieces, scores)
  tokenizer = Llama2cTokenizer(path)
  assert tokenizer.encode("abc", bos=False) == [3, 4, 8]  # "bc" (-2) beats "ab" (-5)
  assert tokenizer.encode("xy", bos=False) == [3, 10, 11]  # a score of -1e10 never merges


def test_llama2c_uses_lower_id_of_duplicate_pieces(tmp_path):
  pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b" a", b"a", b" a", b"a"]
  path = tmp_path / "duplicates.bin"
  _write_llama2c_bin(path, pieces, [0.0] * len(pieces))
  tokenizer = Llama2cTokenizer(path)
  assert tokenizer.encode("a", bos=False) == [4]
  assert tokenizer.encode("aa", bos=False) == [4, 5]
  assert tokenizer.decode([1, 6, 7]) == "aa"


def test_llama2c_without_byte_tokens_rejects_unknown_character(tmp_path):
  path = tmp_path / "no_bytes.bin"
  _write_llama2c_bin(path, [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a"], [0.0] * 5)
  tokenizer = Llama2cTokenizer(path)
  assert tokenizer.encode("aa", bos=False) == [3, 4, 4]
  with pytest.raises(ValueError, match=r"'b' at position=1 .*byte fallback"):
    tokenizer.encode("ab")


def test_llama2c_without_space_piece_rejects_text(tmp_path):
  path = tmp_path / "no_space.bin"
  _write_llama2c_bin(path, [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"a"], [0.0] * 4)
  with pytest.raises(ValueError, match="no ' ' piece"):
    Llama2cTokenizer(path).encode("a")


# Format detection and file errors.


@pytest.mark.parametrize(
    "path, expected_type",
    [(TOK512_BIN, Llama2cTokenizer), (LLAMA2_MODEL, SentencePieceTokenizer)])
def test_load_tokenizer_picks_format(path, expected_type):
  tokenizer = load_tokenizer(path)
  assert type(tokenizer) is expected_type
  assert tokenizer.decode(tokenizer.encode(STORY_SENTENCE)) == STORY_SENTENCE


@pytest.mark.parametrize("opener", [load_tokenizer, Llama2cTokenizer, SentencePieceTokenizer])
def test_missing_file_raises_file_not_found_naming_it(opener, tmp_path):
  path = tmp_path / "missing.bin"
  with pytest.raises(FileNotFoundError, match="missing.bin"):
    opener(path)


@pytest.mark.parametrize("opener", [load_tokenizer, Llama2cTokenizer, SentencePieceTokenizer])
def test_empty_file_raises_naming_it(opener, tmp_path):
  path = tmp_path / "empty.model"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="empty.model.* is empty"):
    opener(path)


def test_directory_raises_naming_it(tmp_path):
  with pytest.raises(ValueError, match="is not a regular file"):
    load_tokenizer(tmp_path)


@pytest.mark.parametrize("opener", [load_tokenizer, Llama2cTokenizer])
@pytest.mark.parametrize("cut", [2, 9, 1000, TOK512_BIN.stat().st_size - 1])
def test_truncated_llama2c_file_raises_with_position(opener, cut, tmp_path):
  path = tmp_path / "truncated.bin"
  path.write_bytes(TOK512_BIN.read_bytes()[:cut])
  with pytest.raises(ValueError, match=f"truncated.bin.*truncated at byte {cut}"):
    opener(path)


@pytest.mark.parametrize("opener", [load_tokenizer, SentencePieceTokenizer])
def test_truncated_sentencepiece_model_raises_naming_it(opener, tmp_path):
  path = tmp_path / "truncated.model"
  path.write_bytes(LLAMA2_MODEL.read_bytes()[:1000])
  with pytest.raises(ValueError, match="truncated.model.*not a valid SentencePiece model"):
    opener(path)


def test_llama2c_vocab_size_must_match_file():
  assert Llama2cTokenizer(TOK512_BIN, vocab_size=512).vocab_size == 512
  with pytest.raises(ValueError, match="tok512.bin.*truncated at byte"):
    Llama2cTokenizer(TOK512_BIN, vocab_size=513)
  with pytest.raises(ValueError, match="tok512.bin.*trailing bytes after vocab_size=511"):
    Llama2cTokenizer(TOK512_BIN, vocab_size=511)


def test_llama2c_token_longer_than_header_max_raises(tmp_path):
  path = tmp_path / "long_token.bin"
  _write_llama2c_bin(path, [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" "], [0.0] * 4)
  data = bytearray(path.read_bytes())
  data[:4] = struct.pack("<i", 5)  # the header now says tokens are at most 5 bytes
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"long_token.bin.*token 2 at byte 34 has length=6"):
    Llama2cTokenizer(path)
