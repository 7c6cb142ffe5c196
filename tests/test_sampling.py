"""Sampling: checked against full-sequence forwards and host-side reference computations."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from psgpo_jax import row_compaction, sampling_loop
from psgpo_jax.batching import bucket_length
from psgpo_jax.models import CausalLM, ModelConfig, init_params
from psgpo_jax.models.feature_major import feature_major_decoding
from psgpo_jax.sampling import generate
from psgpo_jax.sampling_config import SamplingConfig
from psgpo_jax.stop_strings import StopMatcher
from psgpo_jax.token_sampling import sample_tokens

M = 24                                     # new tokens per row
# Shared buckets keep the number of compiled shapes small: most calls are [4, 32].
BASE = SamplingConfig(max_new_tokens=M, eos_ids=(), min_prompt_bucket=32, min_batch_bucket=4)


CODE = '''def fibonacci(n: int) -> list[int]:
    """Returns the first n Fibonacci numbers."""
    result, a, b = [], 0, 1
    for _ in range(n):
        result.append(a)
        a, b = b, a + b
    return result


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()


def is_palindrome(text: str) -> bool:
    cleaned = [c.lower() for c in text if c.isalnum()]
    return cleaned == cleaned[::-1]


def count_words(lines):
    counts = {}
    for line in lines:
        for word in line.split():
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


if __name__ == "__main__":
    print(fibonacci(10), is_palindrome("A man, a plan"), count_words(["a b", "b c"]))
'''


@pytest.fixture(scope="module")
def tokenizer():
  """A small byte-level BPE trained on `CODE` (ASCII only, a few hundred tokens)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False)
  tok.train_from_iterator([CODE], trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer):
  """(cfg, params): a tiny Qwen2 with logits spread enough that argmax has no near-ties."""
  cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    initializer_range=0.2)
  return cfg, jax.jit(lambda key: init_params(CausalLM(cfg), key))(jax.random.PRNGKey(0))


def _prompts(tokenizer, lengths, seed=0):
  """Prompts of the given lengths cut from tokenized code."""
  ids = tokenizer.encode(CODE, add_special_tokens=False)
  rng = np.random.RandomState(seed)
  return [ids[s:s + n] for n, s in zip(lengths, rng.randint(0, len(ids) - 64, len(lengths)))]


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return jax.jit(lambda p, t, m: CausalLM(cfg).apply({"params": p}, t, attention_mask=m))


def _full_logits(cfg, params, seqs, width):
  """Full-sequence forward of right-padded sequences: [B, width, V] float32."""
  tokens = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], mask[i, :len(s)] = s, 1
  return np.asarray(_forward(cfg)(params, tokens, mask))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --------------------------------------------------------------- token sampling --


def _reference_probs(logits, temperature, top_k, top_p):
  """The filtered sampling distribution, computed with a sort (numpy)."""
  scaled = logits / temperature
  order = np.argsort(-scaled)
  keep = np.zeros(len(logits), bool)
  keep[order[:top_k or len(logits)]] = True
  probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
  probs /= probs.sum()
  if top_p < 1.0:
    sorted_p = probs[order]
    before = np.cumsum(sorted_p) - sorted_p
    nucleus = np.zeros(len(logits), bool)
    nucleus[order[before < top_p]] = True
    probs = np.where(nucleus & keep, probs, 0.0)
    probs /= probs.sum()
  return probs


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (1.0, 6, 0.8)])
def test_sample_tokens_follows_the_filtered_distribution(temperature, top_k, top_p):
  """Stratified uniforms: each token's count is within one of n * its probability."""
  logits = np.random.RandomState(1).normal(0, 1.5, 12).astype(np.float32)
  n = 4000
  u = (np.arange(n) + 0.5) / n
  tokens, logps = jax.jit(lambda l, u: sample_tokens(
      l, u, temperature=temperature, top_k=top_k, top_p=top_p))(
          jnp.broadcast_to(logits, (n, 12)), jnp.asarray(u, jnp.float32))
  counts = np.bincount(np.asarray(tokens), minlength=12)
  expected = _reference_probs(logits.astype(np.float64), temperature, top_k, top_p)
  np.testing.assert_array_less(np.abs(counts - n * expected), 1.5)
  policy = _log_softmax(logits.astype(np.float64) / temperature)
  np.testing.assert_allclose(np.asarray(logps), policy[np.asarray(tokens)], atol=1e-5)


