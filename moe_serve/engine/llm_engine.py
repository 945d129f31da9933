"""The synchronous engine core: requests in, one forward step at a time, incremental outputs out.

This is the only implementation of the step logic: `LLM` drives it in a loop, `AsyncEngine` drives
it from a background thread. `add_request` and `abort` (request_intake.py) may be called from any
thread (they only touch a locked inbox); everything else runs in the thread that calls `step`. A
request of n completions is n sequences, each decoded on its own; an output carries one of them.

A step: take new requests and aborts from the inbox, let the scheduler pick the batch (decodes plus
prefill chunks), run the model once, sample the sequences whose known tokens are all in the KV
cache, apply the stop conditions, and return an output for every sequence that changed. A request's
completions share one prefill: the siblings that waited on it (scheduler.py) get a copy of its prompt
KV when it ends and sample their first token from its logits row, each with its own generator. If the
batched forward raises, each sequence is retried alone, so only the ones that fail alone end with
finish_reason "error" and the others go on (rewriting a KV position is idempotent).
"""
from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque

import torch

from moe_serve.config import EngineConfig
from moe_serve.engine.generation_defaults import read_generation_defaults
from moe_serve.engine.model_setup import EngineHooks, load_engine_model, resolve_max_model_len
from moe_serve.engine.request_intake import RequestIntake
from moe_serve.engine.request_validation import Prompt, as_token_ids  # noqa: F401 (re-exported)
from moe_serve.engine.sample_step import sample_rows
from moe_serve.engine.sampling_params import RequestOutputKind
from moe_serve.engine.scheduler import QueueFullError, Scheduler, kv_cache_slots  # noqa: F401 (re-exported)
from moe_serve.engine.sequence import RequestOutput, Sequence
from moe_serve.engine.tokenizer import load_tokenizer
from moe_serve.models.batch import ForwardBatch

log = logging.getLogger(__name__)


