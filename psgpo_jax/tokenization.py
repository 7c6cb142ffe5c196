"""Tokenizer loading and line spans: which response token ends each line of code.

A response is split into lines at "\\n". The *end token* of a line is the token whose
text holds the line's terminating newline; for a final line without a newline it is the
token holding the line's last character. Tokens that hold no text (EOS and other special
tokens) belong to no line, and text after the last newline forms a line only if it is
non-empty ("a\\nb\\n" has two lines, "a\\nb" too).

Byte-level BPE tokens need care, and both cases below are handled exactly:
  * one token may end a line and start the next: "\\n    " ends the line before it (its
    newline comes first); the next line's indentation rides along in the same token.
  * one token may hold several newlines ("\\n\\n", ":\\n\\n"): every line terminated inside
    it ends at that token, so a blank line shares its end token with the line before.
    Per-token arrays (`line_token_arrays`) then describe the *longest* prefix through
    that token: `line_index` names the last line ending there, and the token counts as a
    code line end if any line ending there is code.
  * a token may hold a fraction of a multi-byte UTF-8 character; offsets are counted in
    bytes, and "\\n" is never part of a multi-byte sequence.

Offsets come from each token's bytes when the tokenizer is byte-level (GPT-2 / Qwen2 /
Llama 3 style), checked against `tokenizer.decode`; otherwise from decoding growing
prefixes (exact for any tokenizer; binary search, so O(lines * log(tokens)) decodes).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import transformers

PathLike = os.PathLike | str


class TokenizerNotFoundError(FileNotFoundError):
  """The tokenizer directory or its files are missing."""


def load_tokenizer(path: PathLike) -> transformers.PreTrainedTokenizerBase:
  """Loads a tokenizer from a local directory; ensures it has a pad token.

  Args:
    path: a directory with tokenizer.json (or the files of a slow tokenizer), e.g. a
      Hugging Face model directory. Nothing is downloaded.
  Returns:
    the tokenizer, with `pad_token` set to `eos_token` when it had none.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise TokenizerNotFoundError(
        f"Tokenizer directory {str(path)!r} does not exist. Pass a local directory with "
        f"tokenizer.json / tokenizer_config.json (a Hugging Face model directory works).")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as err:
    raise TokenizerNotFoundError(
        f"Could not load a tokenizer from {str(path)!r} ({err}). It needs tokenizer.json "
        f"or the vocabulary files its tokenizer_config.json names.") from err
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise ValueError(f"The tokenizer in {str(path)!r} has neither a pad nor an eos token; "
                       f"add one (tokenizer.add_special_tokens) before training.")
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class LineSpans:
  """The lines of one response and the response token that ends each.

  Attributes:
    lines: the L lines' text, without their newline.
    end_token: [L] int32, index (within the response tokens) of each line's end token;
      non-decreasing (lines in one multi-newline token share it).
    is_blank: [L] bool, the line is empty or whitespace only.
    is_comment: [L] bool, the line is a comment only ("#..." after stripping).
    num_tokens: number of response tokens.
  """
  lines: Tuple[str, ...]
  end_token: np.ndarray
  is_blank: np.ndarray
  is_comment: np.ndarray
  num_tokens: int

  def __eq__(self, other) -> bool:
    if not isinstance(other, LineSpans):
      return NotImplemented
    return (self.lines == other.lines and self.num_tokens == other.num_tokens
            and all(np.array_equal(getattr(self, f), getattr(other, f))
                    for f in ("end_token", "is_blank", "is_comment")))

  @property
  def num_lines(self) -> int:
    return len(self.lines)

  @property
  def is_code(self) -> np.ndarray:
    """[L] bool: neither blank nor comment-only (the lines dense rewards score)."""
    return ~(self.is_blank | self.is_comment)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> Dict[str, int]:
  """GPT-2's byte-level alphabet: printable unicode char -> the byte it stands for."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _byte_level_pieces(tokenizer, ids: Sequence[int]) -> Optional[List[bytes]]:
  """Each token's bytes if the tokenizer is byte-level BPE, else None.

  Special tokens give b"" (as `decode(..., skip_special_tokens=True)`); other added
  tokens give their literal text. The result is checked against `tokenizer.decode`.
  """
  decoder = _byte_decoder()
  special = set(tokenizer.all_special_ids)
  added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
  pieces = []
  for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
    if token_id in special:
      pieces.append(b"")
    elif token_id in added:
      pieces.append(added[token_id].encode("utf-8"))
    elif token is not None and all(c in decoder for c in token):
      pieces.append(bytes(decoder[c] for c in token))
    else:
      return None
  text = tokenizer.decode(list(ids), skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)
  if b"".join(pieces).decode("utf-8", errors="replace") != text:
    return None
  return pieces


def _line_records(text: str) -> Tuple[List[str], List[int]]:
  """Lines of `text` and, per line, the unit offset (in `text`) of its last unit.

  Returns offsets into `text` itself: the newline for terminated lines, the last
  character for a non-empty final line.
  """
  lines, ends, start = [], [], 0
  while True:
    newline = text.find("\n", start)
    if newline < 0:
      break
    lines.append(text[start:newline])
    ends.append(newline)
    start = newline + 1
  if start < len(text):
    lines.append(text[start:])
    ends.append(len(text) - 1)
  return lines, ends


def _ends_from_bytes(pieces: List[bytes]) -> Tuple[List[str], np.ndarray]:
  """Line texts and end tokens from per-token bytes: exact, O(tokens)."""
  cumulative = np.cumsum([len(p) for p in pieces]) if pieces else np.zeros(0, np.int64)
  data = b"".join(pieces)
  byte_lines, byte_ends = _line_records(data.decode("latin-1"))   # 1 char per byte
  lines = [line.encode("latin-1").decode("utf-8", errors="replace") for line in byte_lines]
  # The token holding byte offset e is the first whose cumulative length exceeds e.
  ends = np.searchsorted(cumulative, np.asarray(byte_ends, np.int64), side="right")
  return lines, ends


def _ends_by_decoding(tokenizer, prompt_ids: Sequence[int], response_ids: Sequence[int]
                      ) -> Tuple[List[str], np.ndarray]:
  """Line texts and end tokens by decoding prompt + growing response prefixes.

  Works for any tokenizer: a response character at offset c is complete once the
  decoded prefix agrees with the full decoded text beyond c (partial characters decode
  to U+FFFD and disagree). The agreed length grows with the prefix, so each line's end
  token is found by binary search.
  """
  prompt_ids, response_ids = list(prompt_ids), list(response_ids)

  def decode(ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

  full = decode(prompt_ids + response_ids)

  def agreed(text: str) -> int:
    return len(os.path.commonprefix([text, full]))

  offset = agreed(decode(prompt_ids)) if prompt_ids else 0
  lines, char_ends = _line_records(full[offset:])

  @functools.lru_cache(maxsize=None)
  def complete(k: int) -> int:
    """Response characters fully decoded from the first k + 1 response tokens."""
    return agreed(decode(prompt_ids + response_ids[:k + 1])) - offset

  ends, low = [], 0
  for c in char_ends:
    lo, hi = low, len(response_ids) - 1
    while lo < hi:
      mid = (lo + hi) // 2
      if complete(mid) > c:
        hi = mid
      else:
        lo = mid + 1
    ends.append(lo)
    low = lo
  return lines, np.asarray(ends, np.int64)


def line_spans(tokenizer, prompt_ids: Sequence[int], response_ids: Sequence[int],
               method: str = "auto") -> LineSpans:
  """Splits a response into lines and finds the token that ends each line.

  Args:
    tokenizer: a `transformers` tokenizer.
    prompt_ids: the prompt's token ids; context for tokenizers whose decoding depends
      on what precedes (e.g. SentencePiece's leading space). Not part of any line.
    response_ids: the response's token ids (may end with EOS or other special tokens,
      which hold no text).
    method: "auto" (per-token bytes when the tokenizer is byte-level, else decoding),
      "bytes" (fail unless byte-level) or "decode".
  Returns:
    LineSpans with end tokens indexed within `response_ids`.
  """
  if method not in ("auto", "bytes", "decode"):
    raise ValueError(f"method={method!r}; choose 'auto', 'bytes' or 'decode'.")
  response_ids = [int(i) for i in response_ids]
  pieces = None if method == "decode" else _byte_level_pieces(tokenizer, response_ids)
  if pieces is not None:
    lines, ends = _ends_from_bytes(pieces)
  elif method == "bytes":
    raise ValueError("method='bytes' needs a byte-level BPE tokenizer whose token bytes "
                     "reproduce tokenizer.decode; use method='auto'.")
  else:
    lines, ends = _ends_by_decoding(tokenizer, prompt_ids, response_ids)
  stripped = [line.strip() for line in lines]
  return LineSpans(
      lines=tuple(lines),
      end_token=np.asarray(ends, np.int32).reshape(-1),
      is_blank=np.array([not s for s in stripped], bool).reshape(-1),
      is_comment=np.array([s.startswith("#") for s in stripped], bool).reshape(-1),
      num_tokens=len(response_ids))


def line_token_arrays(spans: LineSpans, response_start: int, length: int,
                      response_length: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Places one response's line ends on a padded token row.

  Args:
    spans: the response's LineSpans.
    response_start: position in the row of the response's first token (e.g. after
      left padding and the prompt).
    length: T, the row length.
    response_length: how many response tokens the row holds (default: all of them);
      line ends beyond it or beyond T (truncation) are dropped.
  Returns:
    line_end_mask: [T] int32, 1 at tokens that end at least one line.
    code_line_end_mask: [T] int32, 1 at tokens that end at least one code line (not
      blank, not comment-only): where dense rewards go.
    trivial_line_mask: [T] int32, line_end_mask minus code_line_end_mask: tokens that
      end only blank/comment-only lines (what `rl.rewards` skips).
    line_index: [T] int32, at line-end tokens the index of the last line ending there
      (the longest prefix the token completes), -1 elsewhere.
  """
  end_mask = np.zeros(length, np.int32)
  code_mask = np.zeros(length, np.int32)
  index = np.full(length, -1, np.int32)
  limit = spans.num_tokens if response_length is None else response_length
  ends = spans.end_token.astype(np.int64)
  keep = (ends < limit) & (response_start + ends < length)
  positions = response_start + ends[keep]
  end_mask[positions] = 1
  code_mask[positions[spans.is_code[keep]]] = 1
  index[positions] = np.arange(spans.num_lines)[keep]   # ascending: the last line wins
  return {"line_end_mask": end_mask, "code_line_end_mask": code_mask,
          "trivial_line_mask": end_mask - code_mask, "line_index": index}