def test_sample_tokens_greedy_is_argmax_with_temperature_one_logprobs():
  logits = np.random.RandomState(2).normal(0, 2, (5, 30)).astype(np.float32)
  tokens, logps = sample_tokens(jnp.asarray(logits), jnp.full((5,), 0.3), greedy=True,
                                temperature=0.5)
  np.testing.assert_array_equal(tokens, logits.argmax(-1))
  np.testing.assert_allclose(logps, _log_softmax(logits).max(-1), atol=1e-6)


# ----------------------------------------------------------------- stop strings --


def test_stop_matcher_agrees_with_substring_search():
  """Automaton (char and token level) vs `in`, with overlapping stop strings."""
  stops = ("abab", "ba", "\ndef ", "bb")
  matcher = StopMatcher(stops)
  rng = np.random.RandomState(3)
  alphabet = list("ab\ndef x")
  vocab = ["".join(rng.choice(alphabet, rng.randint(0, 4))) for _ in range(40)]
  table = matcher.token_table(vocab)
  for _ in range(300):
    toks = rng.randint(0, len(vocab), rng.randint(1, 8))
    text = "".join(vocab[t] for t in toks)
    state = 0
    for t in toks:
      state = table[state, t]
    hit = any(s in text for s in stops)
    assert (state == matcher.match_state) == hit, text
    assert (matcher.feed(0, text) == matcher.match_state) == hit
    if hit:
      ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
      assert matcher.first_stop(text) == min(ends)[1]
    split = rng.randint(0, len(text) + 1)              # continuing a partial response
    late = any(text.find(s, i) == i for s in stops for i in range(len(text))
               if i + len(s) > split)
    state = matcher.feed(matcher.resume_state(text[:split]), text[split:])
    assert (state == matcher.match_state) == late, (text, split)
    assert (matcher.first_stop(text, split) is not None) == late


def _offsets(tokenizer, toks):
  """Character offset where each token starts, and the text length after the last."""
  return [len(tokenizer.decode(toks[:i])) for i in range(len(toks) + 1)]


def _unique_stop(tokenizer, texts, toks, row, at):
  """A 3-character ASCII string of row `row` straddling the start of token `at`, seen in
  no other row."""
  offsets = _offsets(tokenizer, toks)
  for i in itertools.chain(range(at, len(toks)), range(at - 1, 0, -1)):
    s = texts[row][offsets[i] - 1:offsets[i] + 2]
    if (len(s) == 3 and s.isascii() and
        all(s not in t for j, t in enumerate(texts) if j != row)):
      return s
  raise AssertionError("no unique stop string found")


def _unique_token(tokens, row, at):
  """A token of row `row` at position >= at that appears nowhere else in `tokens`."""
  for j in range(at, tokens.shape[1]):
    if (tokens == tokens[row, j]).sum() == 1:
      return int(tokens[row, j])
  raise AssertionError("no unique token found")