class LLMEngine(RequestIntake):
    def __init__(self, config: EngineConfig):
        self.config = config
        mc = config.model
        # read before the model loads: a bad generation_config.json fails the start, not minutes later
        self.generation_defaults = read_generation_defaults(mc.model) if mc.generation_config == "auto" else {}
        if mc.cpu_threads is not None:
            torch.set_num_threads(mc.cpu_threads)
        self.hooks = EngineHooks(config.trace)
        self.tokenizer = load_tokenizer(mc.model)  # before the weights: a bad tokenizer fails in seconds
        self.model = load_engine_model(mc, self.hooks, config.expert_cache, config.parallel)
        try:
            self._set_up(config)
        except BaseException:  # nothing the model started (rank processes, copy threads) outlives a failed start
            getattr(self.model, "close", lambda: None)()
            self.model = None
            raise

    def _set_up(self, config: EngineConfig) -> None:
        """Everything after the model loads: KV cache, compiled decode, hooks, scheduler."""
        mc, sc = config.model, config.scheduler
        self.spec = self.model.spec
        self.device = torch.device(mc.device)
        kv_bytes = self.model.kv_bytes_per_token()
        self.max_model_len = resolve_max_model_len(mc.max_model_len, self.spec.context_length,
                                                   config.kv_cache.kv_cache_gb, kv_bytes)
        self.num_slots = kv_cache_slots(config.kv_cache.kv_cache_gb, kv_bytes, self.max_model_len,
                                        config.kv_cache.max_num_seqs)
        self.model.allocate_kv_cache(self.num_slots, self.max_model_len)
        if mc.compile_decode:
            enable = getattr(self.model, "enable_compiled_decode", None)
            reason = enable(mc.compile_max_batch, warm_up=True) if enable else "tensor/expert-parallel ranks run eagerly"
            if reason:
                log.warning("model.compile_decode: running eagerly (%s)", reason.splitlines()[0])
            elif mc.compile_max_batch is None:
                log.info("model.compile_decode: decode batches of up to %d run compiled (timed: %s)",
                         self.model.compiled.max_batch, self.model.compiled.tuned)
        self.hooks.attach(self.spec, self.device, meta={"model": str(mc.model), "family": self.spec.family})
        self.eos_token_ids = set(self.spec.eos_token_ids) | set(self.tokenizer.eos_token_ids)  # + generation_config's
        # a request's completions share one prefill where the model can copy KV between slots (the distributed
        # model has its ranks copy it); not under routing replay (each completion replays its own trace
        # sequence, so siblings' prompt KV differ): there each completion prefills, as before
        share = hasattr(self.model, "copy_kv_prefix") and not config.trace.replay_trace
        self.scheduler = Scheduler(self.num_slots, sc.max_num_batched_tokens, sc.prefill_chunk, sc.max_queue,
                                   share_prefill=share)
        self._lock = threading.Lock()
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[Sequence] = deque()  # the live requests asked to stop
        self._live: dict[str, dict[int, Sequence]] = {}  # request id -> its unfinished sequences by index
        self._num_extras = 0  # live requests that ask for logprobs or penalties (0: the plain sampling path)
        self._seq_ids = itertools.count()
        self._seed_rng = random.Random(mc.seed)
        self.stream = True  # False (LLM.generate): step returns finished requests only, text decoded once

    # ---- requests in (any thread): RequestIntake (make_request, submit, abort, ...) ----

    # ---- the step (one thread) ----

    def step(self) -> list[RequestOutput]:
        outputs = self._drain()
        plan = self.scheduler.schedule()
        if not plan:
            return outputs
        self._copy_prompt_kv(plan)
        plan, logits = self._forward(plan, outputs)
        now = time.monotonic()
        to_sample, rows = [], []
        for i, (seq, n) in enumerate(plan):
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                to_sample.append(seq)
                rows.append(i)
                if not seq.output_ids:  # its prefill just ended: siblings waiting on it sample from its row
                    forked = self._fork(seq)
                    to_sample += forked
                    rows += [i] * len(forked)
        if to_sample:
            if rows != list(range(logits.shape[0])):  # some mid-prefill (no token yet), or rows shared by forks
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            to_sample, tokens, logprobs = self._sample(logits, to_sample, outputs)
            for j, (seq, tok) in enumerate(zip(to_sample, tokens)):
                seq.append_token(tok, now)
                if logprobs is not None and seq.logprobs is not None:
                    seq.logprobs.append(logprobs[j])
                try:
                    self._check_stop(seq, tok)
                except Exception as exc:  # noqa: BLE001 - e.g. the tokenizer fails on this request alone
                    seq.finish("error", f"{type(exc).__name__}: {exc}")
                if seq.finished:
                    self._retire(seq)
                    outputs.append(seq.make_output())
                elif self.stream and seq.params.output_kind != RequestOutputKind.FINAL_ONLY:
                    outputs.append(seq.make_output())
        return outputs

    def _drain(self) -> list[RequestOutput]:
        with self._lock:
            new, aborts = list(self._inbox), list(self._aborts)
            self._inbox.clear()
            self._aborts.clear()
        for seq in new:
            self.scheduler.waiting.append(seq)  # room was checked in submit
        outputs = []
        for seq in aborts:
            if not seq.finished:
                seq.finish("abort")
                self._retire(seq)
                outputs.append(seq.make_output())
        return outputs

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """The siblings that waited on seq's prefill (it just ended), their slots now holding a copy of
        its prompt KV: each is where its own prefill would have left it."""
        waiting = [s for s in seq.group if s.fork_of is seq]
        if waiting:
            n = len(seq.prompt_ids)
            self.model.copy_kv_prefix(seq.slot, [s.slot for s in waiting], n)
            self.model.hooks.fork(seq.seq_id, [s.seq_id for s in waiting])  # a trace holds each completion whole
            for s in waiting:
                s.num_computed, s.fork_of = n, None
        return waiting

    def _copy_prompt_kv(self, plan: list[tuple[Sequence, int]]) -> None:
        """Completions admitted after their request's prefill (scheduler.prompt_kv_holder) get the prompt's
        KV but its last token from the sibling holding it, before this step feeds them that last token."""
        for seq, _ in plan:
            holder, seq.kv_source = seq.kv_source, None
            if holder is not None:
                self.model.copy_kv_prefix(holder.slot, [seq.slot], seq.num_computed)
                self.model.hooks.fork(holder.seq_id, [seq.seq_id], seq.num_computed)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._forget(seq)

    def _batch(self, plan: list[tuple[Sequence, int]]) -> ForwardBatch:
        tokens, positions = [], []
        for seq, n in plan:
            tokens += seq.pending_tokens(n)
            positions += range(seq.num_computed, seq.num_computed + n)
        return ForwardBatch(
            token_ids=torch.tensor(tokens, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            slot_ids=[seq.slot for seq, _ in plan],
            query_lens=[n for _, n in plan],
            context_lens=[seq.num_computed for seq, _ in plan],
            seq_ids=[seq.seq_id for seq, _ in plan],
        )

    def _fail_alone(self, seq: Sequence, exc: Exception, outputs: list[RequestOutput]) -> None:
        """End one request with the error its own retry raised; the rest of the step goes on."""
        seq.finish("error", f"{type(exc).__name__}: {exc}")
        self._retire(seq)
        outputs.append(seq.make_output())

    @torch.inference_mode()
    def _forward(self, plan, outputs):
        """(the sequences that ran, their logits [S, V]); a failing batch is retried one sequence at a time."""
        try:
            return plan, self.model.forward(self._batch(plan))
        except Exception as batch_exc:  # noqa: BLE001 - isolate the culprit below
            kept, rows = [], []
            for seq, n in plan:
                try:
                    rows.append(self.model.forward(self._batch([(seq, n)])))
                    kept.append((seq, n))
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    self._fail_alone(seq, exc, outputs)
            if not kept and not outputs:
                raise batch_exc
            logits = torch.cat(rows) if rows else torch.zeros(0, self.spec.vocab_size, device=self.device)
            return kept, logits

    def _sample(self, logits, seqs, outputs):
        """(the sequences that got a token, their tokens, their logprobs or None); a failing batch is
        retried one sequence at a time, as `_forward` does. The retry draws again from each row's
        generator: the same draw as in the batch unless the batch failed after drawing (every plausible
        failure, e.g. a parameter that slipped past validation, comes before)."""
        try:
            return (seqs, *sample_rows(logits, seqs, self._num_extras > 0, self.eos_token_ids))
        except Exception:  # noqa: BLE001 - isolate the culprit below
            kept, tokens, logprobs = [], [], []
            for i, seq in enumerate(seqs):
                try:
                    toks, lps = sample_rows(logits[i:i + 1], [seq], self._num_extras > 0,
                                             self.eos_token_ids)
                    tokens += toks
                    logprobs += lps if lps is not None else [None]
                    kept.append(seq)
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    self._fail_alone(seq, exc, outputs)
            return kept, tokens, logprobs

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        may_stop = len(seq.output_ids) >= p.min_tokens  # min_tokens (vLLM's rule): only the length ends it before
        if may_stop and ((tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids):
            seq.finish("stop")  # the stop token stays in token_ids, not in the text
            return
        if p.stop_list or self.stream:
            stopped = seq.detok.add(tok, find_stops=may_stop)
        else:
            seq.detok.push(tok)
            stopped = False
        if stopped:
            seq.finish("stop")
        elif (p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    # ---- introspection and shutdown ----

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def expert_load(self):
        """int64 [L, E] tokens routed to each expert of each MoE layer so far, or None when not counted."""
        return self.hooks.expert_load()

    def save_trace(self, path=None):
        """Write the routing trace recorded so far (to `trace.record_trace` by default); returns it."""
        return self.hooks.save_trace(path)

    def close(self) -> None:
        """Abort what is left, write the trace if recording, and drop the model and its KV cache."""
        if getattr(self, "model", None) is None:
            return
        with self._lock:  # from here on submit refuses; what was queued is aborted below, not stepped later
            model, self.model = self.model, None
            self._inbox.clear()
            self._aborts.clear()
        for seq in self.live_sequences():
            seq.finish("abort")
            self._retire(seq)
        if self.config.trace.record_trace:
            self.save_trace()
        getattr(model, "close", lambda: None)()  # worker ranks (DistributedModel), copy threads (stores)
