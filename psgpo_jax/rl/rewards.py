"""Token-level rewards: outcome + dense PRM line rewards (with safeguards) - KL penalty.

All arrays are `[B, T]` over the padded sequence, aligned as in `psgpo_jax.rl.gae`:
position `t` is the action that emits `tokens[:, t]`, so the reward for a token sits at
that token's position, the same position as its log-probability, value and advantage.

  * outcome: at the last response token (the last position where `response_mask` is 1);
  * dense PRM: at every counted line end, i.e. the token that completes line m, where
    `prm_scores[:, t]` is the PRM's output at position t (it has seen tokens <= t, hence
    the prefix y<=m);
  * KL: at every response token, `-kl_coef * kl(logp_t, ref_logp_t)`.

Dense reward of line m (PSGPO, Dai et al. 2024), before the optional safeguards:

    d_m = lambda * s_m / N,   lambda = dense_coef_pass if the response passed else
                                       dense_coef_fail,
    s_m = PRM(x, y<=m)                         (shaping = "none")
        = Phi_m - Phi_{m'}                     (shaping = "potential" or "progress";
                                                m' the previous counted line),
    Phi_m = PRM(x, y<=m) for m < M,
    Phi_M = 0                                  ("potential": the episode's end),
          = +1 if the response passed else -1  ("progress": the verified outcome on the
                                                PRM's label scale replaces its guess),
    Phi before line 1 = shaping_baseline,
    N   = number of counted lines (normalize_by_lines), else 1.

Potential shaping is Ng et al.'s (1999) with gamma = 1: the terminal potential is 0, so
the shaped rewards of a response sum to -lambda * shaping_baseline / N. They move credit
between lines (a line that raises the PRM's score earns, one that lowers it pays); with
shaping_baseline = 0 (the default) the sum is 0 whatever the response wrote, so shaping
cannot change which policy is optimal. Two cases where it can: a non-zero baseline adds a
per-response constant that depends on the outcome (lambda) and, with normalize_by_lines,
on the number of lines, i.e. an outcome and length reward; and with rl.gamma < 1 the
discounted sum no longer telescopes (Ng's form would need gamma * Phi_m - Phi_{m'}). The
PRM's score after the last line is not used.

"progress" is the same telescoping sum with the verified outcome as the final potential,
so every line earns the change it made to the estimated chance of success (the "progress"
of process advantage verifiers, arXiv 2410.08146), the last line included: a response that
stops after a few right-looking lines pays at its last line. Its rewards sum to
lambda * (+-1 - shaping_baseline) / N, i.e. an extra outcome reward; no response can farm
them. The plain sum form ("none") can be farmed: a PRM rates a short right-so-far prefix
highly whether or not the response goes on, so at dense_coef_fail = 1 policies learn to
stop early (docs/rl_tuning.md, round 7).

Counted lines are the response's line ends, minus blank/comment-only lines when
`skip_trivial_lines`. Then `penalty_only` clips d_m to <= 0, and `credit = "min"`
(PURE, arXiv 2504.15275) replaces the sum form by the min form: with
q_m = min_{k >= m} d_k (suffix minimum over counted lines, q_{M+1} = 0), line m earns

    d'_m = q_m - q_{m+1},   so that   sum_{k >= m} d'_k = q_m = min_{k >= m} d_k,

i.e. the undiscounted dense return-to-go from line m is the minimum of the remaining
weighted PRM rewards rather than their sum. Every d'_m with m < M is <= 0.

`credit = "first_error"` keeps the sum form's partial credit (a response earns for every
line the PRM judges right) but closes the two ways to farm it: only the lines up to the
first one scored below 0 count (that line pays its score; the lines after it earn
nothing, so going on after an error neither pays nor costs), and a failing response
with no such line has its last line scored -1 (it stopped, or ended, where it should
have gone on: the prefix was right, the response is not). With normalize_by_lines off,
a failing response's dense return then grows with how far it got right and nothing
else; stopping early is worth exactly an error at that line.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from psgpo_jax.fields import checked_fields
from psgpo_jax.rl.kl import KL_ESTIMATORS, kl_estimate

Array = jax.Array

OUTCOMES = ("binary", "fraction")
CREDITS = ("sum", "min", "first_error")
SHAPINGS = ("none", "potential", "progress")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward weights and safeguards (the `rl.reward` config section).

  Attributes:
    outcome: "binary" (pass/fail) or "fraction" (failing responses earn the share of
      tests passed, interpolated between fail_reward and pass_reward).
    pass_reward: outcome reward of a response that passes all tests.
    fail_reward: outcome reward of a failing response (0 or -1).
    dense_coef_fail: lambda of the dense PRM reward for failing responses.
    dense_coef_pass: lambda of the dense PRM reward for passing responses.
    normalize_by_lines: divide dense rewards by the number of counted lines.
    skip_trivial_lines: no dense reward on blank/comment-only lines (not counted).
    penalty_only: clip dense rewards to <= 0.
    credit: "sum" (rewards add up), "min" (PURE min-form return-to-go) or
      "first_error" (sum up to the first line scored below 0; see the module docstring).
    shaping: "none", "potential" (line earns PRM(after) - PRM(before); the potential
      after the last line is 0, Ng et al. 1999) or "progress" (the same, with the
      verified outcome, +1 or -1, as the potential after the last line).
    shaping_baseline: PRM value before the first line, for potential / progress shaping.
    kl_coef: (initial) coefficient of the per-token KL penalty.
    kl_estimator: "k1" (logp - ref) or "k3" (exp(ref - logp) - (ref - logp) - 1).
    adaptive_kl: adapt kl_coef towards kl_target (Ziegler et al. 2019).
    kl_target: target of the mean per-token KL for the adaptive controller.
    kl_horizon: horizon (in samples) of the adaptive controller.
    hack_penalty: subtracted from the outcome reward of a response the sandbox's hack
      monitors flag (`sandbox.hack_report`; 0 = monitor only).
  """
  outcome: str = "binary"
  pass_reward: float = 1.0
  fail_reward: float = 0.0
  dense_coef_fail: float = 0.25
  dense_coef_pass: float = 0.025
  normalize_by_lines: bool = True
  skip_trivial_lines: bool = True
  penalty_only: bool = False
  credit: str = "sum"
  shaping: str = "none"
  shaping_baseline: float = 0.0
  kl_coef: float = 0.02
  kl_estimator: str = "k1"
  adaptive_kl: bool = False
  kl_target: float = 0.05
  kl_horizon: int = 1000
  hack_penalty: float = 0.0

  def __post_init__(self):
    for name, choices in (("outcome", OUTCOMES), ("credit", CREDITS), ("shaping", SHAPINGS),
                          ("kl_estimator", KL_ESTIMATORS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"rl.reward.{name}={getattr(self, name)!r}; choose one of {choices}.")
    if self.credit == "first_error" and self.shaping != "none":
      raise ValueError("rl.reward.credit='first_error' sums line scores: it needs "
                       f"rl.reward.shaping='none', not {self.shaping!r}.")
    if self.kl_coef < 0:
      raise ValueError(f"rl.reward.kl_coef={self.kl_coef} must be >= 0.")
    if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
      raise ValueError(f"rl.reward.adaptive_kl needs kl_target > 0 and kl_horizon > 0, got "
                       f"kl_target={self.kl_target}, kl_horizon={self.kl_horizon}.")

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "RewardConfig":
    """Builds the config from a mapping such as the ConfigDict `config.rl.reward`."""
    return cls(**checked_fields(cls, section, "rl.reward"))


# ---------------------------------------------------------------------------------------
# Masks.


def last_token_mask(mask: Array) -> Array:
  """One-hot of the last position where `mask` is 1 (all zeros for an empty row).

  Args:
    mask: [B, T] bool/int.
  Returns:
    [B, T] bool.
  """
  mask = jnp.asarray(mask).astype(bool)
  length = mask.shape[1]
  last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)                       # [B]
  onehot = jnp.arange(length)[None, :] == last[:, None]
  return onehot & jnp.any(mask, axis=1, keepdims=True)