def test_stop_strings_and_eos_end_rows_independently(model, tokenizer):
  """Rows end on their own stop string or EOS, or run to the end; the reference is the
  same key's run without either, cut on the host by a plain search."""
  cfg, params = model
  prompts = _prompts(tokenizer, [5, 9, 3, 12], seed=4)
  rng = jax.random.PRNGKey(5)
  free = generate(params, cfg, prompts, rng, BASE, tokenizer)
  assert (free.lengths == M).all()
  texts = [tokenizer.decode(t) for t in free.tokens.tolist()]
  stops = (_unique_stop(tokenizer, texts, free.tokens[0].tolist(), 0, 8),
           _unique_stop(tokenizer, texts, free.tokens[3].tolist(), 3, 10))
  # Row 1 ends on EOS; row 3 also holds an EOS id, after its stop string.
  eos = (_unique_token(free.tokens, 1, 6), _unique_token(free.tokens, 3, 18))
  out = generate(params, cfg, prompts, rng, BASE.replace(eos_ids=eos, stop_strings=stops),
                 tokenizer)
  reasons = []
  for row in range(len(prompts)):
    toks = free.tokens[row].tolist()
    eos_at = next((j for j, t in enumerate(toks) if t in eos), None)
    body = toks[:eos_at] if eos_at is not None else toks
    text = tokenizer.decode(body)
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if found:                              # cut at the first completed stop string
      cut = min(found)[1]
      keep = next(i for i, o in enumerate(_offsets(tokenizer, body)) if o >= cut)
      reason, want_text = "stop", tokenizer.decode(body[:keep])
      assert want_text.startswith(text[:cut]) and len(want_text) < cut + 3
    elif eos_at is not None:
      keep, reason, want_text = eos_at + 1, "eos", text
    else:
      keep, reason, want_text = M, "length", text
    reasons.append(reason)
    assert out.finish_reason[row] == reason, row
    assert out.lengths[row] == keep, row
    np.testing.assert_array_equal(out.tokens[row, :keep], toks[:keep])
    assert (out.tokens[row, keep:] == 0).all() and out.mask[row].sum() == keep
    np.testing.assert_allclose(out.logprobs[row, :keep], free.logprobs[row, :keep], atol=1e-5)
    assert (out.logprobs[row, keep:] == 0).all()
    assert out.texts[row] == want_text
  assert reasons == ["stop", "eos", "length", "stop"]


# ---------------------------------------------------------- against the forward --


def test_greedy_equals_stepwise_argmax_of_the_full_forward(model, tokenizer):
  cfg, params = model
  prompts = _prompts(tokenizer, [3, 9, 17], seed=6)
  out = generate(params, cfg, prompts, jax.random.PRNGKey(0), BASE.replace(greedy=True),
                 tokenizer)
  seqs = [list(p) for p in prompts]
  want_logps = [[] for _ in prompts]
  for _ in range(M):
    logits = _full_logits(cfg, params, seqs, 48)
    for i, s in enumerate(seqs):
      last = logits[i, len(s) - 1]
      want_logps[i].append(_log_softmax(last)[last.argmax()])
      s.append(int(last.argmax()))
  np.testing.assert_array_equal(out.tokens, [s[len(p):] for s, p in zip(seqs, prompts)])
  np.testing.assert_allclose(out.logprobs, want_logps, atol=1e-4)
  assert out.mask.all() and out.finish_reason == ["length"] * 3
  assert out.texts == [tokenizer.decode(t) for t in out.tokens.tolist()]


def test_sampled_logprobs_equal_log_softmax_of_the_full_forward(model, tokenizer):
  cfg, params = model
  prompts = _prompts(tokenizer, [5, 12], seed=7)
  temperature, top_k, top_p = 0.7, 20, 0.9
  out = generate(params, cfg, prompts, jax.random.PRNGKey(1),
                 BASE.replace(temperature=temperature, top_k=top_k, top_p=top_p,
                              num_samples=2), tokenizer)
  np.testing.assert_array_equal(out.prompt_index, [0, 0, 1, 1])
  seqs = [list(prompts[p]) + out.tokens[row].tolist() for row, p in enumerate(out.prompt_index)]
  logits = _full_logits(cfg, params, seqs, 48)
  for row, p in enumerate(out.prompt_index):
    start = len(prompts[p]) - 1
    scaled = logits[row, start:start + M] / temperature            # predicts each new token
    policy = _log_softmax(scaled)
    np.testing.assert_allclose(out.logprobs[row], policy[np.arange(M), out.tokens[row]],
                               atol=1e-4)
    for t, tok in enumerate(out.tokens[row]):                     # inside top-k and nucleus
      order = np.argsort(-scaled[t])[:top_k]
      assert tok in order
      probs = np.exp(scaled[t, order] - scaled[t, order].max())
      probs /= probs.sum()
      rank = int(np.where(order == tok)[0][0])
      assert probs[:rank].sum() < top_p + 1e-5
  assert len(set(map(tuple, out.tokens.tolist()))) == 4              # the samples differ


# ----------------------------------------------------- prefixes, padding, meshes --


