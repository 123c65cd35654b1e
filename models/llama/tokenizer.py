"""Tokenizers for the LLaMA port: SentencePiece models and llama2.c `.bin` vocabularies.

Two formats, one interface (`Tokenizer`):

- `SentencePieceTokenizer` wraps the `sentencepiece` library for a LLaMA-2 `tokenizer.model`.
- `Llama2cTokenizer` reads the llama2.c tokenizer file and reproduces llama2.c's `encode` (BPE by
  merge score, byte fallback) and `decode`. The `.bin` layout (little-endian):

    int32 max_token_length
    vocab_size times: float32 score, int32 byte length, that many bytes (the piece)

  where the piece of token id `3 + b` is `<0xBB>` (hex of byte `b`), id 1 is BOS and id 2 is EOS.

`load_tokenizer` picks the format from the file's contents.
"""

from __future__ import annotations

import heapq
import operator
import os
import re
import struct
from typing import Protocol, Sequence, runtime_checkable

import sentencepiece as spm

PathLike = str | os.PathLike[str]

LLAMA2C_BOS_ID = 1
LLAMA2C_EOS_ID = 2
LLAMA2C_BYTE_OFFSET = 3  # id of the byte token `<0x00>`; byte b is id b + 3.
# llama2.c starts its search for the best merge at this score with a strict `>`, so a merge whose
# piece scores at or below it (or is NaN) never happens.
LLAMA2C_MIN_MERGE_SCORE = -1e10

_INT32 = struct.Struct("<i")
_SCORE_AND_LENGTH = struct.Struct("<fi")
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


@runtime_checkable
class Tokenizer(Protocol):
  """What the model code needs from a tokenizer."""

  @property
  def bos_id(self) -> int:
    """Id of the beginning-of-sequence token."""
    ...

  @property
  def eos_id(self) -> int:
    """Id of the end-of-sequence token."""
    ...

  @property
  def vocab_size(self) -> int:
    """Number of token ids; every id is in [0, vocab_size)."""
    ...

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text`, with BOS first if `bos` and EOS last if `eos`."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """The text of token ids `ids` (BOS/EOS contribute no text)."""
    ...


def _read_tokenizer_file(path: PathLike) -> bytes:
  """Returns the bytes of a tokenizer file; raises naming `path` if it is missing or empty."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file {os.fspath(path)!r} does not exist")
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer path {os.fspath(path)!r} is not a regular file")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"cannot read tokenizer file {os.fspath(path)!r}: {e}") from e
  if not data:
    raise ValueError(f"tokenizer file {os.fspath(path)!r} is empty")
  return data


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
  """Returns `ids` as Python ints; raises if one is not an integer in [0, vocab_size)."""
  checked = [operator.index(i) for i in ids]
  for position, token_id in enumerate(checked):
    if not 0 <= token_id < vocab_size:
      raise ValueError(f"token id {token_id} at {position=} is outside [0, {vocab_size=})")
  return checked


def _parse_sentencepiece(data: bytes) -> spm.SentencePieceProcessor:
  """Loads a serialized SentencePiece `ModelProto`; raises ValueError if `data` is not one."""
  processor = spm.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(data)
  except RuntimeError as e:
    raise ValueError(f"not a valid SentencePiece model ({e})") from e
  return processor


class SentencePieceTokenizer:
  """A SentencePiece model (e.g. LLaMA-2's `tokenizer.model`, 32,000 pieces)."""

  def __init__(self, path: PathLike):
    self._path = os.fspath(path)
    try:
      self._processor = _parse_sentencepiece(_read_tokenizer_file(path))
    except ValueError as e:
      raise ValueError(f"cannot load SentencePiece tokenizer {self._path!r}: {e}") from e

  @property
  def bos_id(self) -> int:
    return self._processor.bos_id()

  @property
  def eos_id(self) -> int:
    return self._processor.eos_id()

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text` as SentencePiece encodes it, with optional BOS/EOS ids around it."""
    for wanted, name, token_id in ((bos, "bos", self.bos_id), (eos, "eos", self.eos_id)):
      if wanted and token_id < 0:
        raise ValueError(
            f"{name}=True but the SentencePiece model {self._path!r} has no {name} token")
    ids = self._processor.encode(text)
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` as SentencePiece decodes it (control tokens such as BOS/EOS are dropped)."""
    return self._processor.decode(_check_ids(ids, self.vocab_size))


