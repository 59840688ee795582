"""Prometheus metrics of one engine, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tramontane_requests", "Requests finished, by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("tramontane_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("tramontane_generation_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("tramontane_queue_length", "Requests waiting for a cache row", registry=r)
        self.batch_size = Gauge("tramontane_batch_size", "Sequences in the last decode step", registry=r)
        self.batch_sizes = Histogram("tramontane_decode_batch_size", "Sequences per decode step", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("tramontane_time_to_first_token_seconds", "Submission to first token",
                              registry=r, buckets=_LATENCY)
        self.token_latency = Histogram("tramontane_time_per_output_token_seconds",
                                       "Time between consecutive tokens of a request", registry=r, buckets=_LATENCY)
        self.kv_blocks_used = Gauge("tramontane_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.cached_tokens = Counter("tramontane_prefix_cached_tokens", "Prompt tokens found in the prefix cache",
                                     registry=r)
        self.preemptions = Counter("tramontane_preemptions", "Sequences preempted for lack of KV blocks", registry=r)
        self.draft_tokens = Counter("tramontane_speculative_draft_tokens", "Tokens drafted for speculative decoding",
                                    registry=r)
        self.accepted_tokens = Counter("tramontane_speculative_accepted_tokens", "Drafted tokens the model accepted",
                                       registry=r)
        self.verify_rows = Counter("tramontane_speculative_verify_rows",
                                   "Sequence-steps that checked drafts (tokens per step: verify_tokens / verify_rows)",
                                   registry=r)
        self.verify_tokens = Counter("tramontane_speculative_verify_tokens", "Tokens emitted by those sequence-steps",
                                     registry=r)
        self.embedding_inputs = Counter("tramontane_embedding_inputs", "Texts or token lists embedded", registry=r)
        self.embedding_tokens = Counter("tramontane_embedding_tokens", "Tokens run through the model to embed",
                                        registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