def _prefix_case(tokenizer):
  prompts = _prompts(tokenizer, [4, 6, 9], seed=8)
  lines = tokenizer.encode("    x = 1\n    for i in range(3):\n        y = x\n",
                           add_special_tokens=False)
  return prompts, [None, lines[:5], lines]


def _assert_same(a, b, texts=True):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  np.testing.assert_array_equal(a.mask, b.mask)
  assert a.finish_reason == b.finish_reason
  if texts:
    assert a.texts == b.texts


def test_prefix_continuation_equals_generating_from_the_concatenated_prompt(model, tokenizer):
  """Mixed fresh prompts and partial responses, 3 samples per prefix from one prefill."""
  cfg, params = model
  prompts, prefixes = _prefix_case(tokenizer)
  config = BASE.replace(num_samples=3)
  rng = jax.random.PRNGKey(9)
  out = generate(params, cfg, prompts, rng, config, tokenizer, prefixes=prefixes)
  concat = [p + (r or []) for p, r in zip(prompts, prefixes)]
  ref = generate(params, cfg, concat, rng, config, tokenizer)
  _assert_same(out, ref)
  np.testing.assert_array_equal(out.prompt_index, np.repeat([0, 1, 2], 3))
  assert len(set(map(tuple, out.tokens[:3].tolist()))) == 3