def _parse_llama2c(data: bytes, vocab_size: int | None) -> tuple[list[bytes], list[float]]:
  """Parses a llama2.c tokenizer file.

  Args:
    data: the file's bytes.
    vocab_size: the number of tokens the file must hold exactly; None reads tokens to the end.

  Returns:
    (pieces, scores), each of length vocab_size: the piece bytes and float32 merge score of each id.

  Raises:
    ValueError: naming the byte offset, if the file is truncated, has trailing bytes, or a token
      length is negative or above the header's max_token_length.
  """
  if vocab_size is not None and vocab_size < LLAMA2C_EOS_ID + 1:
    raise ValueError(f"{vocab_size=} must be at least {LLAMA2C_EOS_ID + 1} (<unk>, BOS, EOS)")
  if len(data) < _INT32.size:
    raise ValueError(f"truncated at byte {len(data)}: the max_token_length header needs 4 bytes")
  (max_token_length,) = _INT32.unpack_from(data, 0)
  if max_token_length <= 0:
    raise ValueError(f"header {max_token_length=} must be positive")
  pieces, scores = [], []
  offset = _INT32.size
  while (offset < len(data)) if vocab_size is None else (len(pieces) < vocab_size):
    token_id = len(pieces)
    if offset + _SCORE_AND_LENGTH.size > len(data):
      raise ValueError(
          f"truncated at byte {len(data)}: token {token_id}'s score and length need bytes "
          f"[{offset}, {offset + _SCORE_AND_LENGTH.size})")
    score, length = _SCORE_AND_LENGTH.unpack_from(data, offset)
    offset += _SCORE_AND_LENGTH.size
    if not 0 <= length <= max_token_length:
      raise ValueError(
          f"token {token_id} at byte {offset - _INT32.size} has {length=} outside "
          f"[0, {max_token_length=}]")
    if offset + length > len(data):
      raise ValueError(
          f"truncated at byte {len(data)}: token {token_id}'s {length} bytes need bytes "
          f"[{offset}, {offset + length})")
    pieces.append(data[offset:offset + length])
    scores.append(score)
    offset += length
  if offset != len(data):
    raise ValueError(f"{len(data) - offset} trailing bytes after {vocab_size=} tokens")
  if len(pieces) <= LLAMA2C_EOS_ID:
    raise ValueError(f"{len(pieces)} tokens, need at least {LLAMA2C_EOS_ID + 1} (<unk>, BOS, EOS)")
  return pieces, scores


def _piece_text(piece: bytes) -> bytes:
  """The bytes a piece stands for: `<0xBB>` is the raw byte 0xBB, any other piece itself."""
  match = _BYTE_PIECE.fullmatch(piece)
  return bytes([int(match.group(1), 16)]) if match else piece


