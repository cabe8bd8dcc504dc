"""The load generator of `jaxinfer bench serve`: streamed /v1/completions requests over HTTP (aiohttp),
sent at Poisson arrivals of a given rate (or all at once, rate=inf), optionally under a concurrency cap,
each timed from the moment it is sent: when each streamed chunk arrives, and the usage the server reports.

  workload = [Prompt(ids, output_len), ...]
  records = asyncio.run(run_load(base_url, model, workload, rate=2.0, max_concurrency=0, seed=0))
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prompt:
  token_ids: tuple[int, ...]
  output_len: int


@dataclasses.dataclass
class Record:
  """One request as the client saw it (seconds on the client's clock, relative to its send time)."""
  prompt_len: int
  output_len: int  # asked for
  success: bool = False
  error: str = ""
  ttft: float = 0.0  # send -> first chunk with text
  latency: float = 0.0  # send -> last chunk
  itl: list[float] = dataclasses.field(default_factory=list)  # gaps between consecutive chunks
  output_tokens: int = 0  # as the server's usage reports
  start: float = 0.0  # send time (benchmark clock)


def arrival_gaps(n: int, rate: float, seed: int) -> np.ndarray:
  """Seconds to wait before each request: exponential gaps (a Poisson process) of mean 1/rate; 0 for rate=inf."""
  if not np.isfinite(rate):
    return np.zeros(n)
  return np.random.default_rng(seed).exponential(1.0 / rate, size=n)


async def send(session, url: str, model: str, prompt: Prompt, clock) -> Record:
  rec = Record(len(prompt.token_ids), prompt.output_len)
  body = {"model": model, "prompt": list(prompt.token_ids), "max_tokens": prompt.output_len, "temperature": 0.0,
          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
  rec.start = start = clock()
  last = None
  try:
    async with session.post(url, json=body) as resp:
      if resp.status != 200:
        rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
        return rec
      buffer = b""
      async for raw in resp.content.iter_any():
        buffer += raw
        while b"\n\n" in buffer:
          event, buffer = buffer.split(b"\n\n", 1)
          data = event.decode().removeprefix("data: ").strip()
          if data == "[DONE]":
            continue
          chunk = json.loads(data)
          now = clock()
          if chunk.get("usage"):
            rec.output_tokens = chunk["usage"]["completion_tokens"]
          if chunk.get("choices") and chunk["choices"][0].get("text"):
            if last is None:
              rec.ttft = now - start
            else:
              rec.itl.append(now - last)
            last = now
      rec.latency = (last if last is not None else clock()) - start
      rec.success = last is not None
  except Exception as e:  # noqa: BLE001 - a failed request is recorded, the run goes on
    rec.error = f"{type(e).__name__}: {e}"
  return rec


async def run_load(base_url: str, model: str, workload: list[Prompt], rate: float, max_concurrency: int = 0,
                   seed: int = 0, timeout_s: float = 3600.0) -> tuple[list[Record], float]:
  """Sends the workload; returns the records (workload order) and the benchmark's duration (first send to the
  last response)."""
  import aiohttp

  url = base_url.rstrip("/") + "/v1/completions"
  gaps = arrival_gaps(len(workload), rate, seed)
  limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
  clock = time.perf_counter
  connector = aiohttp.TCPConnector(limit=0)
  async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
    async def one(p):
      if limit is None:
        return await send(session, url, model, p, clock)
      async with limit:
        return await send(session, url, model, p, clock)

    start = clock()
    tasks = []
    for gap, p in zip(gaps, workload):
      if gap:
        await asyncio.sleep(gap)
      tasks.append(asyncio.create_task(one(p)))
    records = await asyncio.gather(*tasks)
    duration = clock() - start
  return list(records), duration
