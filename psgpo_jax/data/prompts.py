"""Prompt formats and stop strings of the benchmarks: plain completion or the chat template.

`plain` conditions the policy on the benchmark's own prompt text (HumanEval: the code
prefix, completed after the docstring; MBPP: the task and its tests; LiveCodeBench: the
question, ending inside a ```python block) and runs `program_prefix + response`.

`chat` puts that task into one user message and renders it with the tokenizer's own chat
template (`tokenizer.apply_chat_template`, read from tokenizer_config.json, as an
instruct checkpoint ships it). The model answers in chat form; the program is the code of
the response's first fenced block (`record.fenced_code`), and the reference a policy is
fine-tuned on is that block. Stop strings follow the format: function completion stops
where a new top-level statement starts, whole programs where tests or a new task start,
and chat answers after the closing fence (EOS, e.g. `<|im_end|>`, ends them too).
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

from psgpo_jax.data.problems import LCB_ANSWER
from psgpo_jax.data.record import Problem

PROMPT_FORMATS = ("plain", "chat")

# Function completion (HumanEval, the synthetic suite): stop at the next top-level
# statement. Whole programs (MBPP, APPS) stop where the model starts writing tests or a
# new task; LiveCodeBench's prompt opens a ```python block the answer closes.
FUNCTION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")
PROGRAM_STOPS = ("\nassert ", "\nif __name__", "\nprint(", "\n```")
STOP_STRINGS = {"synthetic": FUNCTION_STOPS, "humaneval": FUNCTION_STOPS,
                "mbpp": PROGRAM_STOPS, "apps": PROGRAM_STOPS + ("\nQUESTION:",),
                "livecodebench": ("```",)}
CHAT_STOPS = ("\n```\n",)            # after the first closing fence; EOS also ends

HUMANEVAL_CHAT = ("Complete the following Python function. Answer with the complete "
                  "function, imports included, in one ```python code block.\n"
                  "```python\n{prompt}```")
PROGRAM_CHAT = "{prompt}\nAnswer with the complete program in one ```python code block."
LCB_CHAT_ANSWER = "### Answer: (use the provided format with backticks)\n"


def stop_strings(source: str, prompt_format: str = "plain") -> Tuple[str, ...]:
  """The stop strings of a data source in a prompt format.

  Args:
    source: "synthetic" | "humaneval" | "mbpp" | "livecodebench" | "apps".
    prompt_format: "plain" | "chat".
  Returns:
    the strings that end a response (the sampler cuts the text before them).
  """
  _check_format(prompt_format)
  if prompt_format == "chat":
    return CHAT_STOPS
  if source not in STOP_STRINGS:
    raise ValueError(f"No stop strings known for data.source={source!r}; set "
                     f"sampling.stop_strings to a comma-separated list.")
  return STOP_STRINGS[source]


def resolve_stop_strings(config, source: Optional[str] = None) -> None:
  """Replaces `config.sampling.stop_strings == "auto"` by the data source's own, in place.

  Args:
    config: a pipeline ConfigDict (`data.source`, `data.prompt_format`, `sampling`).
    source: the problems' source when it is not `data.source` (a tfds set's).
  """
  if config.sampling.stop_strings == "auto":
    stops = stop_strings(source or config.data.source, config.data.get("prompt_format", "plain"))
    config.sampling.stop_strings = ",".join(stops)


def fence(code: str) -> str:
  """`code` as a chat answer: one ```python block (code ends with one newline inside)."""
  return "```python\n" + code.rstrip("\n") + "\n```"


def chat_message(problem: Problem) -> str:
  """The user message of a problem in chat form (the plain prompt, restated as a task)."""
  if problem.source == "humaneval":
    return HUMANEVAL_CHAT.format(prompt=problem.prompt)
  prompt = problem.prompt
  if problem.source == "livecodebench" and prompt.endswith(LCB_ANSWER):
    return prompt[:-len(LCB_ANSWER)] + LCB_CHAT_ANSWER
  return PROGRAM_CHAT.format(prompt=prompt.rstrip("\n"))


def chat_prompt(tokenizer: Any, message: str, system: str = "") -> str:
  """`message` as one user turn rendered by the tokenizer's chat template.

  Args:
    tokenizer: a `transformers` tokenizer whose `chat_template` is set (instruct models
      ship it in tokenizer_config.json).
    message: the user's text.
    system: an optional system message ("" = the template's default, if any).
  Returns:
    the prompt text, ending with the assistant turn's opening (generation prompt).
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("data.prompt_format='chat' needs a tokenizer with a chat template "
                     "(the 'chat_template' of an instruct model's tokenizer_config.json); "
                     "this one has none. Use data.prompt_format=plain, or point "
                     "tokenizer.path at an instruct checkpoint's directory.")
  messages = ([{"role": "system", "content": system}] if system else [])
  messages.append({"role": "user", "content": message})
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def as_chat(problem: Problem, tokenizer: Any, system: str = "") -> Problem:
  """The problem in chat form: templated prompt, fenced reference, code from the fence.

  HumanEval's program is then the answer's code alone (the whole function), so its
  program_prefix (the prompt) is dropped and its reference becomes prompt + solution.
  """
  reference = problem.reference
  prefix = problem.program_prefix
  if problem.source == "humaneval":
    reference = None if reference is None else problem.prompt + reference
    prefix = ""
  return dataclasses.replace(
      problem, prompt=chat_prompt(tokenizer, chat_message(problem), system),
      program_prefix=prefix, reference=None if reference is None else fence(reference),
      response_format="fenced")


def format_problems(problems: Sequence[Problem], tokenizer: Any, prompt_format: str,
                    system: str = "") -> List[Problem]:
  """`problems` in a prompt format: unchanged for "plain", `as_chat` for "chat"."""
  _check_format(prompt_format)
  if prompt_format == "plain":
    return list(problems)
  return [as_chat(p, tokenizer, system) for p in problems]


def _check_format(prompt_format: str) -> None:
  if prompt_format not in PROMPT_FORMATS:
    raise ValueError(f"data.prompt_format={prompt_format!r}; choose one of {PROMPT_FORMATS}.")
