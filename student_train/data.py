"""Cache reader -> an ordered stream of samples -> padded batches.

The order is a pure function of (seed, manifests): each cache is a list of
(shard, row) items; an epoch permutes shards, then shuffles rows within windows
of `window` consecutive shards (a shuffle buffer that holds `window` shards at a
time). With `domain_ratio`, domain caches (made with --only-domain) and general
caches are two streams interleaved at that ratio, round by round: the `world`
indices of one round (one per rank) take the same kind, so every rank's samples
mix at the ratio (per-index routing would give one rank every domain sample at a
ratio of 1/world). Global index i goes to rank i % world. With dataloader
workers, shard j of an epoch's shard order is read by worker j % num_workers
alone (each shard's bytes are fetched once, not once per worker), and the rank's
samples are put back in plan order as they are consumed; resuming is skipping the
consumed count, with no decoding.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from student_train.checks import check_has_samples, check_has_targets
from teacher_cache.cache import Cache, CachedSample, RawRow

Item = tuple[int, int, int]  # (cache index, shard index within that cache, row)


@dataclass(frozen=True)
class Stream:
    """One source of samples: the rows of some caches' shards, cycled epoch after epoch."""

    shard_rows: dict[tuple[int, int], int]  # (cache, shard) -> rows, in cache order
    window: int
    seed: int

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [N, 4] (cache, shard, row, slot): shards permuted, rows shuffled within each
        window; slot is the shard's place in the epoch's shard order (which worker reads it)."""
        rng = np.random.default_rng([self.seed, epoch])
        shards = list(self.shard_rows)
        order = [shards[i] for i in rng.permutation(len(shards))]
        parts = [np.empty((0, 4), np.int64)]
        for start in range(0, len(order), self.window):
            group = order[start : start + self.window]
            sizes = [self.shard_rows[key] for key in group]
            rows = np.empty((sum(sizes), 4), np.int64)  # the group's rows, shard after shard
            rows[:, :2] = np.repeat(np.array(group, np.int64).reshape(-1, 2), sizes, axis=0)
            rows[:, 2] = np.arange(len(rows)) - np.repeat(np.cumsum([0, *sizes[:-1]]), sizes)
            rows[:, 3] = np.repeat(np.arange(start, start + len(group)), sizes)
            parts.append(rows[rng.permutation(len(rows))])
        return np.concatenate(parts)

    def items(self) -> Iterator[Item]:
        """Every (cache, shard, row) in cache order."""
        for (c, s), n in self.shard_rows.items():
            for r in range(n):
                yield c, s, r

    @cached_property
    def size(self) -> int:
        return sum(self.shard_rows.values())

    def __len__(self) -> int:
        return self.size


class Plan:
    """Global sample index -> (cache, shard, row), infinite, deterministic."""

    def __init__(
        self, caches: list[Cache], *, seed: int, window: int = 4, domain_ratio: float | None = None, world: int = 1
    ) -> None:
        if not isinstance(caches, (list, tuple)):  # one Cache is iterable too: its samples, not caches
            raise TypeError(f"caches must be a list of Cache, got {type(caches).__name__}")
        stray = next((c for c in caches if not isinstance(c, Cache)), None)
        if stray is not None:  # a path: "'str' object has no attribute 'manifest'"
            raise TypeError(f"caches must be a list of Cache (teacher_cache.open_cache(path)), got {stray!r}")
        if not caches:
            raise ValueError("no caches given")
        if window < 1 or world < 1:
            raise ValueError(f"window and world must be >= 1, got {window} and {world}")

        def stream(indices: list[int], salt: int) -> Stream:
            shard_rows = {(c, s): e["rows"] for c in indices for s, e in enumerate(caches[c].manifest["shards"])}
            drawn = [caches[c] for c in indices]  # the caches this stream draws from, not every cache given
            check_has_samples(drawn)  # (train and eval both read a Plan)
            check_has_targets(drawn)
            return Stream(shard_rows, window, seed * 1000 + salt)

        self.domain_caches = [i for i, c in enumerate(caches) if c.manifest["data"].get("only_domain")]
        general = [i for i in range(len(caches)) if i not in self.domain_caches]
        self.ratio, self.world = domain_ratio, world
        if domain_ratio is None:
            self.streams = [stream(list(range(len(caches))), 0)]
        else:
            if not 0.0 <= domain_ratio <= 1.0:
                raise ValueError("--domain-ratio must be within [0, 1]")
            if (domain_ratio > 0 and not self.domain_caches) or (domain_ratio < 1 and not general):
                raise ValueError("--domain-ratio needs a domain cache (made with --only-domain) and a general one")
            # a ratio of 0 or 1 draws from one kind only; the other may be absent
            self.streams = [
                stream(self.domain_caches, 1) if domain_ratio > 0 else None,
                stream(general, 2) if domain_ratio < 1 else None,
            ]
        self._epochs: dict[tuple[int, int], np.ndarray] = {}  # (stream, epoch) -> its order, int64 [N, 4]

    def _route(self, i: int) -> tuple[int, int]:
        """Global index -> (stream, index within that stream)."""
        if self.ratio is None:
            return 0, i
        n, rank = divmod(i, self.world)  # round n: its `world` indices, one per rank, take one kind
        r = self.ratio
        n_domain = math.floor(n * r)  # rounds before n that took the domain stream
        if math.floor((n + 1) * r) - n_domain:  # 1 at a fraction r of rounds
            return 0, n_domain * self.world + rank
        return 1, (n - n_domain) * self.world + rank

    def short_stream(self, n: int) -> int | None:
        """Size of a stream that n consecutive samples draw from more often than it holds samples, else None."""
        taken = [0] * len(self.streams)
        for i in range(n):
            taken[self._route(i)[0]] += 1
        short = [len(s) for s, t in zip(self.streams, taken, strict=True) if s is not None and t > len(s)]
        return min(short) if short else None

    def item(self, i: int) -> Item:
        return self.locate(i, 1)[0]

    def reader(self, i: int, workers: int) -> int:
        return self.locate(i, workers)[1]

    def locate(self, i: int, workers: int) -> tuple[Item, int]:
        """Sample i -> (its (cache, shard, row), which of `workers` dataloader workers reads it).
        Each shard is read by one worker per epoch: its slot in the epoch's shard order, modulo
        workers (a window's consecutive slots spread its shards over the workers)."""
        s, j = self._route(i)
        stream = self.streams[s]
        epoch, k = divmod(j, len(stream))
        key = (s, epoch)
        if key not in self._epochs:  # indices mostly go forward: a stream's older epochs go (rebuilt if asked)
            for old in [k for k in self._epochs if k[0] == s and k[1] < epoch - 1]:
                del self._epochs[old]
            self._epochs[key] = stream.epoch_order(epoch)
        c, shard, row, slot = self._epochs[key][k].tolist()
        return (c, shard, row), slot % workers


class _OpenShard:
    """A shard read lazily: its rows are fetched (and its chunks checked) only as far as asked,
    and only the rows asked for are decoded (a dataloader worker decodes its own rows only)."""

    def __init__(self, cache: Cache, name: str) -> None:
        self._cache, self._rows, self._fetched = cache, cache.iter_rows(name), []

    def raw(self, r: int) -> RawRow:
        """Row `r`, undecoded (the rows before it are fetched and kept too)."""
        while len(self._fetched) <= r:
            self._fetched.append(next(self._rows))
        return self._fetched[r]

    def __getitem__(self, r: int) -> CachedSample:
        return self._cache.decode(self.raw(r))


class ShardCache:
    """Shards kept open while the shuffle window needs them (LRU, `size` shards).

    A shard is streamed, not downloaded first: the first batch waits only for the
    chunks holding the rows it needs.
    """

    def __init__(self, caches: list[Cache], size: int) -> None:
        self.caches, self.size = caches, size
        self._shards: OrderedDict[tuple[int, int], _OpenShard] = OrderedDict()

    def raw(self, item: Item) -> RawRow:
        """The item's row, undecoded."""
        c, s, r = item
        key = (c, s)
        if key not in self._shards:
            if len(self._shards) >= self.size:
                self._shards.popitem(last=False)
            cache = self.caches[c]
            self._shards[key] = _OpenShard(cache, cache.shard_names[s])
        self._shards.move_to_end(key)
        return self._shards[key].raw(r)

    def get(self, item: Item) -> CachedSample:
        return self.caches[item[0]].decode(self.raw(item))


def rank_indices(start: int, rank: int, world: int) -> Iterator[int]:
    """Global indices of one rank from its `start`-th sample on."""
    i = start * world + rank
    while True:
        yield i
        i += world


class SampleStream(torch.utils.data.IterableDataset):
    """This rank's samples from position `start` as (cache index, sample), in plan order; with
    `workers` > 1, only those of the shards that reader `worker` reads (see Plan.reader).

    One stream per dataloader worker (a DataLoader of num_workers=1 each): `load_samples`
    builds them and puts their samples back in order.
    """

    def __init__(
        self,
        caches: list[Cache],
        plan: Plan,
        *,
        rank: int,
        world: int,
        start: int,
        window: int,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        if not 0 <= rank < world or start < 0:  # rank 2 of 2 silently took rank 0's samples
            raise ValueError(
                f"rank must be in [0, world) and start >= 0, got rank {rank}, world {world}, start {start}"
            )
        if not 0 <= worker < workers:
            raise ValueError(f"worker must be in [0, workers), got worker {worker}, workers {workers}")
        self.caches, self.plan = caches, plan
        self.rank, self.world, self.start, self.window = rank, world, start, window
        self.worker, self.workers = worker, workers

    def __iter__(self) -> Iterator[tuple[int, CachedSample]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:  # each of its workers would yield every sample
            raise RuntimeError("a SampleStream is read by one DataLoader worker: use load_samples(num_workers=N)")
        shards = ShardCache(self.caches, self.window * len(self.plan.streams) + 1)  # both streams' windows
        for i in rank_indices(self.start, self.rank, self.world):
            item, reader = self.plan.locate(i, self.workers)
            if reader == self.worker:
                yield item[0], shards.get(item)


PREFETCH = 4  # samples each worker decodes ahead (a sample's targets: ~12 bytes x k per position)


def load_samples(
    caches: list[Cache], plan: Plan, *, rank: int, world: int, start: int, window: int, num_workers: int = 0
) -> Iterator[tuple[int, CachedSample]]:
    """This rank's samples from its `start`-th on, in plan order, as (cache index, sample).

    With num_workers, each worker process reads and decodes the shards Plan.reader gives it
    (every shard's bytes are fetched by one process) and runs at most PREFETCH samples ahead;
    the samples are taken from the worker that holds each next one, so the order is the plan's
    whatever the worker count. Workers are forked (where the platform can) and die with this
    process (die_with). Torch's global RNG is left as it was (a resume stays exact).
    """
    common = dict(rank=rank, world=world, start=start, window=window)
    # a worker past the largest stream's shard count would read no shard: it would skip every
    # index for ever (a spinning process, and a join timeout at the end)
    num_workers = min(num_workers, max(len(s.shard_rows) for s in plan.streams if s is not None))
    if not num_workers:
        return iter(SampleStream(caches, plan, **common))
    forked = "fork" in multiprocessing.get_all_start_methods()  # Python 3.14 on Linux defaults to a forkserver
    rng = torch.get_rng_state()
    readers = [
        iter(  # each iter() draws a base seed from the global RNG: put back below
            torch.utils.data.DataLoader(
                SampleStream(caches, plan, **common, worker=w, workers=num_workers),
                batch_size=None,
                num_workers=1,
                prefetch_factor=PREFETCH,
                worker_init_fn=functools.partial(die_with, os.getpid()) if forked else None,
                multiprocessing_context="fork" if forked else None,
            )
        )
        for w in range(num_workers)
    ]
    torch.set_rng_state(rng)
    return _in_order(readers, plan, rank, world, start)


def _in_order(readers: list[Iterator], plan: Plan, rank: int, world: int, start: int) -> Iterator:
    """Each next sample from the worker that reads it."""
    for i in rank_indices(start, rank, world):
        yield next(readers[plan.reader(i, len(readers))])


@dataclass
class Batch:
    """Padded batch; P is the number of target positions over the whole batch."""

    input_ids: torch.Tensor  # int64 [B, T], right-padded with 0
    attention_mask: torch.Tensor  # int64 [B, T]
    row: torch.Tensor  # int64 [P] batch row of each target position
    pos: torch.Tensor  # int64 [P] position t within its row (target predicts t + 1)
    labels: torch.Tensor  # int64 [P] input_ids[row, pos + 1]
    is_domain: torch.Tensor  # bool [P] the sample came from a domain cache
    topk_ids: torch.Tensor | None  # int64 [P, k]
    topk_logprobs: torch.Tensor | None  # float32 [P, k]
    tail_logprob: torch.Tensor | None  # float32 [P]
    sampled_ids: torch.Tensor | None  # int64 [P, m]
    sampled_weights: torch.Tensor | None  # float32 [P, m]
    attn_ids: torch.Tensor | None  # int64 [L, P, ka] key positions
    attn_logprobs: torch.Tensor | None  # float32 [L, P, ka]
    attn_tail: torch.Tensor | None  # float32 [L, P]
    sample_ids: list[str]
    tokens: int

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Batch(**moved)


def collate(samples: list[tuple[int, CachedSample]], domain_caches: list[int], attention: bool) -> Batch:
    """Stack samples into a padded batch with flattened sparse targets (host tensors, no vocab dim)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    if len({s.topk_ids is None for _, s in samples}) > 1:  # train refuses such caches before it starts
        raise ValueError("collate needs samples of one kind: top-k and sampled targets cannot share a batch")
    B = len(samples)
    T = max(len(s.input_ids) for _, s in samples)
    ids = torch.zeros((B, T), dtype=torch.long)  # int64 [B, T]
    mask = torch.zeros((B, T), dtype=torch.long)  # int64 [B, T]
    rows, pos, dom = [], [], []
    for b, (c, s) in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n] = torch.from_numpy(s.input_ids)
        mask[b, :n] = 1
        rows.append(np.full(len(s.target_positions), b, np.int64))  # int64 [P_s]
        pos.append(s.target_positions)  # int64 [P_s]
        dom.append(np.full(len(s.target_positions), c in domain_caches))  # bool [P_s]
    row = torch.from_numpy(np.concatenate(rows))  # int64 [P]
    p = torch.from_numpy(np.concatenate(pos))  # int64 [P]
    just = [s for _, s in samples]
    topk = _collate_topk(just) if just[0].topk_ids is not None else (None, None, None)
    sampled = _collate_sampled(just) if just[0].topk_ids is None else (None, None)
    attn = _collate_attention(just) if attention and just[0].attention_ids is not None else (None, None, None)
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        row=row,
        pos=p,
        labels=ids[row, p + 1],  # int64 [P]: the token each target position predicts
        is_domain=torch.from_numpy(np.concatenate(dom)),  # bool [P]
        topk_ids=topk[0],
        topk_logprobs=topk[1],
        tail_logprob=topk[2],
        sampled_ids=sampled[0],
        sampled_weights=sampled[1],
        attn_ids=attn[0],
        attn_logprobs=attn[1],
        attn_tail=attn[2],
        sample_ids=[s.sample_id for s in just],
        tokens=int(mask.sum()),
    )


def _collate_topk(samples: list[CachedSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids int64 [P, k], logprobs float32 [P, k], tail float32 [P]; k the batch's largest."""
    ids, lps = _pad_entries([(s.topk_ids, s.topk_logprobs) for s in samples], axis=0)  # [P, k] each
    tail = np.concatenate([s.tail_logprob for s in samples])  # float32 [P]
    return torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(tail)


def _collate_sampled(samples: list[CachedSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged draws -> ids int64 [P, m], weights float32 [P, m] (counts over each row's num_draws)."""
    offsets, ids, counts, draws = [], [], [], []
    base = 0
    for s in samples:
        offsets.append(s.sampled_offsets[:-1] + base)  # int64 [P_s]
        ids.append(s.sampled_ids)  # int64 [N_s]
        counts.append(s.sampled_counts)  # int32 [N_s]
        draws.append(np.full(len(s.target_positions), s.num_draws, np.int64))  # int64 [P_s]
        base += len(s.sampled_ids)
    off = torch.from_numpy(np.concatenate([*offsets, [base]]))  # int64 [P + 1]
    same = len({s.num_draws for s in samples}) == 1  # caches of one run may differ (DAE)
    per_row = samples[0].num_draws if same else torch.from_numpy(np.concatenate(draws))  # int or int64 [P]
    return sampled_to_padded(
        off, torch.from_numpy(np.concatenate(ids)), torch.from_numpy(np.concatenate(counts)), per_row
    )


def sampled_to_padded(
    offsets: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    num_draws: int | torch.Tensor,
    *,
    teacher_logprobs: torch.Tensor | None = None,
    proposal_logprobs: torch.Tensor | None = None,
    self_normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged sampled targets -> padded ``(ids int64 [P, m], weights float32 [P, m])``.

    Args:
        offsets: int64 [P+1], row p owns entries ``offsets[p]:offsets[p+1]``;
            ``offsets[0] == 0`` and ``offsets[-1] == N``.
        ids: int64 [N] distinct sampled ids per row, N over all rows (ragged).
        counts: int32 [N] times each id was drawn; each row's draws total num_draws.
        num_draws: draws per position: an int, or int [P] per row (a batch that mixes
            caches made with different ``--num-draws``).
        teacher_logprobs, proposal_logprobs: float32 [N] log p(id) and log q(id),
            given together when the draws came from a proposal q other than the
            teacher p; the weights are then importance weights
            ``counts / num_draws * p / q``. Without them q = p and the weights
            are ``counts / num_draws``. Either way ``E[weights] = p`` per id.
        self_normalize: divide each row's weights by their sum (biased but lower
            variance; rows then sum to 1).

    Returns:
        ids int64 [P, m] and weights float32 [P, m] with m the longest row;
        padding is id 0 with weight 0.
    """
    per_row = isinstance(num_draws, torch.Tensor)
    if (int(num_draws.min()) if per_row and num_draws.numel() else 1 if per_row else num_draws) < 1:
        raise ValueError("num_draws must be >= 1 (the weights are counts / num_draws)")
    if (teacher_logprobs is None) != (proposal_logprobs is None):
        raise ValueError("pass teacher_logprobs and proposal_logprobs together")
    offsets = offsets.long()
    n, num_rows = ids.numel(), offsets.numel() - 1
    if num_rows < 0 or int(offsets[0]) != 0 or int(offsets[-1]) != n:
        raise ValueError(f"offsets must run from 0 to len(ids)={n}")
    lengths = offsets[1:] - offsets[:-1]  # [P]
    m = int(lengths.max()) if num_rows > 0 else 0
    row = torch.repeat_interleave(torch.arange(num_rows, device=ids.device), lengths)  # [N]
    col = torch.arange(n, device=ids.device) - offsets[row]  # [N]

    draws = num_draws[row].float() if isinstance(num_draws, torch.Tensor) else num_draws  # [N] or scalar
    flat_w = counts.float() / draws  # [N]
    if teacher_logprobs is not None:
        flat_w = flat_w * (teacher_logprobs.float() - proposal_logprobs.float()).exp()  # [N]

    padded_ids = torch.zeros(num_rows, m, dtype=torch.int64, device=ids.device)  # [P, m]
    weights = torch.zeros(num_rows, m, dtype=torch.float32, device=ids.device)  # [P, m]
    padded_ids[row, col] = ids.long()
    weights[row, col] = flat_w
    if self_normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return padded_ids, weights


def _collate_attention(samples: list[CachedSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> key ids int64 [L, P, ka], logprobs float32 [L, P, ka], tail float32 [L, P]."""
    ids, lps = _pad_entries([(s.attention_ids, s.attention_logprobs) for s in samples], axis=1)  # [L, P, ka]
    tail = np.concatenate([s.attention_tail_logprob for s in samples], axis=1)  # float32 [L, P]
    return torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(tail)


def _pad_entries(parts: list[tuple[np.ndarray, np.ndarray]], axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (ids int64 [..., P_s, k_s], logprobs float32 [..., P_s, k_s]) -> concatenated
    along the position axis, rows shorter than the longest k padded with their own first id at
    logprob -inf: no teacher mass, and a repeated id the losses ignore (caches of one run may be
    made with different --top-k)."""
    k = max(ids.shape[-1] for ids, _ in parts)
    out_ids, out_lps = [], []
    for ids, lps in parts:
        short = k - ids.shape[-1]
        if short:
            ids = np.concatenate([ids, np.repeat(ids[..., :1], short, axis=-1)], axis=-1)
            lps = np.concatenate([lps, np.full((*lps.shape[:-1], short), -np.inf, lps.dtype)], axis=-1)
        out_ids.append(ids)
        out_lps.append(lps)
    return np.concatenate(out_ids, axis=axis), np.concatenate(out_lps, axis=axis)


def die_with(trainer: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn` for workers forked by the trainer (as functools.partial(die_with,
    os.getpid()), with multiprocessing_context="fork"): the worker is killed when the trainer dies
    (Linux: PR_SET_PDEATHSIG), kill -9 included. A worker blocked on a full queue never notices
    its parent is gone, and lived on with its memory.

    On SIGTERM the worker exits quietly (status 0): the trainer answers the signal (one line,
    exit 143). A SIGTERM sent to the whole process group (Slurm's scancel and time limit, torchrun
    ending the other ranks) killed the workers by the signal, and the trainer's DataLoader then
    raised "DataLoader worker (pid N) is killed by signal: Terminated." instead: exit 1. (Ignored,
    the signal would leave the loader's own terminate() at shutdown waiting for ever.)"""
    import ctypes
    import signal

    signal.signal(signal.SIGTERM, _quiet_exit)  # replaces torch's worker handler (killed by the signal)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: torch's own watchdog is all there is
        return
    if os.getppid() != trainer:  # the trainer died before the call: no signal will come
        os._exit(1)


def _quiet_exit(signum: int, frame: object) -> None:
    """A DataLoader worker's SIGTERM: exit with status 0, which the trainer's loader does not report
    as a worker killed (die_with)."""
    os._exit(0)
