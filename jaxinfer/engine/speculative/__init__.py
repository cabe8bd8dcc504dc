"""Speculative decoding in the engine: one file per method behind the Proposer seam (base.py).

  base.py       accept (exact-match verification), Proposer and its optional hooks
  ngram.py      prompt lookup (NgramProposer)
  draft.py      a small draft model in an engine of its own (DraftProposer)
  sampling.py   speculative sampling verification (min(1, p/q), residual resampling, bonus token)
  probs.py      the sampler's distribution per row, on the device
  adaptive.py   per-sequence k from its acceptance (AdaptiveLength)
  config.py     SpeculativeConfig (EngineConfig.speculative)
  setup.py      config -> proposer
"""

from jaxinfer.engine.speculative.adaptive import AdaptiveLength
from jaxinfer.engine.speculative.base import Proposer, accept
from jaxinfer.engine.speculative.config import SpeculativeConfig
from jaxinfer.engine.speculative.ngram import NgramProposer

__all__ = ["AdaptiveLength", "NgramProposer", "Proposer", "SpeculativeConfig", "accept"]
