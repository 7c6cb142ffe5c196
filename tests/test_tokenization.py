"""Tokenizer loading and line spans on a byte-level BPE trained on Python-like text."""
from __future__ import annotations

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from psgpo_jax import tokenization
from psgpo_jax.tokenization import (LineSpans, batch_line_arrays, line_spans,
                                    line_token_arrays, load_tokenizer)

EOS = "<|endoftext|>"
CORPUS = ['''def add(a, b):
    """Return the sum."""
    return a + b


def mul(a, b):
    # multiply two numbers
    result = a * b
    return result


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()
''', '''for i in range(10):
    if i % 2 == 0:
        print(i)
    else:
        continue


while True:
    break
''']
SNIPPETS = [
    "def f(x):\n    # note\n\n    return x  # é → 😀\n",
    "x = 1\n\n\n\ny = 'naïve'\n  \n# done",
    "class A:\n    def g(self):\n        return [i for i in range(3)]\n\n\n",
    "\n\nprint('¿qué?')\n",
]


def _train(pre_tokenizer, decoder, alphabet) -> transformers.PreTrainedTokenizerFast:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoder
  trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=alphabet)
  tok.train_from_iterator(CORPUS * 20, trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="module")
def tokenizer():
  """Byte-level BPE without a pre-split, so merges cross newlines (as in code models)."""
  return _train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                decoders.ByteLevel(), pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="module")
def metaspace_tokenizer():
  """A SentencePiece-style tokenizer: not byte-level, so spans come from decoding."""
  alphabet = sorted(set("".join(CORPUS)) | set("".join(SNIPPETS)))
  return _train(pre_tokenizers.Metaspace(), decoders.Metaspace(), alphabet)


def _byte_level(piece: str | bytes) -> str:
  """The byte-level vocabulary spelling of a text (or raw bytes) piece."""
  chars = {b: c for c, b in tokenization._byte_decoder().items()}
  data = piece if isinstance(piece, bytes) else piece.encode("utf-8")
  return "".join(chars[b] for b in data)


def _ids(tokenizer, pieces) -> list[int]:
  """Token ids for hand-chosen token boundaries; every piece must be one vocab token."""
  vocab = tokenizer.get_vocab()
  ids = []
  for piece in pieces:
    key = piece if piece == EOS else _byte_level(piece)
    assert key in vocab, f"{piece!r} is not a single token of the test tokenizer"
    ids.append(vocab[key])
  return ids


def _spans(tokenizer, pieces, **kwargs) -> LineSpans:
  return line_spans(tokenizer, [], _ids(tokenizer, pieces), **kwargs)


def test_training_produced_newline_merges(tokenizer):
  vocab = tokenizer.get_vocab()
  for piece in ["\n    ", "\n\n", "\n\n\n", "):\n    ", "\n    return "]:
    assert _byte_level(piece) in vocab, repr(piece)
  tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(SNIPPETS[0]))
  assert any("Ċ" in t and len(t) > 1 for t in tokens)       # newline inside a longer token


def test_newline_merged_with_next_indentation_ends_the_line_before(tokenizer):
  spans = _spans(tokenizer, ["def ", "f", "(", "x", "):\n    ", "x", "\n    return ", "x", "\n"])
  assert spans.lines == ("def f(x):", "    x", "    return x")
  assert spans.end_token.tolist() == [4, 6, 8]
  assert spans.num_tokens == 9 and not spans.is_blank.any() and not spans.is_comment.any()


def test_several_newlines_in_one_token_share_the_end_token(tokenizer):
  spans = _spans(tokenizer, ["x", "\n\n\n", "y", "\n\n", " ", "z"])
  assert spans.lines == ("x", "", "", "y", "", " z")
  assert spans.end_token.tolist() == [1, 1, 1, 3, 3, 5]
  assert spans.is_blank.tolist() == [False, True, True, False, True, False]
  assert spans.is_code.tolist() == [True, False, False, True, False, True]


def test_final_line_without_newline_ends_at_its_last_text_token(tokenizer):
  spans = _spans(tokenizer, ["def ", "f", EOS])
  assert spans.lines == ("def f",) and spans.end_token.tolist() == [1]
  assert spans.num_tokens == 3
  spans = _spans(tokenizer, ["a", "\n", EOS])          # text after the last newline: none
  assert spans.lines == ("a",) and spans.end_token.tolist() == [1]
  assert _spans(tokenizer, []).num_lines == 0
  assert _spans(tokenizer, [EOS]).num_lines == 0


def test_blank_and_comment_only_lines_are_flagged(tokenizer):
  pieces = ["    ", "#", " ", "n", "o", "t", "e", "\n", " ", " ", "\n", "x", " ", "#", " ", "c",
            "\n", "#"]
  spans = _spans(tokenizer, pieces)
  assert spans.lines == ("    # note", "  ", "x # c", "#")
  assert spans.is_comment.tolist() == [True, False, False, True]
  assert spans.is_blank.tolist() == [False, True, False, False]
  assert spans.end_token.tolist() == [7, 10, 16, 17]


