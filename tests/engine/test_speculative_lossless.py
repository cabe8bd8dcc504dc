"""Draft-model speculative sampling is lossless: at temperature 1 on an 8-token vocabulary, thousands of seeded
requests (one engine, 64 at a time) give tokens whose empirical joint distribution matches the target's own.

The first generated token comes from the prefill, which never speculates; the next two (the first two
speculated ones: drafted by the draft model, accepted with min(1, p/q) or resampled from norm(max(p - q, 0)),
or the bonus token) are compared with their exact distribution under the target, computed from its logits:
P(t2 = a, t3 = b) = sum_t1 p(t1) p(a | t1) p(b | t1, a). Comparing with the exact distribution rather than with
a second empirical sample from plain sampling halves the noise of the test.

Threshold: Pearson's chi-square over the 64 cells (cells expecting fewer than 5 counts pooled into one, so
the chi-square approximation holds), rejected at its 0.999 quantile: a correct implementation fails this
test with probability 0.001 (and the seeds are fixed, so it either always passes or never does). Power: the
same statistic against what accepting every draft would give (t2, t3 drawn from the draft) must exceed that
quantile by far, so this sample size does tell the two apart.
"""

import numpy as np
from scipy import stats
from testlib import tiny_model_config

import jaxinfer
from jaxinfer.engine import Engine

VOCAB, N = 8, 2048
PROMPT = [3, 1, 6]


def _pair_distribution(first, second, prompt):
  """P(t2, t3) [V, V] where t1 ~ first, then t2, t3 ~ second, after `prompt` (exact, from the logits)."""
  seqs = np.asarray([prompt + [t1, a] for t1 in range(VOCAB) for a in range(VOCAB)])
  p1 = np.asarray(jax_softmax(first(seqs[:1])[0, len(prompt) - 1]))
  l2 = second(seqs)
  p2 = jax_softmax(np.asarray(l2[:, len(prompt)])).reshape(VOCAB, VOCAB, VOCAB)[:, 0]  # [t1, a]
  p3 = jax_softmax(np.asarray(l2[:, len(prompt) + 1])).reshape(VOCAB, VOCAB, VOCAB)  # [t1, a, b]
  return np.einsum("t,ta,tab->ab", p1, p2, p3)


def jax_softmax(logits):
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _chi2(counts, expected):
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  statistic = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
  return statistic, float(stats.chi2.ppf(0.999, keep.sum() - 1))


def test_draft_speculative_sampling_matches_the_target_distribution():
  target = jaxinfer.init_model(tiny_model_config(vocab_size=VOCAB, initializer_range=0.5), seed=3)
  draft = jaxinfer.init_model(tiny_model_config(vocab_size=VOCAB, num_layers=1, initializer_range=0.5), seed=4)
  spec = jaxinfer.SpeculativeConfig(method="draft", num_speculative_tokens=2, draft_model=draft)
  engine = Engine(target, speculative=spec, max_batch_size=64, min_seq_bucket=64, page_size=16, num_pages=64,
                  max_model_len=16, max_step_tokens=256, min_token_bucket=256)
  outs = engine.run([PROMPT] * N, jaxinfer.SamplingParams(temperature=1.0, seed=0), max_new_tokens=4,
                    progress=False)
  st = engine.stats
  assert 0 < st["spec_accepted_tokens"] < st["spec_draft_tokens"], st  # both branches (accept, resample) ran
  pairs = np.asarray([o[1:3] for o in outs])
  counts = np.bincount(pairs[:, 0] * VOCAB + pairs[:, 1], minlength=VOCAB * VOCAB).astype(np.float64)
  want = _pair_distribution(target, target, PROMPT).reshape(-1)
  statistic, limit = _chi2(counts, N * want)
  assert statistic < limit, (statistic, limit)
  naive = _pair_distribution(target, draft, PROMPT).reshape(-1)  # every draft accepted: t2, t3 from the draft
  wrong, _ = _chi2(counts, N * naive)
  assert wrong > 3 * limit, (wrong, limit)
  tv = 0.5 * np.abs(counts / N - want).sum()
  assert tv < 0.5 * np.abs(naive - want).sum(), tv
