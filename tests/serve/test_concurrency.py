"""64 concurrent streaming clients all complete; cancelling half of them mid-stream leaves the others' outputs
unchanged and returns every page (check_pages); stopping the server (what SIGTERM does) drains a running
stream before exiting."""

import asyncio
import threading
import time

N, TOKENS = 64, 16


def wait_idle(bridge, timeout=60):
  deadline = time.monotonic() + timeout
  while bridge.num_unfinished:
    assert time.monotonic() < deadline, f"{bridge.num_unfinished} requests still unfinished"
    time.sleep(0.01)


async def stream_one(client, model, i, cancel_after=None):
  """The text of request i (seeded sampling: its random stream does not depend on the batch); with cancel_after,
  the client closes the stream after that many chunks and returns None (such a request asks for 8x the tokens,
  so on a loaded machine it is still running when the disconnect reaches the engine)."""
  max_tokens = TOKENS if cancel_after is None else 8 * TOKENS
  stream = await client.completions.create(model=model, prompt=f"client {i}: " + "ab" * (i % 7), max_tokens=max_tokens,
                                           temperature=1.0, seed=1000 + i, stream=True)
  pieces, finish = [], None
  async for chunk in stream:
    pieces.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
    if cancel_after is not None and len(pieces) >= cancel_after:
      await stream.close()
      return None
  assert finish == "length"
  return "".join(pieces)


async def run_all(url, model, cancel):
  import openai

  client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
  try:
    return await asyncio.gather(*[stream_one(client, model, i, 3 if cancel and i % 2 else None) for i in range(N)])
  finally:
    await client.close()


def test_64_streams_and_cancelling_half(serving, server_url, model_name):
  bridge = serving.bridge
  full = asyncio.run(run_all(server_url, model_name, cancel=False))
  assert all(isinstance(t, str) for t in full) and len(set(full)) > N // 2
  wait_idle(bridge)
  cancelled_before = serving.metrics._success.labels(model_name, "abort")._value.get()
  half = asyncio.run(run_all(server_url, model_name, cancel=True))
  for i in range(N):
    if i % 2:
      assert half[i] is None
    else:
      assert half[i] == full[i], i
  wait_idle(bridge)
  aborted = serving.metrics._success.labels(model_name, "abort")._value.get() - cancelled_before
  assert aborted >= 1  # disconnects reached the engine as cancels (some may have finished first)
  pages = bridge.call(lambda e: e.check_pages()).result(30)
  assert pages["in_use"] == 0 and pages["free"] == serving.engine_config.num_pages


def test_stop_drains_running_stream(serving, model_name):
  import openai

  from jaxinfer.serve.server import BackgroundServer

  background = BackgroundServer(serving).start()
  client = openai.OpenAI(base_url=background.url + "/v1", api_key="none", max_retries=0, timeout=120)
  stream = client.completions.create(model=model_name, prompt="drain me", max_tokens=40, temperature=0, stream=True)
  pieces, reasons = [], []
  stopper = None
  for chunk in stream:
    pieces.append(chunk.choices[0].text)
    reasons.append(chunk.choices[0].finish_reason)
    if stopper is None:  # SIGTERM's handler sets should_exit; the open stream must still finish
      stopper = threading.Thread(target=background.stop)
      stopper.start()
  stopper.join(60)
  assert reasons[-1] == "length"
  assert not background.thread.is_alive()
  with BackgroundServer(serving) as again:  # a fresh server on the same engine: the drained one is gone
    whole = openai.OpenAI(base_url=again.url + "/v1", api_key="none", max_retries=0).completions.create(
        model=model_name, prompt="drain me", max_tokens=40, temperature=0)
  assert "".join(pieces) == whole.choices[0].text


def test_non_streaming_client_that_leaves_is_cancelled(serving, server_url, model_name):
  import json
  import socket

  aborts = serving.metrics._success.labels(model_name, "abort")
  before = aborts._value.get()
  body = json.dumps({"model": model_name, "prompt": "leave early", "max_tokens": 200, "temperature": 0}).encode()
  host, port = server_url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port))) as sock:
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 30
    while serving.metrics.generation_tokens._value.get() == 0 or not serving.bridge.num_unfinished:
      assert time.monotonic() < deadline, "the request never started"
      time.sleep(0.01)
  deadline = time.monotonic() + 30
  while aborts._value.get() < before + 1:  # cancelled (reported one step later), not run to its 200 tokens
    assert time.monotonic() < deadline, "the request was not cancelled"
    time.sleep(0.01)
  wait_idle(serving.bridge)
  assert serving.bridge.call(lambda e: e.check_pages()).result(30)["in_use"] == 0
