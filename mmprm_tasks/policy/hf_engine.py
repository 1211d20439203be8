"""A small continuous-batching engine for transformers vision-language models (CPU first).

With ``model.generate`` on fixed batches (the reference path) every one of a request's ``n``
samples is preprocessed and prefilled on its own, and a batch decodes until its longest row ends
(on the demo's mix 1.6x the useful token slots).  This engine instead:

* **prefills each request once** (image + prompt through the full model) and copies the prompt's
  keys and values into ``n`` rows of a running batch, one per sample;
* **decodes a running batch**: one forward pass of one token per row; a row that ends (EOS, its
  token budget, the model's positions) leaves at once, and waiting requests' rows join before the
  next step, so no slot is spent on finished rows and nobody waits for a round;
* keeps the keys and values in a **preallocated slot cache** (:func:`new_slot_cache`): each row owns a
  slot and writes its next token at its own column, under ``torch.inference_mode``;
* **samples every row with its own counter-based random numbers** (:func:`row_uniforms`: a hash of
  the row's seed and its token index), vectorised over the batch: temperature, top-k, top-p and
  repetition penalty per row, then an inverse-CDF draw.  A row's tokens depend on its seed and its
  own logits only, never on which rows share its step, so trees stay identical for a given seed
  whatever the batching or concurrency (tested), as with the ``generate`` path.

Each row's attention runs over its own columns only (a 4-D additive mask), with its own position
ids, so the model computes the same function as ``generate`` does for that sequence; greedy text
equals ``generate``'s (tested).  ``model.generate`` stays as the reference path
(``policy.engine = "generate"``).

Families: the decode step calls the model's own forward with explicit ``position_ids`` and a 4-D
mask, which is what 1-D rotary decoders (LLaVA and its kin) take.  Families whose decode needs more
(multimodal rotary positions such as Qwen2-VL's, cross-attention to image states such as Mllama's,
sliding-window layers) are not in :data:`CONTINUOUS_FAMILIES`; ``engine = "auto"`` keeps them on
``generate`` and ``engine = "continuous"`` refuses them in one line.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmprm_tasks.policy import GenerationRequest, PolicyConfigError, PolicyError, chat_messages, load_image, request_seed
from mmprm_tasks.families import CONTINUOUS_FAMILIES
from mmprm_tasks.policy.hf import ChatPrompt, Completion, TransformersPolicy, row_seed
from mmprm_tasks.rollouts import Rollout, parse_rollout
from mmprm_tasks.settings import PolicyConfig, SamplingConfig

# The model families (config.model_type) whose decode this engine drives exactly are those whose
# entry in mmprm_tasks/families.py says continuous_engine (a decoder with 1-D rotary positions and
# self-attention only, reached through the model's own forward).

def row_uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One uniform in (0, 1) per row: splitmix64 of (row seed, token index).  Counter-based, so a
    row's draws depend on nothing but its seed and how many tokens it has made."""
    with np.errstate(over="ignore"):
        x = seeds.astype(np.uint64) + (steps.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


@dataclass
class RowSampling:
    """Per-row sampling parameters as tensors (one entry per running row)."""

    temperature: Any
    top_k: Any
    top_p: Any
    penalty: Any


def sample_rows(logits: Any, params: RowSampling, seen: Any, uniforms: Any) -> Any:
    """The next token of every row: repetition penalty on the tokens the row has seen (prompt and
    output, as transformers' processor), then greedy (temperature 0) or temperature, top-k, top-p
    and an inverse-CDF draw with the row's uniform.  Every operation is row-wise."""
    import torch

    logits = logits.float()
    if bool((params.penalty != 1.0).any()):
        penalty = params.penalty[:, None]
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
    tokens = logits.argmax(dim=-1)
    sampled = params.temperature > 0
    if not bool(sampled.any()):
        return tokens
    rows = sampled.nonzero().squeeze(1)
    scaled = logits[rows] / params.temperature[rows, None]
    vocab = scaled.shape[-1]
    top_k = torch.where(params.top_k[rows] > 0, params.top_k[rows].clamp(max=vocab), vocab)
    k_max = int(top_k.max())
    values, index = torch.topk(scaled, k_max, dim=-1)  # sorted, most likely first
    ranks = torch.arange(k_max, device=logits.device)[None, :]
    values = values.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    probs = probs.masked_fill(before >= params.top_p[rows, None], 0.0)
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms[rows] * cdf[:, -1]
    choice = (cdf < target[:, None]).sum(dim=-1).clamp(max=k_max - 1)
    tokens[rows] = index.gather(1, choice[:, None]).squeeze(1)
    return tokens


_SLOT_CACHE_CLASS: Any = None


def new_slot_cache(num_layers: int) -> Any:
    """Keys and values of the running rows: per layer ``[slots, kv_heads, columns, head_dim]``.

    Row ``r`` holds its prompt in columns ``0..L-1`` and writes its ``t``-th generated token at
    column ``L + t``.  A transformers :class:`~transformers.cache_utils.Cache` whose layers write
    one token per row at that row's column and hand attention columns ``0..width-1`` of the running
    rows (the mask hides each row's columns past its own).  The class is made on first use, so
    importing this module does not import transformers."""
    global _SLOT_CACHE_CLASS
    if _SLOT_CACHE_CLASS is None:
        _SLOT_CACHE_CLASS = _define_slot_cache()
    return _SLOT_CACHE_CLASS(num_layers)


def _define_slot_cache() -> Any:
    import torch
    from transformers.cache_utils import Cache, CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        is_sliding = False
        is_compileable = False

        def __init__(self, owner: Any) -> None:
            super().__init__()
            self.owner = owner

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:  # allocated by the owner
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            o = self.owner
            rows, cols = o.row_index, o.write_cols
            self.keys[rows, :, cols] = key_states[:, :, 0]
            self.values[rows, :, cols] = value_states[:, :, 0]
            return self.keys[: o.rows, :, : o.width], self.values[: o.rows, :, : o.width]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.owner.width, 0

        def get_seq_length(self) -> int:
            return self.owner.width - 1

        def get_max_length(self) -> int:
            return -1

        def get_max_cache_shape(self) -> int:  # the same, as transformers < 5.20 names it
            return -1

    class _SlotCache(Cache):
        def __init__(self, num_layers: int) -> None:
            self.rows = 0  # running rows: slots 0..rows-1
            self.width = 0  # attention columns this step
            self.row_index: Any = None
            self.write_cols: Any = None
            super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

        def allocate(self, slots: int, heads: int, columns: int, head_dim: int, dtype: Any, device: Any) -> None:
            for layer in self.layers:
                layer.keys = torch.zeros(slots, heads, columns, head_dim, dtype=dtype, device=device)
                layer.values = torch.zeros_like(layer.keys)
                layer.is_initialized = True

        @property
        def allocated(self) -> bool:
            return self.layers[0].keys is not None

        @property
        def slots(self) -> int:
            return self.layers[0].keys.shape[0]

        @property
        def columns(self) -> int:
            return self.layers[0].keys.shape[2]

        def grow(self, slots: int, columns: int) -> None:
            """Reallocate to at least ``slots`` x ``columns``, keeping the running rows."""
            for layer in self.layers:
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    new = old.new_zeros(max(slots, old.shape[0]), old.shape[1], max(columns, old.shape[2]), old.shape[3])
                    new[: self.rows, :, : old.shape[2]] = old[: self.rows]
                    setattr(layer, name, new)

        def fill(self, slot: int, count: int, prompt_cache: Any, length: int) -> None:
            """Copy a prefilled prompt's keys and values into slots ``slot..slot+count-1``."""
            for layer, source in zip(self.layers, prompt_cache.layers):
                layer.keys[slot : slot + count, :, :length] = source.keys[0, :, :length]
                layer.values[slot : slot + count, :, :length] = source.values[0, :, :length]

        def move(self, sources: Any, targets: Any, columns: int) -> None:
            """Copy rows ``sources`` (their first ``columns`` columns) into slots ``targets``."""
            for layer in self.layers:
                layer.keys[targets, :, :columns] = layer.keys[sources, :, :columns]
                layer.values[targets, :, :columns] = layer.values[sources, :, :columns]

    return _SlotCache


@dataclass
class PromptJob:
    """``n`` samples of one rendered prompt; ``future`` resolves to their completions in order."""

    text: str
    n: int
    seed: int
    sampling: SamplingConfig
    future: Future = field(default_factory=Future)
    inputs: Any = None  # the processor's tensors, made on the submitting thread
    result: Callable[[list[Any]], Any] | None = None  # what the future holds: f(completions)
    # (key, tokens): the prompt's first ``tokens`` tokens are shared with other requests (PrefixCache)
    prefix: tuple[Any, int] | None = None
    completions: list[Any] = field(default_factory=list)
    open_rows: int = 0


@dataclass
class _Row:
    job: PromptJob
    sample: int
    prompt_tokens: int
    max_new: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class EngineCounters:
    """What the engine did, for benchmarks and run stats."""

    requests: int = 0
    rows: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    row_steps: int = 0  # rows summed over decode steps (the token slots computed)
    prefix_hits: int = 0
    prefix_misses: int = 0


class ContinuousEngine:
    """The engine thread of one loaded model.  ``submit(job)`` queues a :class:`PromptJob`;
    the thread admits waiting jobs while their rows fit in ``capacity`` (a job larger than the
    whole capacity runs alone), steps the running batch, and resolves each job's future when its
    last row ends.  A failure of the model fails the jobs then running (as :class:`PolicyError`)
    and the engine goes on with the next ones.

    Per-row state lives in slot-aligned tensors (last token, write column, tokens seen, sampling
    parameters), so a step's bookkeeping is a few vectorised operations; a row that leaves is
    replaced by the last running row (one gather per layer for all rows that left)."""

    def __init__(self, owner: Any, capacity: int, prefix_cache_entries: int = 128) -> None:
        import torch

        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.owner = owner  # a TransformersPolicy: model, tokenizer, eos ids, device
        self.capacity = capacity
        self.counters = EngineCounters()
        self._torch = torch
        self._pending: deque[PromptJob] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._prefixes = PrefixCache(prefix_cache_entries)
        self._thread = threading.Thread(target=self._loop, name="hf-continuous-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ API

    def submit(self, job: PromptJob) -> Future:
        with self._cond:
            if self._closed:
                raise PolicyError("the engine is shut down")
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            job.future.cancel()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch = self._torch
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and not self._rows and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        self._fail_running(PolicyError("the engine is shut down"))
                        return
                    admitted = self._take_admissible()
                for job in admitted:
                    try:
                        self._prefill(job)
                    except Exception as exc:  # noqa: BLE001 - this job's failure, handed to its caller
                        self._remove([slot for slot, row in enumerate(self._rows) if row.job is job])
                        job.future.set_exception(_as_policy_error(exc, "prefill"))
                self._remove([slot for slot, row in enumerate(self._rows) if row.job.future.cancelled()])
                if not self._rows:
                    continue
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - every running job fails with it
                    self._fail_running(_as_policy_error(exc, "decode step"))

    def _take_admissible(self) -> list[PromptJob]:
        """Waiting jobs that fit now, in order (a job that does not fit blocks later ones)."""
        taken: list[PromptJob] = []
        running = len(self._rows)
        while self._pending:
            job = self._pending[0]
            if running and running + job.n > self.capacity:
                break
            self._pending.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue
            taken.append(job)
            running += job.n
        return taken

    def _prompt_forward(self, job: PromptJob) -> tuple[Any, Any]:
        """The prompt's last logits and key/value cache.  With ``job.prefix`` (its first tokens
        are shared by other requests, e.g. every request of one problem shares the question and
        image), those tokens' keys and values come from :class:`PrefixCache` (computed by a
        forward over exactly those tokens on a miss) and only the rest is run.  Hit or miss, the
        numbers are the same, so a request's samples never depend on what ran before it."""
        from transformers import DynamicCache

        model = self.owner.model
        inputs = job.inputs
        if job.prefix is None:
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float(), _cache_of(out)
        key, split = job.prefix
        shape = tuple(inputs["input_ids"].shape)
        sequence_keys = [k for k, v in inputs.items() if hasattr(v, "shape") and tuple(v.shape[:2]) == shape]
        layers = self._prefixes.get(key)
        if layers is None:
            head = {k: (v[:, :split] if k in sequence_keys else v) for k, v in inputs.items()}
            layers = [(layer.keys, layer.values) for layer in _cache_of(model(**head, use_cache=True, logits_to_keep=1)).layers]
            self._prefixes.put(key, layers)
            self.counters.prefix_misses += 1
        else:
            self.counters.prefix_hits += 1
        cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        tail = {k: inputs[k][:, split:] for k in sequence_keys if k != "attention_mask"}
        out = model(**tail, attention_mask=inputs["attention_mask"], **{self.owner.cache_kwarg: cache}, use_cache=True,
                    logits_to_keep=1)
        return out.logits[:, -1].float(), _cache_of(out)

    def _prefill(self, job: PromptJob) -> None:
        owner = self.owner
        if owner.model is None:
            raise PolicyError("policy is closed")
        input_ids = job.inputs["input_ids"]
        length = int(input_ids.shape[1])
        max_new = job.sampling.max_new_tokens
        if owner.max_positions:
            room = owner.max_positions - length
            if room <= 0:
                raise PolicyError(f"prompt of {length} tokens leaves no room in the model's "
                                  f"{owner.max_positions} positions")
            max_new = min(max_new, room)
        logits, prompt_cache = self._prompt_forward(job)
        if prompt_cache is None:
            raise PolicyError("the model returned no key/value cache from its prefill")
        self.counters.requests += 1
        self.counters.prefill_tokens += length
        first, end = len(self._rows), len(self._rows) + job.n
        self._ensure_room(prompt_cache, end, length + max_new)
        self._cache.fill(first, job.n, prompt_cache, length)
        job.completions = [None] * job.n
        job.open_rows = job.n
        for sample in range(job.n):
            self._rows.append(_Row(job, sample, length, max_new))
        cfg = job.sampling
        self._seen[first:end] = False
        self._seen[first:end, input_ids[0].to(self._seen.device)] = True
        self._seeds[first:end] = [row_seed(job.seed, sample) for sample in range(job.n)]
        self._steps[first:end] = 0
        self._params.temperature[first:end] = cfg.temperature
        self._params.top_k[first:end] = cfg.top_k
        self._params.top_p[first:end] = cfg.top_p
        self._params.penalty[first:end] = cfg.repetition_penalty
        self._offsets[first:end] = _position_offset(owner.model, length)
        self._cols[first:end] = length  # the first generated token is written at column L
        self.counters.rows += job.n
        # Each row's first token comes from the shared prompt logits with the row's own draw.
        self._accept(first, end, self._sample(logits.expand(job.n, -1), first, end))

    def _ensure_room(self, prompt_cache: Any, rows: int, columns: int) -> None:
        if self._cache is None:
            layers = prompt_cache.layers
            keys = layers[0].keys
            self._cache = new_slot_cache(len(layers))
            self._cache.allocate(max(self.capacity, rows), keys.shape[1], max(256, columns), keys.shape[3],
                                 keys.dtype, keys.device)
            self._allocate_rows(self._cache.slots, keys.device)
            return
        cache = self._cache
        if rows > cache.slots or columns > cache.columns:
            old_slots = cache.slots
            cache.grow(rows, max(columns, 2 * cache.columns) if columns > cache.columns else 0)
            if cache.slots > old_slots:
                kept = self._slot_state()
                self._allocate_rows(cache.slots, self._tokens.device)
                for old, new in zip(kept, self._slot_state()):
                    new[: len(old)] = old

    def _allocate_rows(self, slots: int, device: Any) -> None:
        torch = self._torch
        self._seen = torch.zeros(slots, self.owner.vocab_size, dtype=torch.bool, device=device)
        self._tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self._cols = torch.zeros(slots, dtype=torch.long, device=device)
        self._offsets = torch.zeros(slots, dtype=torch.long, device=device)
        self._params = RowSampling(torch.zeros(slots, device=device), torch.zeros(slots, dtype=torch.long, device=device),
                                   torch.ones(slots, device=device), torch.ones(slots, device=device))
        self._seeds = np.zeros(slots, dtype=np.uint64)
        self._steps = np.zeros(slots, dtype=np.uint64)

    def _slot_state(self) -> list[Any]:
        """Every slot-aligned tensor and array (moved together when rows leave or slots grow)."""
        return [self._seen, self._tokens, self._cols, self._offsets, self._seeds, self._steps, *vars(self._params).values()]

    def _sample(self, logits: Any, first: int, end: int) -> Any:
        """Next tokens of slots ``first..end-1`` (a tensor)."""
        torch = self._torch
        params = RowSampling(*(getattr(self._params, k)[first:end] for k in ("temperature", "top_k", "top_p", "penalty")))
        uniforms = torch.from_numpy(row_uniforms(self._seeds[first:end], self._steps[first:end])).to(logits.device)
        return sample_rows(logits, params, self._seen[first:end], uniforms)

    def _accept(self, first: int, end: int, tokens: Any) -> None:
        """Record slots ``first..end-1``'s new tokens; rows that ended leave the batch (their job
        resolves when its last row has ended)."""
        self._seen[first:end].scatter_(1, tokens[:, None].to(self._seen.device), True)
        self._tokens[first:end] = tokens
        self._steps[first:end] += np.uint64(1)
        eos = self.owner.eos_set
        ended: list[int] = []
        for slot, token in zip(range(first, end), tokens.tolist()):
            row = self._rows[slot]
            row.tokens.append(token)
            if token in eos:
                self._finish(row, "stop")
                ended.append(slot)
            elif len(row.tokens) >= row.max_new:
                self._finish(row, "length")
                ended.append(slot)
        self._remove(ended)

    def _finish(self, row: _Row, reason: str) -> None:
        ids = row.tokens[:-1] if reason == "stop" else row.tokens
        self.counters.generated_tokens += len(row.tokens)
        row.job.completions[row.sample] = Completion(self.owner.decode(ids), reason, len(row.tokens), row.prompt_tokens)
        row.job.open_rows -= 1
        job = row.job
        if job.open_rows == 0 and not job.future.done():
            try:
                job.future.set_result(job.result(job.completions) if job.result else job.completions)
            except Exception as exc:  # noqa: BLE001 - e.g. a parser error, handed to the caller
                job.future.set_exception(exc)

    def _remove(self, slots: list[int]) -> None:
        """Take rows out of the batch: the running rows past the new end move into the freed
        slots below it, one gather per tensor for all of them."""
        if not slots:
            return
        gone = set(slots)
        keep = len(self._rows) - len(gone)
        holes = [s for s in sorted(gone) if s < keep]
        movers = [s for s in range(keep, len(self._rows)) if s not in gone]
        if holes:
            torch = self._torch
            targets = torch.tensor(holes, device=self._tokens.device)
            sources = torch.tensor(movers, device=self._tokens.device)
            self._cache.move(sources, targets, int(self._cols[sources].max()) + 1)
            for value in self._slot_state():
                if isinstance(value, np.ndarray):
                    value[holes] = value[movers]
                else:
                    value[targets] = value[sources]
            for hole, mover in zip(holes, movers):
                self._rows[hole] = self._rows[mover]
        del self._rows[keep:]

    def _step(self) -> None:
        """One decode step: every running row feeds its last token and gets its next one."""
        torch = self._torch
        rows = len(self._rows)
        cache = self._cache
        cols = self._cols[:rows]
        width = int(cols.max()) + 1
        cache.rows, cache.width = rows, width
        cache.row_index = torch.arange(rows, device=cols.device)
        cache.write_cols = cols
        dtype = cache.layers[0].keys.dtype
        hidden = torch.arange(width, device=cols.device)[None, :] > cols[:, None]
        mask = torch.zeros(rows, 1, 1, width, dtype=dtype, device=cols.device)
        mask.masked_fill_(hidden[:, None, None, :], torch.finfo(dtype).min)
        positions = (cols + self._offsets[:rows])[:, None]
        out = self.owner.model(input_ids=self._tokens[:rows, None], position_ids=positions, attention_mask=mask,
                               **{self.owner.cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
        self.counters.decode_steps += 1
        self.counters.row_steps += rows
        self._cols[:rows] += 1
        self._accept(0, rows, self._sample(out.logits[:, -1], 0, rows))

    def _fail_running(self, error: BaseException) -> None:
        jobs = {id(row.job): row.job for row in self._rows}
        self._rows.clear()
        for job in jobs.values():
            if not job.future.done():
                job.future.set_exception(error)


class PrefixCache:
    """A small thread-safe LRU map (shared prompt prefixes' keys and values per layer, a problem's
    root prompt tokens); ``entries`` 0 keeps none."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._store: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._store.get(key)
            if value is not None:
                self._store.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        if self.entries <= 0:
            return
        with self._lock:
            self._store[key] = value
            self._store.move_to_end(key)
            while len(self._store) > self.entries:
                self._store.popitem(last=False)


def _as_policy_error(exc: Exception, where: str) -> Exception:
    if isinstance(exc, PolicyError | ValueError):
        return exc
    return PolicyError(f"generation failed in the {where}: {type(exc).__name__}: {exc}")


def _cache_of(output: Any) -> Any:
    """A forward's key/value cache: ``cache`` since transformers 5.20, ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_kwarg(model: Any) -> str:
    """The name the model's forward takes its cache by (``cache``, or ``past_key_values`` before
    transformers 5.20); pyproject allows any transformers 5."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _position_offset(model: Any, length: int) -> int:
    """Rotary position of column ``c`` is ``c + offset``; 1-D rotary decoders use offset 0."""
    return 0


def check_family(model_type: str | None) -> None:
    if model_type not in CONTINUOUS_FAMILIES:
        raise PolicyConfigError(
            f"policy.engine=continuous does not drive model_type {model_type!r} (it drives "
            f"{', '.join(sorted(CONTINUOUS_FAMILIES))}); set policy.engine to generate or auto")


def choose_engine(policy: PolicyConfig, model_type: str | None) -> str:
    """``continuous`` or ``generate`` for a checkpoint of ``model_type`` under ``policy.engine``
    (``auto``: continuous where this engine drives the family).  Raises PolicyConfigError for
    settings that cannot hold (continuous for another family, int8 without the continuous engine)."""
    engine = policy.engine
    if engine == "auto":
        engine = "continuous" if model_type in CONTINUOUS_FAMILIES else "generate"
    if engine == "continuous":
        check_family(model_type)
    elif policy.quantize != "none":
        raise PolicyConfigError(f"policy.quantize={policy.quantize} needs the continuous engine "
                                f"(policy.engine is {policy.engine}, model_type {model_type!r})")
    return engine


class ContinuousTransformersPolicy(TransformersPolicy):
    """The ``transformers`` backend on :class:`ContinuousEngine`: a
    :class:`~mmprm_tasks.search.RolloutEngine` (``submit`` one request, get a future of its ``n``
    rollouts) and a batch backend (``generate``/``complete`` submit everything and wait).
    ``capacity``: rows decoded at once.  Prompts are rendered and preprocessed on the submitting
    thread, so that work overlaps the engine's."""

    def __init__(self, model_dir: str | Path, *, policy: PolicyConfig | None = None,
                 sampling: SamplingConfig | None = None, capacity: int = 256) -> None:
        super().__init__(model_dir, policy=policy, sampling=sampling)
        check_family(self.model.config.model_type)
        if self.policy_cfg.quantize == "int8":
            self.model = quantize_int8(self.model, self.device)
        self.cache_kwarg = cache_kwarg(self.model)
        self.capacity = capacity
        self.engine = ContinuousEngine(self, capacity, self.policy_cfg.prefix_cache_entries)
        self._root_ids = PrefixCache(self.policy_cfg.prefix_cache_entries)

    @property
    def counters(self) -> EngineCounters:
        return self.engine.counters

    def submit(self, request: GenerationRequest) -> Future:
        preset = self.policy_cfg.prompt_preset
        prompt = ChatPrompt(chat_messages(request.prompt_for(preset), preset), [request.image])
        job = self._job(prompt, request.n, request_seed(None, 0, request), None,
                        lambda completions: [parse_rollout(c.text) for c in completions])
        if job.inputs is not None and request.prefix_steps and self.policy_cfg.prefix_cache_entries > 0:
            job.prefix = self._shared_prefix(request, job.inputs["input_ids"][0].tolist())
        return job.future if job.future.done() else self.engine.submit(job)

    def submit_prompt(self, prompt: ChatPrompt, n: int, *, sampling: SamplingConfig | None = None,
                      seed: int | None = None, result: Callable[[list[Any]], Any] | None = None) -> Future:
        """A future of ``n`` completions of ``prompt`` (or of ``result(completions)``)."""
        job = self._job(prompt, n, seed, sampling, result)
        return job.future if job.future.done() else self.engine.submit(job)

    def _job(self, prompt: ChatPrompt, n: int, seed: int | None, sampling: SamplingConfig | None,
             result: Callable[[list[Any]], Any] | None) -> PromptJob:
        """The engine's job for ``prompt``, its tensors made here; a prompt that cannot be made
        (a bad image) is a job whose future already holds the error."""
        if seed is None:
            seed = int(self._torch.randint(0, 2**31 - 1, ()).item())
        job = PromptJob(self.render(prompt), n, seed, sampling or self.sampling, result=result)
        try:
            job.inputs = self.prepare_inputs([job.text], [[load_image(b) for b in prompt.images]])
        except Exception as exc:  # noqa: BLE001 - a bad image or prompt is this request's error
            job.future.set_exception(exc if isinstance(exc, ValueError | PolicyError)
                                     else PolicyError(f"preparing the prompt failed: {exc}"))
        return job

    def _shared_prefix(self, request: GenerationRequest, ids: list[int]) -> tuple[Any, int] | None:
        """The part of a continuation request's prompt that every request of its problem shares:
        its longest common token prefix with the problem's root prompt (question and image, no
        steps).  A function of the request alone, so the split, and with it the numbers, do not
        depend on what ran before.  None when the split would leave image tokens after it."""
        image_digest = hashlib.blake2b(request.image, digest_size=16).digest()
        root_key = (request.question, image_digest, self.policy_cfg.prompt_preset)
        root = self._root_ids.get(root_key)
        if root is None:
            preset = self.policy_cfg.prompt_preset
            root_prompt = GenerationRequest(request.question, request.image).prompt_for(preset)
            text = self.render(ChatPrompt(chat_messages(root_prompt, preset), [request.image]))
            root = self.prepare_inputs([text], [[load_image(request.image)]])["input_ids"][0].tolist()
            self._root_ids.put(root_key, root)
        split = 0
        for a, b in zip(ids, root):
            if a != b:
                break
            split += 1
        split = min(split, len(ids) - 1)
        image_token = getattr(self.processor, "image_token_id", None)
        if split < 1 or (image_token is not None and image_token in ids[split:]):
            return None
        key = hashlib.blake2b(image_digest + np.asarray(ids[:split], dtype=np.int64).tobytes(), digest_size=16).digest()
        return key, split

    def generate(self, requests: Sequence[GenerationRequest], *, seed: int | None = None) -> list[list[Rollout]]:
        preset = self.policy_cfg.prompt_preset
        futures = [self.submit_prompt(ChatPrompt(chat_messages(r.prompt_for(preset), preset), [r.image]), r.n,
                                      seed=request_seed(seed, i, r)) for i, r in enumerate(requests)]
        return [[parse_rollout(c.text) for c in f.result()] for f in futures]

    def complete(self, prompts: Sequence[ChatPrompt], ns: Sequence[int], *, sampling: SamplingConfig | None = None,
                 seeds: Sequence[int | None] | None = None) -> list[list[Any]]:
        if len(prompts) != len(ns) or (seeds is not None and len(seeds) != len(prompts)):
            raise ValueError("one n (and one seed) per prompt")
        seeds = list(seeds or [None] * len(prompts))
        futures = [self.submit_prompt(p, n, sampling=sampling, seed=s) for p, n, s in zip(prompts, ns, seeds)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.engine.close()
        super().close()


def quantize_int8(model: Any, device: str) -> Any:
    """int8 dynamic quantization of the linear layers (CPU kernels only).  Activations are
    quantized per tensor, so a row's output then depends on the rows it shares a step with: trees
    are no longer independent of batching (an opt-in trade of exactness for speed)."""
    import torch

    if not device.startswith("cpu"):
        raise PolicyConfigError(f"policy.quantize=int8 is CPU-only (device is {device}); use bf16 on GPUs")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates its quantized tensors in favour of torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


__all__ = ["CONTINUOUS_FAMILIES", "ContinuousEngine", "ContinuousTransformersPolicy", "EngineCounters", "PromptJob",
           "row_uniforms", "sample_rows"]