class Llama2cTokenizer:
  """The llama2.c tokenizer: its `.bin` vocabulary, `encode` and `decode`.

  `encode` gives the ids llama2.c's `run.c` gives: BOS (if asked), a dummy-prefix `" "` token
  (for non-empty text), one token per Unicode codepoint (its UTF-8 bytes as byte tokens `3 + b` if
  the codepoint is not a piece), then repeatedly the adjacent pair whose concatenated piece is in
  the vocabulary with the highest score is merged (ties: the leftmost pair), until none is left;
  EOS (if asked) last. A priority queue finds the best pair, so encoding is O(n log n) rather than
  llama2.c's O(n^2); the merge order is the same. Where two ids share a piece, the lower id is used
  (llama2.c's binary search picks either).

  `decode` concatenates the pieces of the ids, with byte tokens as raw bytes and one leading space
  stripped from the piece right after BOS (undoing the dummy prefix), skips BOS/EOS (their pieces
  are markers, not text), and decodes UTF-8 with invalid bytes replaced by U+FFFD.

  Like llama2.c, merges may turn literal text that spells a special piece (e.g. "<0x41>") into that
  token, so such text does not round-trip.
  """

  def __init__(self, path: PathLike, vocab_size: int | None = None):
    """Reads a llama2.c tokenizer file.

    Args:
      path: the `.bin` file.
      vocab_size: the number of tokens the file must hold; None takes all tokens in the file.
    """
    self._path = os.fspath(path)
    data = _read_tokenizer_file(path)
    try:
      pieces, scores = _parse_llama2c(data, vocab_size)
    except ValueError as e:
      raise ValueError(f"corrupt llama2.c tokenizer file {self._path!r}: {e}") from e
    self._pieces, self._scores = tuple(pieces), tuple(scores)
    self._id_of_piece: dict[bytes, int] = {}
    for token_id, piece in enumerate(self._pieces):
      self._id_of_piece.setdefault(piece, token_id)
    self._merge_id_of_piece = {
        piece: token_id for piece, token_id in self._id_of_piece.items()
        if self._scores[token_id] > LLAMA2C_MIN_MERGE_SCORE}
    self._text = [_piece_text(piece) for piece in self._pieces]
    self._text_after_bos = [_piece_text(piece.removeprefix(b" ")) for piece in self._pieces]
    self._has_byte_tokens = len(self._pieces) >= LLAMA2C_BYTE_OFFSET + 256 and all(
        self._pieces[LLAMA2C_BYTE_OFFSET + b] == b"<0x%02X>" % b for b in range(256))

  @property
  def bos_id(self) -> int:
    return LLAMA2C_BOS_ID

  @property
  def eos_id(self) -> int:
    return LLAMA2C_EOS_ID

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  @property
  def pieces(self) -> tuple[bytes, ...]:
    """The piece bytes of every id, as stored in the file."""
    return self._pieces

  @property
  def scores(self) -> tuple[float, ...]:
    """The merge score of every id, as stored in the file."""
    return self._scores

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text` as llama2.c encodes it (see the class docstring)."""
    ids = [LLAMA2C_BOS_ID] if bos else []
    if text:
      if b" " not in self._id_of_piece:
        raise ValueError(f"llama2.c tokenizer {self._path!r} has no ' ' piece for the dummy prefix")
      ids.append(self._id_of_piece[b" "])
      for position, char in enumerate(text):
        ids.extend(self._codepoint_ids(char, position))
    ids = self._merge_best_pairs(ids)
    return ids + [LLAMA2C_EOS_ID] * eos

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` as llama2.c decodes it (see the class docstring)."""
    text = bytearray()
    previous_id = None
    for token_id in _check_ids(ids, self.vocab_size):
      if token_id not in (LLAMA2C_BOS_ID, LLAMA2C_EOS_ID):
        pieces = self._text_after_bos if previous_id == LLAMA2C_BOS_ID else self._text
        text += pieces[token_id]
      previous_id = token_id
    return text.decode("utf-8", errors="replace")

  def _codepoint_ids(self, char: str, position: int) -> list[int]:
    """The id of `char`'s piece, or else the byte-token ids of its UTF-8 bytes."""
    try:
      utf8 = char.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(f"character {char!r} at {position=} has no UTF-8 encoding ({e})") from e
    if utf8 in self._id_of_piece:
      return [self._id_of_piece[utf8]]
    if not self._has_byte_tokens:
      raise ValueError(
          f"character {char!r} at {position=} is not a piece of {self._path!r}, whose ids "
          f"{LLAMA2C_BYTE_OFFSET}..{LLAMA2C_BYTE_OFFSET + 255} are not the byte tokens "
          "<0x00>..<0xFF> needed for byte fallback")
    return [LLAMA2C_BYTE_OFFSET + byte for byte in utf8]

  def _merge_best_pairs(self, ids: list[int]) -> list[int]:
    """Merges adjacent pairs in llama2.c's order until no concatenation is a mergeable piece.

    The tokens form a linked list over their starting positions; a heap holds one entry per
    adjacent pair whose concatenation is mergeable, keyed by (-score, left position), so the top
    entry is llama2.c's choice: best score, then leftmost. A merge keeps the left node, removes the
    right one and bumps both nodes' versions, which marks their old heap entries stale.
    """
    n = len(ids)
    tokens = list(ids)
    next_node = list(range(1, n + 1))  # n marks the end.
    previous_node = list(range(-1, n - 1))  # -1 marks the start.
    version = [0] * n
    heap: list[tuple[float, int, int, int, int, int]] = []

    def push_pair(left: int) -> None:
      right = next_node[left]
      if right == n:
        return
      merged_piece = self._pieces[tokens[left]] + self._pieces[tokens[right]]
      merged_id = self._merge_id_of_piece.get(merged_piece)
      if merged_id is not None:
        heapq.heappush(
            heap, (-self._scores[merged_id], left, version[left], right, version[right], merged_id))

    for left in range(n - 1):
      push_pair(left)
    while heap:
      _, left, left_version, right, right_version, merged_id = heapq.heappop(heap)
      if version[left] != left_version or version[right] != right_version:
        continue
      tokens[left] = merged_id
      version[left] += 1
      version[right] += 1
      next_node[left] = next_node[right]
      if next_node[right] != n:
        previous_node[next_node[right]] = left
      if previous_node[left] != -1:
        push_pair(previous_node[left])
      push_pair(left)

    merged, node = [], 0
    while node < n:
      merged.append(tokens[node])
      node = next_node[node]
    return merged


def load_tokenizer(path: PathLike) -> Tokenizer:
  """Opens a tokenizer file, choosing the format from its contents.

  Args:
    path: a llama2.c tokenizer `.bin` or a SentencePiece `.model`.

  Returns:
    A `Llama2cTokenizer` if the file parses as a llama2.c vocabulary (header, then tokens up to
    the last byte), else a `SentencePieceTokenizer` if it is a SentencePiece model.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: naming `path` and why neither format fits, if it is empty or corrupt.
  """
  data = _read_tokenizer_file(path)
  try:
    _parse_llama2c(data, vocab_size=None)
  except ValueError as llama2c_error:
    try:
      _parse_sentencepiece(data)
    except ValueError as sentencepiece_error:
      raise ValueError(
          f"tokenizer file {os.fspath(path)!r} is neither a llama2.c tokenizer "
          f"({llama2c_error}) nor a SentencePiece model ({sentencepiece_error})") from None
    return SentencePieceTokenizer(path)
  return Llama2cTokenizer(path)
