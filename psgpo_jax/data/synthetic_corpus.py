"""The synthetic suite's wrong lines, noisy warm-up corpus and byte-level BPE tokenizer.

`corrupt_line` / `corrupt_response` make wrong responses whose first error line is known
(checked with the oracle), `sft_corpus` the (prompt, response) pairs of the supervised
warm-up, and `build_tokenizer` the suite's tokenizer, trained on both.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from psgpo_jax.data.record import Problem
from psgpo_jax.data.synthetic import ARGS, LOCALS, make_split
from psgpo_jax.data.synthetic_oracle import INDENT, first_error_line, response_lines

EOS_TOKEN = "<|endoftext|>"


# ---------------------------------------------------------------------------------------
# Wrong lines, noisy warm-up data.
# ---------------------------------------------------------------------------------------


def _mutations(code: str, names: Sequence[str], rng: np.random.Generator) -> List[str]:
  """Plausible wrong versions of one of the suite's code lines (unindented), shuffled.

  One space-separated token changes: a digit, a name (to another of `names`), or an operator to a
  related one (+ -, * +, // %, > <).
  """
  out: List[str] = []
  digits = [str(d) for d in range(1, 10)]
  op_swaps = {"+": ["-", "*"], "-": ["+"], "*": ["+"], "//": ["%"], "%": ["//"],
              ">": ["<"], "<": [">"]}
  tokens = code.split()
  for i, tok in enumerate(tokens):
    alts: List[str] = []
    if tok.isdigit():
      alts = [d for d in digits if d != tok]
    elif tok in names:
      alts = [n for n in names if n != tok]
    elif tok in op_swaps:
      alts = op_swaps[tok]
    for alt in alts:
      out.append(" ".join(tokens[:i] + [alt] + tokens[i + 1:]))
  order = rng.permutation(len(out))
  return [out[i] for i in order]


def corrupt_line(problem: Problem, response: str, index: int, rng: np.random.Generator
                 ) -> Optional[str]:
  """Replaces line `index` of `response` by a plausible wrong line.

  The wrong line is chosen so that the oracle's first error of the result is exactly
  `index` (given that the earlier lines are right). Later lines are kept as they are.

  Returns:
    the corrupted response, or None when no mutation of that line is wrong on the tests.
  """
  lines = response_lines(response)
  code = lines[index][len(INDENT):]
  names = list(ARGS) + list(LOCALS[:index + 1])
  for wrong in _mutations(code, names, rng):
    candidate = lines[:index] + [INDENT + wrong] + lines[index + 1:]
    text = "".join(l + "\n" for l in candidate)
    if first_error_line(problem, text) == index:
      return text
  return None


def corrupt_response(problem: Problem, rng: np.random.Generator,
                     index: Optional[int] = None) -> Tuple[str, int]:
  """A wrong response with a known first error line.

  Args:
    problem: a synthetic problem.
    rng: numpy Generator.
    index: the line to corrupt; a random line when None.
  Returns:
    (response, first_error_index): the reference with line `index` replaced by a
    plausible wrong line (later lines unchanged), and `index`.
  """
  reference = problem.reference or ""
  num_lines = len(response_lines(reference))
  order = [index] if index is not None else rng.permutation(num_lines).tolist()
  for k in order:
    text = corrupt_line(problem, reference, int(k), rng)
    if text is not None:
      return text, int(k)
  raise ValueError(f"no line of {problem.id} could be corrupted at {order}")


def sft_corpus(problems: Sequence[Problem], noise: float = 0.0, seed: int = 0
               ) -> List[Tuple[str, str]]:
  """(prompt, response) pairs for the supervised warm-up.

  Args:
    problems: synthetic problems (their references are the targets).
    noise: probability that each line is replaced by a plausible wrong line (later lines
      stay the reference's), so a policy fitted on it is weak but not hopeless.
    seed: int seed of the noise.
  Returns:
    list of (prompt, response) string pairs, one per problem, in order.
  """
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f"noise={noise} must be in [0, 1].")
  rng = np.random.default_rng([seed, 104729])
  pairs = []
  for problem in problems:
    reference = problem.reference or ""
    lines = response_lines(reference)
    for k in range(len(lines)):
      if noise > 0 and rng.random() < noise:
        wrong = corrupt_line(problem, reference, k, rng)
        if wrong is not None:
          lines[k] = response_lines(wrong)[k]
    pairs.append((problem.prompt, "".join(l + "\n" for l in lines)))
  return pairs


# ---------------------------------------------------------------------------------------
# The suite's tokenizer.
# ---------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_corpus(seed: int = 0, num_problems: int = 200) -> List[str]:
  """Texts the tokenizer is trained on: prompts, references and plausible wrong lines."""
  problems = make_split(seed, num_problems, range(1, 13), "train", unique=False)
  texts = []
  for p, (_, noisy) in zip(problems, sft_corpus(problems, noise=0.3, seed=seed)):
    texts.append(p.prompt + (p.reference or ""))
    texts.append(noisy)
  return texts


def build_tokenizer(out_dir: str, seed: int = 0, vocab_size: int = 512,
                    num_problems: int = 200, overwrite: bool = False) -> str:
  """Trains (or reuses) the suite's byte-level BPE tokenizer and saves it to `out_dir`.

  Pre-tokenization splits at newlines first (a newline is always its own token, so line
  ends and prompt/response boundaries tokenize the same in any context), then as GPT-2
  does. The full byte alphabet is kept, so any text encodes. `<|endoftext|>` is the only
  special token: EOS and pad. Reused when `out_dir` already holds a tokenizer trained with
  the same settings.

  Args:
    out_dir: directory to write tokenizer.json, tokenizer_config.json,
      special_tokens_map.json (loadable by `transformers.AutoTokenizer.from_pretrained`).
    seed: seed of the problems it is trained on.
    vocab_size: upper bound on the vocabulary (the suite's text saturates well below 1024).
  Returns:
    out_dir.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  settings = {"seed": seed, "vocab_size": vocab_size, "num_problems": num_problems,
              "format": 1}
  config_path = os.path.join(out_dir, "tokenizer_config.json")
  if not overwrite and all(os.path.exists(os.path.join(out_dir, f)) for f in TOKENIZER_FILES):
    with open(config_path) as f:
      if json.load(f).get("psgpo_synthetic") == settings:
        return out_dir
  tokenizer = Tokenizer(models.BPE(unk_token=None))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(tokenizer_corpus(seed, num_problems), trainer=trainer)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "bos_token": None, "unk_token": None,
      "model_max_length": 1024, "clean_up_tokenization_spaces": False,
      "add_bos_token": False, "add_eos_token": False, "psgpo_synthetic": settings,
  }
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, f, indent=2)
  return out_dir