def test_continuing_a_prefix_of_a_stopped_response_ends_at_the_same_place(model, tokenizer):
  """Greedy: prefix + continuation == the full stopped response, also when the prefix
  ends inside the stop string (then the continuation keeps nothing)."""
  cfg, params = model
  prompt = _prompts(tokenizer, [7], seed=10)[0]
  greedy = BASE.replace(greedy=True)
  free = generate(params, cfg, [prompt], jax.random.PRNGKey(0), greedy, tokenizer)
  toks = free.tokens[0].tolist()
  stop = _unique_stop(tokenizer, free.texts, toks, 0, 8)
  config = greedy.replace(stop_strings=(stop,))
  full = generate(params, cfg, [prompt], jax.random.PRNGKey(0), config, tokenizer)
  keep = int(full.lengths[0])
  assert full.finish_reason == ["stop"] and keep >= 3
  cuts = sorted({1, keep // 2, keep - 1, keep})
  out = generate(params, cfg, [prompt] * len(cuts), jax.random.PRNGKey(0), config, tokenizer,
                 prefixes=[toks[:j] for j in cuts])
  for row, j in enumerate(cuts):
    assert toks[:j] + out.tokens[row, :out.lengths[row]].tolist() == toks[:keep], j
    assert tokenizer.decode(toks[:j]) + out.texts[row] == full.texts[0]
    assert out.finish_reason[row] == "stop"
  # A stop string that lies wholly inside the prefix does not end the continuation.
  done = next(i for i in range(M + 1) if stop in tokenizer.decode(toks[:i]))
  late = generate(params, cfg, [prompt], jax.random.PRNGKey(0), config, tokenizer,
                  prefixes=[toks[:done]])
  kept = late.tokens[0, :late.lengths[0]].tolist()
  overlap = min(len(kept), M - done)
  assert overlap > 1 and kept[:overlap] == toks[done:done + overlap]
  text = tokenizer.decode(toks[:done] + kept)
  assert (late.finish_reason[0] == "stop") == (text.find(stop, text.find(stop) + 1) >= 0)


def test_left_padding_of_mixed_length_prompts_does_not_change_results(model, tokenizer):
  cfg, params = model
  short, long1, long2 = _prompts(tokenizer, [5, 40, 20], seed=11)
  config = BASE
  rng = jax.random.PRNGKey(12)
  alone = generate(params, cfg, [short], rng, config, tokenizer)
  batch = generate(params, cfg, [short, long1, long2], rng, config, tokenizer)
  np.testing.assert_array_equal(batch.tokens[0], alone.tokens[0])
  np.testing.assert_allclose(batch.logprobs[0], alone.logprobs[0], atol=1e-5)


def test_compacting_ended_rows_out_of_the_batch_changes_no_output(model, tokenizer):
  """With ragged endings (EOS, stop strings, the length limit), a loop that drops ended
  rows as the batch halves makes exactly the rows of one that decodes them all."""
  cfg, params = model
  assert row_compaction.compaction_levels(64, 2) == (64, 32, 16)
  assert row_compaction.compaction_levels(48, 9) == (48, 24, 12) == row_compaction.compaction_levels(48, 3)
  assert row_compaction.compaction_levels(64, 0) == (64,) == row_compaction.compaction_levels(64, 9, 64)
  prompts, prefixes = _prefix_case(tokenizer)
  prompts, prefixes = prompts * 2, prefixes * 2
  config = BASE.replace(num_samples=5, stop_strings=("(", "e"), eos_ids=(7, 8, 9),
                        temperature=1.5)
  rng = jax.random.PRNGKey(21)
  whole = generate(params, cfg, prompts, rng, config.replace(compact_halvings=0), tokenizer,
                   prefixes=prefixes)
  compact = generate(params, cfg, prompts, rng, config.replace(compact_halvings=3), tokenizer,
                     prefixes=prefixes)
  _assert_same(compact, whole)
  lengths = np.sort(whole.lengths)                # 40 rows (30 real): most end early
  assert lengths[len(lengths) // 2] < M // 2 and lengths[-1] > lengths[len(lengths) // 2] + 3
  assert {"stop", "eos"} <= set(whole.finish_reason)


def test_feature_major_and_batch_major_decoding_sample_the_same_rows(model, tokenizer):
  """The decode layouts (sampling.decode_layout) are the same math: the same tokens,
  log-probs to float rounding, endings and texts, with prefixes, stop strings, EOS and
  row compaction; "auto" is feature-major on this CPU without a mesh for small batches."""
  cfg, params = model
  prompts, prefixes = _prefix_case(tokenizer)
  config = BASE.replace(num_samples=4, stop_strings=("(",), eos_ids=(7, 8), temperature=1.3)
  rng = jax.random.PRNGKey(5)
  rows = {layout: generate(params, cfg, prompts, rng, config.replace(decode_layout=layout),
                           tokenizer, prefixes=prefixes)
          for layout in ("feature_major", "batch_major")}
  _assert_same(rows["feature_major"], rows["batch_major"])
  assert len(set(rows["batch_major"].finish_reason)) > 1        # ragged endings exercised
  assert feature_major_decoding("auto", on_mesh=False, rows=16)
  assert not feature_major_decoding("auto", on_mesh=False, rows=256)
  assert not feature_major_decoding("auto", on_mesh=True, rows=16)
  assert feature_major_decoding("feature_major", on_mesh=True, rows=256)
  assert not feature_major_decoding("batch_major", on_mesh=False, rows=16)
  with pytest.raises(ValueError, match="decode_layout='rows' must be one of"):
    BASE.replace(decode_layout="rows")


def test_sharded_over_the_data_axis_matches_one_device(model, tokenizer):
  cfg, params = model
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
  prompts, prefixes = _prefix_case(tokenizer)
  config = BASE.replace(num_samples=3, stop_strings=("(", "e"), eos_ids=(7, 8, 9))
  rng = jax.random.PRNGKey(9)
  single = generate(params, cfg, prompts, rng, config, tokenizer, prefixes=prefixes)
  sharded = generate(params, cfg, prompts, rng, config, tokenizer, prefixes=prefixes, mesh=mesh)
  _assert_same(sharded, single)
  assert "stop" in single.finish_reason and len(set(single.lengths.tolist())) > 2


def test_deterministic_per_key_and_compiled_once_per_bucket(model, tokenizer):
  cfg, params = model
  config = BASE
  first = generate(params, cfg, _prompts(tokenizer, [5, 9, 14], seed=13), jax.random.PRNGKey(3),
                   config, tokenizer)
  key = next(k for k in sampling_loop.TRACE_COUNTS if k[0] == cfg and k[1].max_new_tokens == M
             and k[1].num_samples == 1 and not k[1].greedy and not k[1].use_stop)
  traces = sampling_loop.TRACE_COUNTS[key]
  again = generate(params, cfg, _prompts(tokenizer, [5, 9, 14], seed=13), jax.random.PRNGKey(3),
                   config, tokenizer)
  _assert_same(first, again)
  untokenized = generate(params, cfg, _prompts(tokenizer, [5, 9, 14], seed=13),
                         jax.random.PRNGKey(3), config)
  _assert_same(untokenized, first, texts=False)
  assert untokenized.texts is None
  other = generate(params, cfg, _prompts(tokenizer, [2, 16, 11, 7], seed=14),
                   jax.random.PRNGKey(4), config, tokenizer)
  assert not np.array_equal(other.tokens[:3], first.tokens)
  assert sampling_loop.TRACE_COUNTS[key] == traces          # same buckets: no new compilation


def test_config_validation_and_from_dict():
  config = SamplingConfig.from_dict({"max_new_tokens": 8, "top_p": 0.9,
                                     "stop_strings": "\ndef ,\nclass "})
  assert config.stop_strings == ("\ndef ", "\nclass ")
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="Unknown"):
    SamplingConfig.from_dict({"max_tokens": 8})
  assert bucket_length(17, (), 16) == 32 and bucket_length(3, (), 16) == 16
  assert bucket_length(70, (64, 96, 128), 16) == 96
  assert bucket_length(300, (64, 96, 128)) == 384      # past the largest: its multiple


def test_evaluation_on_a_mesh_matches_one_device(model, tokenizer):
  """`evaluation.evaluate_policy(..., mesh=...)` (the eval stage on the run's mesh) samples
  and scores exactly what one device does."""
  from psgpo_jax import evaluation                            # pylint: disable=import-outside-toplevel
  from psgpo_jax.data.record import Problem                   # pylint: disable=import-outside-toplevel
  from psgpo_jax.sandbox.spec import AssertTests              # pylint: disable=import-outside-toplevel
  from psgpo_jax.sandbox import Sandbox                       # pylint: disable=import-outside-toplevel
  cfg, params = model
  problems = [Problem(id=f"t/{i}", prompt=f"def f(x):\n    return x + {i}",
                      tests=AssertTests(tests=(f"assert f(1) == {1 + i}",)), entry_point="f",
                      source="synthetic") for i in range(3)]
  config = BASE.replace(num_samples=2, max_new_tokens=8, stop_strings=("\n",))
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
  with Sandbox(num_workers=1) as sandbox:
    single, sharded = [evaluation.evaluate_policy(params, cfg, tokenizer, problems, sandbox,
                                                  config, seed=3, show_progress=False, mesh=m)
                       for m in (None, mesh)]
  assert [s["completion"] for s in sharded["samples"]] == \
      [s["completion"] for s in single["samples"]]
  assert sharded["summary"] == single["summary"] and len(single["samples"]) == 6
  # The mesh does reach the sampler: one without a batch axis (data, fsdp) is refused.
  with pytest.raises(ValueError, match="splits rows over the batch axes"):
    evaluation.evaluate_policy(params, cfg, tokenizer, problems, None, config, seed=3,
                               mesh=Mesh(np.array(jax.devices()), ("tensor",)))


def test_a_fresh_response_that_is_only_its_stop_string_keeps_the_stop_tokens(model, tokenizer):
  """Its text is empty, but the tokens that wrote the stop string stay in the output, so
  that RL has an action to reward (no outcome reward can sit on zero tokens)."""
  cfg, params = model
  prompts = _prompts(tokenizer, [5, 9], seed=12)
  greedy = BASE.replace(greedy=True)
  free = generate(params, cfg, prompts, jax.random.PRNGKey(0), greedy, tokenizer)
  stop = free.texts[0][:2]
  assert len(stop) == 2
  out = generate(params, cfg, prompts, jax.random.PRNGKey(0),
                 greedy.replace(stop_strings=(stop,)), tokenizer)
  assert out.finish_reason[0] == "stop" and out.texts[0] == ""
  kept = out.tokens[0, :out.lengths[0]].tolist()
  assert 1 <= len(kept) and kept == free.tokens[0, :len(kept)].tolist()
  assert tokenizer.decode(kept).startswith(stop)
  assert not tokenizer.decode(kept[:-1]).startswith(stop)     # the fewest such tokens
