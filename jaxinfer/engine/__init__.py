"""The inference engine: paged KV cache, continuous batching, chunked prefill, preemption, per-request sampling,
prefix caching and shared-prefix (Hydragen) attention."""

from jaxinfer.engine.allocator import OutOfPagesError, PageAllocator
from jaxinfer.engine.batch import AttentionMetadata, BatchBuilder, SamplingMetadata, StepBatch
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.kv_policy import KVPolicy, PagedLayout
from jaxinfer.engine.kv_pool import KVPool
from jaxinfer.engine.paged_cache import PagedKVCache
from jaxinfer.engine.prefix_cache import PrefixCachingAllocator
from jaxinfer.engine.request import (CANCELLED, LENGTH, STOP, QueueFullError, RequestOutput, RequestRejected,
                                     UnknownRequestError)
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.speculative import NgramProposer, Proposer
from jaxinfer.engine.step import compilation_count

__all__ = ["AttentionMetadata", "BatchBuilder", "CANCELLED", "Engine", "EngineConfig", "KVPolicy", "KVPool", "LENGTH",
           "NgramProposer", "OutOfPagesError", "PageAllocator", "PagedKVCache", "PagedLayout", "PrefixCachingAllocator",
           "Proposer", "QueueFullError", "RequestOutput", "RequestRejected", "STOP", "SamplingMetadata", "Scheduler",
           "StepBatch", "UnknownRequestError", "compilation_count"]