def batch_line_arrays(spans: Sequence[LineSpans], response_mask: np.ndarray
                      ) -> Dict[str, np.ndarray]:
  """`line_token_arrays` for a batch whose responses sit where `response_mask` is 1.

  Args:
    spans: B LineSpans, one per row.
    response_mask: [B, T], 1 on each row's response tokens: one contiguous block per
      row, any padding layout around it; a block shorter than the response (truncated)
      drops the line ends beyond it.
  Returns:
    line_end_mask, code_line_end_mask, trivial_line_mask, line_index: each [B, T]
    int32, as in `line_token_arrays`.
  """
  response_mask = np.asarray(response_mask)
  batch, length = response_mask.shape
  if batch != len(spans):
    raise ValueError(f"{len(spans)} LineSpans for a batch of {batch} rows.")
  out = {key: np.zeros((batch, length), np.int32)
         for key in ("line_end_mask", "code_line_end_mask", "trivial_line_mask")}
  out["line_index"] = np.full((batch, length), -1, np.int32)
  for row, (row_spans, row_mask) in enumerate(zip(spans, response_mask)):
    positions = np.flatnonzero(row_mask)
    if positions.size == 0:
      continue
    if positions[-1] - positions[0] + 1 != positions.size:
      raise ValueError(f"response_mask row {row} is not one contiguous block.")
    arrays = line_token_arrays(row_spans, int(positions[0]), length, int(positions.size))
    for key, value in arrays.items():
      out[key][row] = value
  return out
