"""Stop strings: a character automaton lifted to tokens, and the host-side text cuts.

`StopMatcher` is an Aho-Corasick automaton over the stop strings' characters;
`token_table` lifts it to tokens so the sampler's device loop advances one state per
sampled token and stops a row at the token that completes a stop string. On the host,
`first_stop` / `stop_end` find the cut, and `fewest_tokens_covering` keeps the fewest
tokens whose text covers what precedes it (`sampling.py`'s module docstring has the
rules).
"""
from __future__ import annotations

import collections
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


class StopMatcher:
  """Aho-Corasick automaton over characters for a set of stop strings.

  States are trie nodes (0 = nothing matched); `match_state` is absorbing and means a
  stop string has been completed. `token_table` lifts the automaton to tokens: entry
  [state, token] is the state after reading that token's text.
  """

  def __init__(self, stop_strings: Sequence[str]):
    self.stop_strings = tuple(stop_strings)
    alphabet = sorted({ch for s in self.stop_strings for ch in s})
    self.char_class = {ch: i + 1 for i, ch in enumerate(alphabet)}   # 0 = any other char
    children: List[Dict[str, int]] = [{}]
    terminal = [False]
    for s in self.stop_strings:
      node = 0
      for ch in s:
        if ch not in children[node]:
          children.append({})
          terminal.append(False)
          children[node][ch] = len(children) - 1
        node = children[node][ch]
      terminal[node] = True
    num_nodes = len(children)
    self.match_state = num_nodes
    fail = [0] * num_nodes
    output = list(terminal)
    order, queue = [], collections.deque([0])
    while queue:                                           # breadth-first: fail links
      node = queue.popleft()
      order.append(node)
      for ch, child in children[node].items():
        if node:
          f = fail[node]
          while f and ch not in children[f]:
            f = fail[f]
          fail[child] = children[f].get(ch, 0)
        output[child] = output[child] or output[fail[child]]
        queue.append(child)
    delta = np.zeros((num_nodes + 1, len(alphabet) + 1), np.int32)
    for node in order:                                     # parents before children
      for ch, cls in self.char_class.items():
        if ch in children[node]:
          nxt = children[node][ch]
        else:
          nxt = delta[fail[node], cls] if node else 0
        delta[node, cls] = nxt
    delta[self.match_state] = self.match_state
    self.goto = delta.copy()                               # trie moves, matches not absorbed
    delta = np.where(np.asarray(output + [True])[delta], self.match_state, delta)
    self.delta = delta                                     # [num_states, num_classes]

  @property
  def num_states(self) -> int:
    return self.delta.shape[0]

  def feed(self, state: int, text: str) -> int:
    """The state after reading `text` from `state`."""
    for ch in text:
      state = int(self.delta[state, self.char_class.get(ch, 0)])
    return state

  def resume_state(self, text: str) -> int:
    """The state after `text` with the stop strings completed inside it ignored.

    The initial state of a row that continues the partial response `text`: only stop
    strings that end in new tokens count.
    """
    state = 0
    for ch in text:
      state = int(self.goto[state, self.char_class.get(ch, 0)])
    return state

  def token_table(self, token_texts: Sequence[str]) -> np.ndarray:
    """[num_states, V] int32: the state after reading each token's text from each state."""
    vocab = len(token_texts)
    lengths = np.array([len(t) for t in token_texts], np.int64)
    order = np.argsort(-lengths, kind="stable")
    table = np.broadcast_to(np.arange(self.num_states, dtype=np.int32)[:, None],
                            (self.num_states, vocab)).copy()
    for pos in range(int(lengths.max(initial=0))):
      active = order[:int(np.sum(lengths > pos))]          # tokens with a char at `pos`
      classes = np.array([self.char_class.get(token_texts[t][pos], 0) for t in active],
                         np.int32)
      table[:, active] = self.delta[table[:, active], classes[None, :]]
    return table

  def first_stop(self, text: str, start: int = 0) -> Optional[int]:
    """Start of the first completed stop string ending after `start`, or None.

    "First completed" is the occurrence with the smallest end (ties: the longest), which
    is where the on-device automaton stops.
    """
    best = None
    for s in self.stop_strings:
      i = text.find(s, max(0, start - len(s) + 1))
      if i >= 0:
        key = (i + len(s), i)
        best = key if best is None or key < best else best
    return None if best is None else best[1]

  def stop_end(self, text: str, start: int) -> int:
    """End of the stop string `first_stop` found at `start`: the shortest one occurring
    there (the first completed); `start` itself if none does."""
    return start + min((len(s) for s in self.stop_strings if text.startswith(s, start)),
                       default=0)


def decode_fn(tokenizer) -> Callable[[Sequence[int]], str]:
  return lambda ids: tokenizer.decode([int(i) for i in ids])


def batch_decode(tokenizer, batch: List[List[int]]) -> List[str]:
  if hasattr(tokenizer, "batch_decode"):
    return list(tokenizer.batch_decode(batch))
  if hasattr(tokenizer, "decode_batch"):
    return list(tokenizer.decode_batch(batch))
  return [tokenizer.decode(ids) for ids in batch]


def token_texts(tokenizer, vocab_size: int) -> List[str]:
  """The text each token adds when appended to a sequence, for ids [0, vocab_size).

  Decoded after an anchor token so that decoders which strip a leading space at the
  start of a text (SentencePiece) keep it. Ids the tokenizer does not know give "".
  """
  anchor: List[int] = []
  try:
    encoded = tokenizer.encode("a", add_special_tokens=False)
    anchor = list(getattr(encoded, "ids", encoded))
  except Exception:  # a tokenizer without encode: plain per-token decoding
    anchor = []
  known = len(tokenizer) if hasattr(tokenizer, "__len__") else vocab_size
  ids = list(range(min(known, vocab_size)))
  if anchor:
    base = tokenizer.decode(anchor)
    texts = batch_decode(tokenizer, [anchor + [i] for i in ids])
    texts = [t[len(base):] if t.startswith(base) else t for t in texts]
  else:
    texts = batch_decode(tokenizer, [[i] for i in ids])
  return texts + [""] * (vocab_size - len(ids))


def common_prefix_len(a: str, b: str) -> int:
  """Length of the longest common prefix of two strings."""
  if a.startswith(b):
    return len(b)
  i = 0
  while i < min(len(a), len(b)) and a[i] == b[i]:
    i += 1
  return i


def fewest_tokens_covering(decode, prefix: List[int], body: List[int], target: str) -> int:
  """Smallest k such that decode(prefix + body[:k]) starts with `target` (bisection)."""
  lo, hi = 0, len(body)
  while lo < hi:
    mid = (lo + hi) // 2
    if decode(prefix + body[:mid]).startswith(target):
      hi = mid
    else:
      lo = mid + 1
  return lo