def counted_line_mask(line_end_mask: Array, response_mask: Array,
                      trivial_line_mask: Optional[Array], skip_trivial_lines: bool) -> Array:
  """Line ends that earn a dense reward.

  Args:
    line_end_mask: [B, T], 1 at the last token of each line.
    response_mask: [B, T], 1 on response tokens (line ends elsewhere are ignored).
    trivial_line_mask: [B, T] or None, 1 at line ends of blank/comment-only lines.
    skip_trivial_lines: drop trivial lines.
  Returns:
    [B, T] bool.
  """
  lines = jnp.asarray(line_end_mask).astype(bool) & jnp.asarray(response_mask).astype(bool)
  if skip_trivial_lines and trivial_line_mask is not None:
    lines = lines & ~jnp.asarray(trivial_line_mask).astype(bool)
  return lines


# ---------------------------------------------------------------------------------------
# Outcome.


def outcome_rewards(passed: Array, response_mask: Array, config: RewardConfig,
                    pass_fraction: Optional[Array] = None) -> Array:
  """Outcome reward placed at the last response token.

    binary:   R = pass_reward if passed else fail_reward
    fraction: R = pass_reward if passed else fail_reward + (pass_reward - fail_reward) * f
              (f = share of tests passed; with the defaults 1/0, R = f)

  Args:
    passed: [B] bool, all tests passed.
    response_mask: [B, T].
    config: RewardConfig.
    pass_fraction: [B] float in [0, 1]; required for outcome="fraction".
  Returns:
    [B, T] float32, non-zero only at each row's last response token.
  """
  passed = jnp.asarray(passed).astype(bool)
  if config.outcome == "binary":
    fail = jnp.full(passed.shape, config.fail_reward, jnp.float32)
  else:
    if pass_fraction is None:
      raise ValueError("rl.reward.outcome='fraction' needs pass_fraction (tests passed / total).")
    frac = jnp.asarray(pass_fraction, jnp.float32)
    fail = config.fail_reward + (config.pass_reward - config.fail_reward) * frac
  outcome = jnp.where(passed, jnp.float32(config.pass_reward), fail)
  return jnp.where(last_token_mask(response_mask), outcome[:, None], 0.0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Dense PRM rewards.


def _previous_score(scores: Array, lines: Array, baseline: float) -> Array:
  """At every position t, the score at the last line end strictly before t (or baseline)."""
  length = scores.shape[1]
  idx = jnp.where(lines, jnp.arange(length)[None, :], -1)
  last_upto = jax.lax.cummax(idx, axis=1)                                       # <= t
  prev = jnp.pad(last_upto[:, :-1], ((0, 0), (1, 0)), constant_values=-1)       # < t
  gathered = jnp.take_along_axis(scores, jnp.maximum(prev, 0), axis=1)
  return jnp.where(prev >= 0, gathered, jnp.float32(baseline))


def min_form_credit(line_rewards: Array, lines: Array) -> Array:
  """PURE min-form: re-places rewards so the return-to-go is a suffix minimum.

    q_m = min_{k >= m} d_k (over lines),   q_{M+1} = 0,   d'_m = q_m - q_{m+1}
    => sum_{k >= m} d'_k = min_{k >= m} d_k.

  Args:
    line_rewards: [B, T] float, d at line positions (ignored elsewhere).
    lines: [B, T] bool, the line positions.
  Returns:
    [B, T] float32, d' at line positions, 0 elsewhere.
  """
  x = jnp.where(lines, line_rewards, jnp.inf)
  suffix_min = jax.lax.cummin(x, axis=1, reverse=True)                          # q at >= t
  after = jnp.pad(suffix_min[:, 1:], ((0, 0), (0, 1)), constant_values=jnp.inf)  # q at > t
  after = jnp.where(jnp.isinf(after), 0.0, after)
  return jnp.where(lines, suffix_min - after, 0.0).astype(jnp.float32)


def first_error_scores(scores: Array, lines: Array, passed: Array) -> Array:
  """Line scores up to the first line scored below 0, 0 after it; a failing response
  with no such line has its last line scored -1.

  Args:
    scores: [B, T] float, line scores on the [-1, 1] label scale (read at `lines`).
    lines: [B, T] bool, the counted line ends.
    passed: [B] bool.
  Returns:
    [B, T] float32, the kept scores at line positions, 0 elsewhere.
  """
  wrong = lines & (scores < 0)
  unflagged_failure = ~jnp.any(wrong, axis=1, keepdims=True) & ~passed[:, None]
  stop = last_token_mask(lines) & unflagged_failure
  scores = jnp.where(stop, -1.0, scores)
  wrong = wrong | stop
  wrong_before = jnp.cumsum(wrong, axis=1) - wrong                    # errors strictly before t
  return jnp.where(lines & (wrong_before == 0), scores, 0.0).astype(jnp.float32)


def dense_rewards(prm_scores: Array, passed: Array, line_end_mask: Array,
                  response_mask: Array, config: RewardConfig,
                  trivial_line_mask: Optional[Array] = None) -> Array:
  """Dense PRM reward at each counted line end (formulas in the module docstring).

  Args:
    prm_scores: [B, T] float, the PRM's output at each position (read at line ends).
    passed: [B] bool.
    line_end_mask: [B, T], 1 at the last token of each line.
    response_mask: [B, T].
    config: RewardConfig.
    trivial_line_mask: [B, T] or None, 1 at line ends of blank/comment-only lines.
  Returns:
    [B, T] float32, non-zero only at counted line ends.
  """
  scores = jnp.asarray(prm_scores, jnp.float32)
  lines = counted_line_mask(line_end_mask, response_mask, trivial_line_mask,
                            config.skip_trivial_lines)
  passed_b = jnp.asarray(passed).astype(bool)                                   # [B]
  coef = jnp.where(passed_b, jnp.float32(config.dense_coef_pass),
                   jnp.float32(config.dense_coef_fail))                          # [B]
  if config.normalize_by_lines:
    coef = coef / jnp.maximum(jnp.sum(lines, axis=1), 1).astype(jnp.float32)
  if config.credit == "first_error":
    scores = first_error_scores(scores, lines, passed_b)
  if config.shaping != "none":
    previous = _previous_score(scores, lines, config.shaping_baseline)
    terminal = (jnp.where(passed_b, 1.0, -1.0)[:, None] if config.shaping == "progress"
                else jnp.float32(0.0))                                           # Phi_M
    scores = jnp.where(last_token_mask(lines), terminal, scores) - previous
  line_rewards = coef[:, None] * scores
  if config.penalty_only:
    line_rewards = jnp.minimum(line_rewards, 0.0)
  if config.credit == "min":
    return min_form_credit(line_rewards, lines)
  return jnp.where(lines, line_rewards, 0.0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Composition and monitors.


def _safe_div(num: Array, den: Array) -> Array:
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)


def _line_monitors(line_end_mask: Array, response: Array, trivial_line_mask: Optional[Array],
                   config: RewardConfig) -> Tuple[Array, Dict[str, Array]]:
  """The counted line ends ([B, T] bool) and the line monitors: lines and counted lines
  per response, and the share of trivial (blank / comment-only) lines."""
  batch = response.shape[0]
  all_lines = jnp.asarray(line_end_mask).astype(bool) & response
  counted = counted_line_mask(line_end_mask, response, trivial_line_mask,
                              config.skip_trivial_lines)
  n_all = jnp.sum(all_lines.astype(jnp.float32))
  trivial = (jnp.zeros_like(all_lines) if trivial_line_mask is None
             else jnp.asarray(trivial_line_mask).astype(bool) & all_lines)
  return counted, {
      "lines_per_response": n_all / batch,
      "counted_lines_per_response": jnp.sum(counted) / batch,
      "trivial_line_share": _safe_div(jnp.sum(trivial.astype(jnp.float32)), n_all)}


def _prm_monitors(prm_scores: Array, counted: Array, passed_f: Array) -> Dict[str, Array]:
  """The PRM's mean score over counted lines: all responses, passing ones, failing ones."""
  scores = jnp.where(counted, jnp.asarray(prm_scores, jnp.float32), 0.0)
  per_row_lines = jnp.sum(counted.astype(jnp.float32), axis=1)
  per_row_score = jnp.sum(scores, axis=1)
  mean_over = lambda w: _safe_div(jnp.sum(per_row_score * w), jnp.sum(per_row_lines * w))  # noqa: E731
  return {"prm_score_mean": mean_over(1.0), "prm_score_mean_passed": mean_over(passed_f),
          "prm_score_mean_failed": mean_over(1.0 - passed_f)}


def token_rewards(config: RewardConfig, *, passed: Array, response_mask: Array,
                  line_end_mask: Optional[Array] = None,
                  trivial_line_mask: Optional[Array] = None,
                  prm_scores: Optional[Array] = None,
                  logprobs: Optional[Array] = None,
                  ref_logprobs: Optional[Array] = None,
                  pass_fraction: Optional[Array] = None,
                  kl_coef: Optional[Array] = None,
                  hacked: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
  """Per-token rewards = outcome + dense PRM - kl_coef * KL, and monitors.

  Args:
    config: RewardConfig (static).
    passed: [B] bool, all tests passed.
    response_mask: [B, T], 1 on response tokens.
    line_end_mask: [B, T], 1 at each line's last token (needed for monitors/dense).
    trivial_line_mask: [B, T], 1 at line ends of blank/comment-only lines.
    prm_scores: [B, T] PRM outputs; None = no dense reward (the "no PRM" arm).
    logprobs: [B, T] log pi_old of the response tokens; with ref_logprobs enables KL.
    ref_logprobs: [B, T] log pi_ref of the same tokens.
    pass_fraction: [B] share of tests passed (outcome="fraction").
    kl_coef: scalar (may be traced, e.g. from an adaptive controller); default
      `config.kl_coef`.
    hacked: [B] bool, flagged by the hack monitors: `hack_penalty` comes off their
      outcome reward.
  Returns:
    rewards [B, T] float32 (0 outside the response), and a dict of scalar monitors:
      pass_rate, response_length, lines_per_response, counted_lines_per_response,
      trivial_line_share, prm_score_mean (over counted lines), prm_score_mean_passed /
      _failed, outcome_reward_mean, dense_reward_mean (dense reward summed per response,
      averaged over responses), kl (mean per-token KL with the chosen estimator; what the
      adaptive controller tracks), kl_per_response, kl_coef, reward_mean (total reward
      per response).
  """
  response = jnp.asarray(response_mask).astype(bool)
  resp_f = response.astype(jnp.float32)
  passed = jnp.asarray(passed).astype(bool)
  passed_f = passed.astype(jnp.float32)
  batch = response.shape[0]
  zeros = jnp.zeros(response.shape, jnp.float32)

  outcome = outcome_rewards(passed, response, config, pass_fraction)
  if hacked is not None and config.hack_penalty:
    penalty = jnp.float32(config.hack_penalty) * jnp.asarray(hacked).astype(jnp.float32)
    outcome = outcome - jnp.where(last_token_mask(response), penalty[:, None], 0.0)
  rewards = outcome
  stats = {
      "pass_rate": jnp.mean(passed_f),
      "response_length": jnp.mean(jnp.sum(resp_f, axis=1)),
      "outcome_reward_mean": jnp.sum(outcome) / batch,
  }

  if line_end_mask is not None:
    counted, line_stats = _line_monitors(line_end_mask, response, trivial_line_mask, config)
    stats.update(line_stats)

  stats["dense_reward_mean"] = jnp.float32(0.0)
  if prm_scores is not None:
    if line_end_mask is None:
      raise ValueError("Dense PRM rewards need line_end_mask.")
    dense = dense_rewards(prm_scores, passed, line_end_mask, response, config,
                          trivial_line_mask)
    rewards = rewards + dense
    stats.update(_prm_monitors(prm_scores, counted, passed_f))
    stats["dense_reward_mean"] = jnp.sum(dense) / batch

  if (logprobs is None) != (ref_logprobs is None):
    raise ValueError("The KL penalty needs both logprobs and ref_logprobs.")
  coef = jnp.asarray(config.kl_coef if kl_coef is None else kl_coef, jnp.float32)
  stats["kl"] = stats["kl_per_response"] = jnp.float32(0.0)
  if logprobs is not None:
    kl = jnp.where(response, kl_estimate(logprobs, ref_logprobs, config.kl_estimator), 0.0)
    rewards = rewards - coef * kl
    stats["kl"] = _safe_div(jnp.sum(kl), jnp.sum(resp_f))
    stats["kl_per_response"] = jnp.sum(kl) / batch
  stats["kl_coef"] = coef

  rewards = jnp.where(response, rewards, zeros)
  stats["reward_mean"] = jnp.sum(rewards) / batch
  return rewards, stats