def test_partial_utf8_tokens(tokenizer):
  # "é" is two tokens and "😀" four: each token holds a fraction of a character.
  e_acute, emoji = "é".encode(), "😀".encode()
  assert tokenizer.decode(_ids(tokenizer, [e_acute[:1]])) == "\ufffd"
  pieces = ["#", " ", *[emoji[i:i + 1] for i in range(4)], "\n", "a", *[e_acute[:1], e_acute[1:]]]
  spans = _spans(tokenizer, pieces)
  assert spans.lines == ("# 😀", "aé")
  assert spans.end_token.tolist() == [6, 9]
  assert spans.is_comment.tolist() == [True, False]
  assert spans == _spans(tokenizer, pieces, method="decode")


def _assert_definition(tokenizer, ids, spans):
  """Independent check: the end token of terminated line i is the one whose text holds
  newline number i + 1; a final line ends at the token that completes the text."""
  def text(k):
    return tokenizer.decode(ids[:k], skip_special_tokens=True)
  full = text(len(ids))
  assert "\n".join(spans.lines) == full.removesuffix("\n")
  for i, end in enumerate(spans.end_token):
    if i < full.count("\n"):
      assert text(end).count("\n") <= i < text(end + 1).count("\n")
    else:
      assert text(end + 1) == full and text(end) != full


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_encoded_code_matches_the_definition_with_either_method(tokenizer, snippet):
  ids = tokenizer.encode(snippet) + [tokenizer.eos_token_id]
  by_bytes = line_spans(tokenizer, [], ids, method="bytes")
  by_decoding = line_spans(tokenizer, tokenizer.encode("# prompt\n"), ids, method="decode")
  assert by_bytes == by_decoding
  _assert_definition(tokenizer, ids, by_bytes)


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_non_byte_level_tokenizer_falls_back_to_decoding(metaspace_tokenizer, snippet):
  tok = metaspace_tokenizer
  ids = tok.encode(snippet)
  assert any("\n" in t and len(t) > 1 for t in tok.convert_ids_to_tokens(ids))
  with pytest.raises(ValueError, match="byte-level"):
    line_spans(tok, [], ids, method="bytes")
  spans = line_spans(tok, [], ids)
  _assert_definition(tok, ids, spans)
  assert spans.lines == tuple(snippet.removesuffix("\n").split("\n"))


def test_prompt_gives_decoding_context(metaspace_tokenizer):
  tok = metaspace_tokenizer
  prompt, response = tok.encode("def f(x):\n"), tok.encode(" return x\n# end")
  spans = line_spans(tok, prompt, response)
  assert spans.lines[-1] == "# end" and spans.is_comment.tolist()[-1]
  assert spans.end_token[-1] == len(response) - 1


def test_line_arrays_on_a_padded_row(tokenizer):
  spans = _spans(tokenizer, ["x", "\n\n\n", "y", "\n", "#", "\n", EOS])
  # lines: "x" (end 1), "" (1), "" (1), "y" (3), "#" (5).
  arrays = line_token_arrays(spans, response_start=4, length=14)
  assert np.flatnonzero(arrays["line_end_mask"]).tolist() == [5, 7, 9]
  assert np.flatnonzero(arrays["code_line_end_mask"]).tolist() == [5, 7]
  assert np.flatnonzero(arrays["trivial_line_mask"]).tolist() == [9]   # token 5 ends code too
  expected = np.full(14, -1)
  expected[[5, 7, 9]] = [2, 3, 4]                    # the last line ending at each token
  np.testing.assert_array_equal(arrays["line_index"], expected)
  assert all(a.dtype == np.int32 and a.shape == (14,) for a in arrays.values())


def test_batch_line_arrays_follow_the_response_mask(tokenizer):
  a = _spans(tokenizer, ["a", "\n", "b", "\n"])
  b = _spans(tokenizer, ["c", "\n", "d", "\n", "e", "\n"])
  response_mask = np.array([[0, 0, 1, 1, 1, 1, 0, 0],     # left-padded prompt, right pad
                            [0, 0, 0, 0, 0, 1, 1, 1]])    # truncated after 3 tokens
  arrays = batch_line_arrays([a, b], response_mask)
  np.testing.assert_array_equal(arrays["line_end_mask"],
                                [[0, 0, 0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0]])
  np.testing.assert_array_equal(arrays["line_index"],
                                [[-1, -1, -1, 0, -1, 1, -1, -1], [-1] * 6 + [0, -1]])
  assert set(arrays) == {"line_end_mask", "code_line_end_mask", "trivial_line_mask",
                         "line_index"}
  assert not arrays["trivial_line_mask"].any()
  with pytest.raises(ValueError, match="contiguous"):
    batch_line_arrays([a], np.array([[1, 0, 1, 1]]))


def test_load_tokenizer_sets_a_pad_token(tokenizer, tmp_path):
  tokenizer.save_pretrained(tmp_path / "tok")
  loaded = load_tokenizer(tmp_path / "tok")
  assert loaded.pad_token == EOS and loaded.pad_token_id == loaded.eos_token_id
  assert loaded.encode(SNIPPETS[0]) == tokenizer.encode(SNIPPETS[0])


def test_load_tokenizer_reports_missing_files(tmp_path):
  with pytest.raises(tokenization.TokenizerNotFoundError, match="does not exist"):
    load_tokenizer(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(tokenization.TokenizerNotFoundError, match="tokenizer.json"):
    load_tokenizer(tmp_path / "empty")
