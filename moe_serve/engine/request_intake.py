"""Requests into the engine (any thread): building a request's sequences, queueing them, aborting them.

Split out of llm_engine.py (which keeps the step logic) as the RequestIntake mixin of LLMEngine. A
request is `SamplingParams.n` sequences, one per completion, that share the request id and the prompt
(validated and tokenized once): `make_request` builds them, `submit` queues them all or none (they take
n places of `scheduler.max_queue`), `abort` stops them all. The live table maps a request id to its
unfinished sequences by completion index; everything here touches shared state only under `_lock`.
"""
from __future__ import annotations

import copy
import time

from moe_serve.engine.detokenizer import IncrementalDetokenizer
from moe_serve.engine.request_validation import Prompt, validate_request
from moe_serve.engine.sampler import make_generator
from moe_serve.engine.sampling_params import SamplingParams, completion_seed
from moe_serve.engine.scheduler import QueueFullError
from moe_serve.engine.sequence import Sequence


class RequestIntake:
    # set by LLMEngine: tokenizer, spec, max_model_len, device, scheduler, generation_defaults, _lock,
    # _inbox, _aborts, _live (request id -> {completion index: live Sequence}), _num_extras, _seq_ids, _seed_rng

    def default_sampling_params(self) -> SamplingParams:
        """What a request without SamplingParams gets: the checkpoint's defaults (model.generation_config)."""
        return SamplingParams(**self.generation_defaults)

    def _generator(self, params: SamplingParams, index: int):
        """Completion `index`'s random stream: None (greedy), its completion_seed, else a fresh seed."""
        if params.greedy:
            return None
        seed = completion_seed(params.seed, index) if params.seed is not None else self._seed_rng.getrandbits(63)
        return make_generator(seed, self.device)

    def _sequence(self, text: str | None, ids: list[int], params: SamplingParams, request_id: str | None,
                  arrival_time: float | None, index: int) -> Sequence:
        seq_id = next(self._seq_ids)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop_list, params.skip_special_tokens)
        return Sequence(seq_id=seq_id, request_id=request_id if request_id is not None else f"req-{seq_id}",
                        prompt=text, prompt_ids=ids, params=params, generator=self._generator(params, index),
                        detok=detok, arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
                        index=index)

    def make_sequence(self, prompt: Prompt, params: SamplingParams | None = None,
                      request_id: str | None = None, arrival_time: float | None = None) -> Sequence:
        """Validate and tokenize one request; its first completion's sequence (`make_request` gives all
        n). Raises ValueError naming the field and the limit."""
        # the request's own copy (as vLLM clones it): the caller may reuse and change its SamplingParams
        # for the next request while this one runs (validate_request then normalizes the copy's lists)
        params = copy.copy(params) if params is not None else self.default_sampling_params()
        text, ids = validate_request(prompt, params, self.tokenizer, self.spec.vocab_size, self.max_model_len)
        return self._sequence(text, ids, params, request_id, arrival_time, 0)

    def make_request(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, arrival_time: float | None = None) -> list[Sequence]:
        """The request's n sequences (completion i at [i]), the prompt validated and tokenized once."""
        first = self.make_sequence(prompt, params, request_id, arrival_time)
        n, limit = first.params.n, self.scheduler.max_queue
        if n > limit:  # it could never be queued whole
            raise ValueError(f"SamplingParams.n={n} completions take {n} places in the queue; at most "
                             f"scheduler.max_queue={limit} fit")
        group = [first] + [self._sequence(first.prompt, first.prompt_ids, first.params, first.request_id,
                                          first.arrival_time, i) for i in range(1, n)]
        for seq in group:
            seq.group = group
        return group

    def submit(self, seq: Sequence | list[Sequence]) -> str:
        """Queue a validated request (a sequence of make_request's: its whole group is queued); QueueFullError
        when its n sequences do not fit under `scheduler.max_queue` with those already waiting."""
        group = list(seq) if isinstance(seq, (list, tuple)) else seq.group
        rid = group[0].request_id
        with self._lock:
            if self.model is None:  # close() dropped it: the request would end in an AttributeError of the forward
                raise RuntimeError(f"request {rid!r} refused: the engine is closed")
            if rid in self._live:
                raise ValueError(f"request_id {rid!r} is already in use by a running request")
            waiting = len(self._inbox) + len(self.scheduler.waiting)
            if waiting + len(group) > self.scheduler.max_queue:
                need = f" and it needs {len(group)} (n)" if len(group) > 1 else ""
                raise QueueFullError(f"request {rid!r} refused: {waiting} requests already wait{need} "
                                     f"(scheduler.max_queue={self.scheduler.max_queue})")
            self._live[rid] = {s.index: s for s in group}
            self._num_extras += sum(s.params.extra_work for s in group)
            self._inbox.extend(group)
        return rid

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        return self.submit(self.make_request(prompt, params, request_id, arrival_time))

    def abort(self, request_id: str) -> None:
        """Stop a request, all its completions (their slots are freed at the next step); unknown or finished
        ids are ignored. The id is resolved now, so a request that reuses it later is not the one stopped."""
        with self._lock:
            self._aborts.extend(self._live.get(request_id, {}).values())

    def _forget(self, seq: Sequence) -> None:
        """Drop a finished sequence from the live table (once: a second call does nothing)."""
        with self._lock:
            live = self._live.get(seq.request_id)
            if live is not None and live.get(seq.index) is seq:
                del live[seq.index]
                self._num_extras -= seq.params.extra_work
                if not live:
                    del self._live[seq.request_id]

    def live_sequences(self) -> list[Sequence]:
        with self._lock:
            return [seq for live in self._live.values() for seq in live.values()]

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live or self._aborts)

    def queue_has_room(self, n: int = 1) -> bool:
        """Whether a request of n completions would be queued now."""
        with self._lock:
            return len(self._inbox) + len(self.scheduler.waiting) + n <= self.scheduler.max_queue
