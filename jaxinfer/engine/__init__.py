"""The inference engine: paged KV cache, continuous batching, chunked prefill, preemption, per-request sampling,
prefix caching and shared-prefix (Hydragen) attention."""

from jaxinfer.engine.allocator import OutOfPagesError, PageAllocator
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.paged_cache import PagedKVCache
from jaxinfer.engine.prefix_cache import PrefixCachingAllocator
from jaxinfer.engine.request import (CANCELLED, LENGTH, STOP, QueueFullError, RequestOutput, RequestRejected,
                                     UnknownRequestError)
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.step import compilation_count

__all__ = ["CANCELLED", "Engine", "LENGTH", "OutOfPagesError", "PageAllocator", "PagedKVCache",
           "PrefixCachingAllocator", "QueueFullError", "RequestOutput", "RequestRejected", "STOP", "Scheduler",
           "UnknownRequestError", "compilation_count"]
