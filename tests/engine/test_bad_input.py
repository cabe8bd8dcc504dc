"""Bad requests are refused with a message naming the input and the limit; nothing crashes or leaks pages;
every accepted request ends finished with a reason."""

import numpy as np
import pytest

from jaxinfer import SamplingParams
from jaxinfer.engine import Engine, QueueFullError, RequestRejected, UnknownRequestError

from testlib import tiny_model_config

CFG = tiny_model_config()

SMALL = dict(max_batch_size=4, page_size=4, num_pages=8, max_step_tokens=16, max_queue=3, max_model_len=48,
             min_token_bucket=16)


@pytest.fixture
def engine(model):
  return Engine(model, **SMALL)


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([], {}, "non-empty"),
    ([[1, 2], [3, 4]], {}, "1-D"),
    ([1.5, 2.0], {}, "must be integers"),
    ([5, CFG.vocab_size, 3], {}, f"token id {CFG.vocab_size} is outside the vocabulary [0, {CFG.vocab_size})"),
    ([-1], {}, "token id -1 is outside the vocabulary"),
    (list(range(48)), {}, "length 48 leaves no room to generate: the maximum context (max_model_len) is 48"),
    ([1] * 40, {"max_new_tokens": 9}, "length 40 + max_new_tokens 9 = 49 exceeds the maximum context"),
    ([1] * 30, {"max_new_tokens": 3}, "need 9 pages of 4, but the pool only has num_pages=8: it could never fit"),
    ([1, 2], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ([1, 2], {"stop_token_ids": [500]}, "stop token id 500 is outside the vocabulary"),
    ([1, 2], {"sampling": "greedy"}, "sampling must be a SamplingParams"),
])
def test_rejected_requests(engine, prompt, kwargs, message):
  with pytest.raises(RequestRejected) as e:
    engine.add_request(prompt, **kwargs)
  assert message in str(e.value)
  assert not engine.has_unfinished() and engine.step() == []


def test_queue_full_is_a_clear_rejection_and_frees_up(engine):
  ids = [engine.add_request([1, 2, 3], max_new_tokens=2) for _ in range(3)]
  with pytest.raises(QueueFullError, match=r"3 requests already wait for admission \(max_queue=3\)"):
    engine.add_request([1, 2, 3], max_new_tokens=2)
  engine.step()  # admits them
  ids.append(engine.add_request([1, 2, 3], max_new_tokens=2))
  done = {o.request_id: o.finish_reason for o in engine.stream() if o.finished}
  assert done == {i: "length" for i in ids}


def test_cancel_waiting_running_finished_and_unknown(engine):
  running = engine.add_request([3] * 16, max_new_tokens=8)  # its prompt fills the first step's budget
  waiting = engine.add_request([4] * 16, max_new_tokens=8)
  short = engine.add_request([5, 6], max_new_tokens=1)
  outs = engine.step()
  assert engine.num_running == 1 and engine.num_waiting == 2 and engine.finish_reason(running) is None
  assert engine.cancel(running) is True
  assert engine.cancel(waiting) is True
  with pytest.raises(UnknownRequestError, match="request 12345 is unknown"):
    engine.cancel(12345)
  outs += list(engine.stream())
  final = {o.request_id: o.finish_reason for o in outs if o.finished}
  assert final == {running: "cancelled", waiting: "cancelled", short: "length"}
  assert engine.cancel(short) is False  # documented no-op: it already finished, its outcome stands
  assert engine.cancel(running) is False
  assert engine.finish_reason(short) == "length"
  assert engine.allocator.num_free == engine.num_pages
  engine.allocator.check_consistency()


def test_run_validates_every_prompt_before_queueing_any(engine):
  with pytest.raises(RequestRejected, match="prompt 1: token id 999"):
    engine.run([[1, 2], [999]], max_new_tokens=2, progress=False)
  assert not engine.has_unfinished()


def test_run_feeds_more_prompts_than_the_queue_holds(model):
  engine = Engine(model, **SMALL)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist() for n in rng.integers(1, 20, size=9)]
  out = engine.run(prompts, SamplingParams(), max_new_tokens=3, progress=False)
  assert [len(o) for o in out] == [3] * 9


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batch_size=0), "max_batch_size must be a positive integer"),
    (dict(max_step_tokens=2), "max_step_tokens=2 must be >= max_batch_size=4"),
    (dict(max_model_len=1000), "exceeds the model's max_position_embeddings=256"),
    (dict(chunked_prefill=False), "without chunked prefill max_step_tokens=16 must be >= max_model_len"),
])
def test_bad_engine_settings(model, kwargs, message):
  with pytest.raises(ValueError, match=message):
    Engine(model, **{**SMALL, **kwargs})


def test_cli_rejects_a_prompt_longer_than_the_context(capsys):
  import logging

  from jaxinfer.cli import main

  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  try:
    code = main(["jaxinfer", "generate", "--config", "experiments/default.py", "--config.model.num_layers=1",
                 "--config.model.max_position_embeddings=16", "--config.generate.max_new_tokens=4",
                 "--config.generate.prompt=" + "x" * 40])
  finally:  # the command points logging at the captured stderr, which closes after this test
    root.handlers[:], root.level = handlers, level
  assert code == 2
  assert "generate.prompt: prompt 0: length" in capsys.readouterr().err
