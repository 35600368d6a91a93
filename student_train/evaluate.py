"""`student-train eval`: a student against held-out cached teacher targets, split by domain."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import numpy as np
import torch

from student_train import losses
from student_train.checks import (
    check_distinct,
    check_student_matches,
    check_student_model,
    check_temperature,
    may_share_samples,
)
from student_train.data import Batch, Plan, ShardCache, collate
from teacher_cache.cache import CachedSample
from teacher_cache.errors import plural
from teacher_cache.progress import bar as progress_bar
from teacher_cache.settings import is_int


@torch.no_grad()
def evaluate(
    model_path: str,
    cache_paths: list[str] | str,
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    temperature: float = 1.0,
    progress: bool = False,
) -> dict:
    """Held-out KL to the teacher (over the cached k+1 outcomes), NLL of the labels, top-1 agreement.

    Reported overall and split into domain (samples from --only-domain caches) and general, and the
    domain part once more by each sample's domain ("by_domain": one entry per expert's domain).

    Returns a JSON-ready dict: "all", and "domain" / "general" where they hold positions, each
    {"kl_to_teacher", "nll", "top1_agreement" (floats, per target position), "positions",
    "samples" (ints)}; "by_domain" ({domain: the same}) where there is a domain part; "kl_kind"
    and "top1_kind" (what the figures are for this kind of cache); "model" and "caches" as given.
    """
    from teacher_cache import open_cache
    from teacher_cache.models import load_causal_lm, resolve_model
    from teacher_cache.tokenize import load_tokenizer

    if isinstance(cache_paths, (str, os.PathLike)):  # one cache: evaluate("m", "caches/held") read "c", "a", ...
        cache_paths = [cache_paths]
    model_path, cache_paths = os.fspath(model_path), [os.fspath(c) for c in cache_paths]  # the report is JSON
    if not cache_paths:
        raise ValueError("no caches given to evaluate")
    for name, value, least in (("batch_size", batch_size, 1), ("max_samples", max_samples, 1)):
        if value is not None and not (is_int(value) and value >= least):
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    caches = [open_cache(c) for c in cache_paths]
    check_distinct(caches)
    for cache in caches:  # as train: an empty cache (a domain filter that matched nothing) is no part of a report
        if not len(cache):
            raise ValueError(f"no samples in {cache.where}: it is empty")
    ref = resolve_model(model_path)
    check_student_matches(load_tokenizer(ref.path, ref.revision), caches)
    model = load_causal_lm(ref.path, progress=progress, dtype=torch.float32, use_safetensors=True).eval()
    check_student_model(model.config.to_dict(), caches)
    plan = Plan(caches, seed=0, window=1)
    items = eval_items(plan, len(caches), max_samples)
    kind = caches[0].kind
    check_temperature(kind, temperature)
    with progress_bar(len(items), "evaluating", "sample", enabled=progress) as bar:
        stats = functools.partial(position_stats, model, kind=kind, temperature=temperature)
        report = measure(stats, caches, plan, items, batch_size=batch_size, bar=bar)
    report["model"] = model_path
    report["caches"] = cache_paths
    return report


def eval_items(plan: Plan, num_caches: int, max_samples: int | None) -> list[tuple[int, int, int]]:
    """The (cache index, shard, row) of the samples to evaluate: the first `max_samples` of each
    cache (all when None), listed as the plan draws them (not every row of a large cache first,
    and a domain cache given last is still in the report)."""
    taken = dict.fromkeys(range(num_caches), 0)
    items = []
    for item in (it for s in plan.streams if s is not None for it in s.items()):
        if max_samples is None or taken[item[0]] < max_samples:
            taken[item[0]] += 1
            items.append(item)
    return items


EVAL_CHUNK = 1024  # target positions per [chunk, V] block of logits (a batch's [P, V] is GBs at V = 128k)


def position_stats(
    model: torch.nn.Module, b: Batch, *, kind: str, temperature: float = 1.0, chunk: int = EVAL_CHUNK
) -> torch.Tensor:
    """float32 [3, P]: at each target position of the batch, the KL to the teacher (`losses.topk_kl`
    or `sampled_kl` per position), the NLL of the label and top-1 agreement with the teacher (1 or
    0), from a causal LM's logits `chunk` rows at a time."""
    # use_cache=False: in eval mode the decoder would otherwise keep every layer's keys and values
    hidden = model.get_decoder()(
        input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
    ).last_hidden_state  # [B, T, D]
    h = hidden[b.row, b.pos]  # [P, D] at the target positions
    head = model.get_output_embeddings()
    if kind == "topk":
        teacher_top1 = b.topk_ids[:, 0]  # int64 [P], ids come by descending log-prob
    else:  # the id of each row's largest weight: argmax [P, 1] gathered from sampled_ids [P, m]
        teacher_top1 = b.sampled_ids.gather(1, b.sampled_weights.argmax(1, keepdim=True))[:, 0]  # int64 [P]
    blocks = []
    for lo in range(0, h.shape[0], chunk):
        rows = slice(lo, lo + chunk)
        z = head(h[rows]).float()  # float32 [c, V]
        if kind == "topk":
            kl = losses.topk_kl_rows(z, b.topk_ids[rows], b.topk_logprobs[rows], b.tail_logprob[rows],
                                     temperature=temperature)  # fmt: skip
        else:
            kl = losses.sampled_kl_rows(z, b.sampled_ids[rows], b.sampled_weights[rows], temperature=temperature)
        nll = torch.nn.functional.cross_entropy(z, b.labels[rows], reduction="none")  # float32 [c]
        agree = (z.argmax(-1) == teacher_top1[rows]).float()  # float32 [c]
        blocks.append(torch.stack([kl.float(), nll, agree]))  # [3, c]
    return torch.cat(blocks, 1) if blocks else h.new_zeros(3, 0, dtype=torch.float32)


@torch.no_grad()
def measure(
    forward: Callable[[Batch], torch.Tensor],
    caches: list,
    plan: Plan,
    items: list[tuple[int, int, int]],
    *,
    batch_size: int,
    device: torch.device | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    rank: int = 0,
    world: int = 1,
    lockstep: bool = False,
    bar=None,
    rows: ShardCache | KeptRows | None = None,
) -> dict:
    """KL to the teacher, NLL and top-1 agreement on `items` of the model whose per-position
    figures `forward` gives (`position_stats`; the model in eval mode), as `evaluate` reports them
    (without "model" and "caches"). Batches are collated on the CPU and moved to `device`.

    Under torchrun each rank takes every world-th item and the sums are gathered, so every rank
    returns the whole report. `lockstep` (FSDP: every forward gathers the shards of all ranks)
    makes every rank run as many forward passes as the rank with the most batches: the spare ones
    repeat its first batch and count for nothing. `rows`: where the items are read (default: the
    shards, one open at a time)."""
    kind = caches[0].kind
    mine = items[rank::world]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if lockstep and world > 1:
        first_ranks = -(-len(items) // world)  # items of rank 0, which has the most: ceil(n / world)
        batches += [None] * (-(-first_ranks // batch_size) - len(batches))
    sums = _groups()
    by_domain: dict[str, dict] = {}  # the domain group split by each sample's domain
    shards = rows if rows is not None else ShardCache(caches, size=1)  # items run shard by shard
    for batch in batches:
        spare = batch is None
        chunk = [(item[0], shards.get(item)) for item in (mine[:batch_size] if spare else batch)]
        if spare and not chunk:  # this rank has no item at all: the first of all items
            chunk = [(items[0][0], shards.get(items[0]))]
        if bar is not None and not spare:
            bar.update(len(chunk))
        into = (_groups(), {}) if spare else (sums, by_domain)
        with autocast if autocast is not None else contextlib.nullcontext():
            _add_batch(forward, chunk, plan.domain_caches, *into, device)
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (sums, by_domain))
        sums, by_domain = _groups(), {}
        for part_sums, part_domains in gathered:
            for group, g in part_sums.items():
                _add(sums[group], g)
            for name, g in part_domains.items():
                _add(by_domain.setdefault(name, _zero()), g)
    report = {}
    total = _zero()
    for group, g in sums.items():
        _add(total, g)
        if g["positions"]:
            report[group] = _finish(g)
    if not total["positions"]:  # rows without target positions (the manifests' counts said otherwise)
        raise ValueError(f"no target positions in the samples measured of {', '.join(str(c.where) for c in caches)}")
    report["all"] = _finish(total)
    if by_domain:
        report["by_domain"] = {name: _finish(g) for name, g in sorted(by_domain.items())}
    report["kl_kind"] = (
        "KL over the cached top-k + tail" if kind == "topk" else "sampled cross-entropy estimate (KL + teacher entropy)"
    )
    report["top1_kind"] = (  # a sampled cache's most-drawn id is the teacher's top-1 only most of the time
        "the teacher's top-1" if kind == "topk" else "the most-drawn id (ties: the lowest id)"
    )
    return report


def _add(into: dict, g: dict) -> None:
    for k in into:
        into[k] += g[k]


def _groups() -> dict[str, dict]:
    """Empty sums for the report's two groups: the domain caches' samples and the rest."""
    return {"domain": _zero(), "general": _zero()}


def _zero() -> dict:
    return {"kl": 0.0, "nll": 0.0, "agree": 0.0, "positions": 0, "samples": 0}


def _add_batch(
    forward: Callable[[Batch], torch.Tensor],
    chunk: list,
    domain_caches: list[int],
    sums: dict,
    by_domain: dict,
    device: torch.device | None = None,
) -> None:
    """Add one batch's KL, NLL, top-1 agreement and counts to `sums` (domain / general) and to
    `by_domain` (each domain cache sample's own domain)."""
    b = collate(chunk, domain_caches, attention=False)  # host tensors: the groups are summed here
    kl, nll, agree = forward(b if device is None else b.to(device)).cpu()  # float32 [P] each
    # each position's domain ("" outside domain caches): the sample's, by row of the batch
    names = np.array([(s.domain or "") if c in domain_caches else "" for c, s in chunk], dtype=object)
    pos_names = names[b.row.numpy()]  # object [P]
    groups = [(sums["domain"], b.is_domain), (sums["general"], ~b.is_domain)]  # sel bool [P]
    for name in sorted({n for n in names if n}):
        groups.append((by_domain.setdefault(name, _zero()), torch.from_numpy(pos_names == name)))
    for g, sel in groups:
        n = int(sel.sum())
        if n == 0:
            continue
        g["kl"] += float(kl[sel].sum(dtype=torch.float64))
        g["nll"] += float(nll[sel].sum(dtype=torch.float64))
        g["agree"] += float(agree[sel].sum())
        g["positions"] += n
    for (c, _), name in zip(chunk, names, strict=True):
        sums["domain" if c in domain_caches else "general"]["samples"] += 1
        if name:  # its entry was made above
            by_domain[name]["samples"] += 1


def _finish(g: dict) -> dict:
    n = max(g["positions"], 1)
    return {
        "kl_to_teacher": g["kl"] / n,
        "nll": g["nll"] / n,
        "top1_agreement": g["agree"] / n,
        "positions": g["positions"],
        "samples": g["samples"],
    }


KEEP_BYTES = 256 * 2**20  # stored bytes of the shards an evaluation reads, up to which HeldOut keeps its rows


class KeptRows:
    """The rows of items read once, kept undecoded (their Arrow record batches), decoded at
    each `get`: HeldOut's items between evaluations, not fetched again."""

    def __init__(self, caches: list) -> None:
        self.caches, self._rows = caches, {}
        self._reader: ShardCache | None = None

    def get(self, item: tuple[int, int, int]) -> CachedSample:
        raw = self._rows.get(item)
        if raw is None:
            if self._reader is None:
                self._reader = ShardCache(self.caches, size=1)
            raw = self._rows[item] = self._reader.raw(item)
        return self.caches[item[0]].decode(raw)

    def close(self) -> None:
        """Let go of the shard being read (its file or connection); the rows kept stay."""
        self._reader = None


class HeldOut:
    """`train --eval-cache`: held-out caches measured as the student trains (what `evaluate`
    reports, on the student in memory), each report a line of eval.jsonl. Its rows are read at
    the first evaluation and kept for the next ones when the shards they come from hold at most
    KEEP_BYTES; more are read again at each evaluation."""

    def __init__(self, paths: tuple[str, ...], max_samples: int | None, tokenizer) -> None:
        from teacher_cache import open_cache

        self.caches = [open_cache(c) for c in paths]
        check_distinct(self.caches, "--eval-cache")
        for cache in self.caches:
            if not len(cache):
                raise ValueError(f"--eval-cache {cache.where}: no samples in it")
        check_student_matches(tokenizer, self.caches)
        self.plan = Plan(self.caches, seed=0, window=1)
        self.items = eval_items(self.plan, len(self.caches), max_samples)
        read = {(c, s) for c, s, _ in self.items}
        stored = sum(self.caches[c].manifest["shards"][s]["bytes"] for c, s in read)
        self.rows = KeptRows(self.caches) if stored <= KEEP_BYTES else None

    def not_held_out(self, training: list) -> list[str]:
        """Warnings for eval caches whose samples may be trained on: the same cache as a training
        one, one with shards in a training one (a merge of it), or one made from the same data
        files (by sha256) with domain filters that do not keep them apart (a math expert's cache
        and a reference made without math do not overlap)."""
        said = []
        for e in self.caches:
            for t in training:
                shared = {s["sha256"] for s in e.manifest["shards"]} & {s["sha256"] for s in t.manifest["shards"]}
                if e.digest == t.digest:
                    said.append(f"--eval-cache {e.where} is also a --cache: it is not held out")
                elif shared:
                    said.append(
                        f"--eval-cache {e.where} shares {plural(len(shared), 'shard')} with --cache {t.where} "
                        "(the same files): those samples are trained on"
                    )
                elif may_share_samples(e.manifest["data"], t.manifest["data"]):
                    said.append(
                        f"--eval-cache {e.where} was made from the same data files as --cache {t.where}: "
                        "its samples may be trained on"
                    )
        return said

    @property
    def kind(self) -> str:
        return self.caches[0].kind

    def measure(self, model: torch.nn.Module, forward: Callable[[Batch], torch.Tensor], *, batch_size: int, device,
                autocast, rank: int, world: int, lockstep: bool) -> dict:  # fmt: skip
        """The report on `model` as it is now, its figures per position from `forward`
        (`position_stats`); `model` is in eval mode while measured, in train mode after."""
        model.eval()
        try:
            return measure(forward, self.caches, self.plan, self.items, batch_size=batch_size, device=device,
                           autocast=autocast, rank=rank, world=world, lockstep=lockstep, rows=self.rows)  # fmt: skip
        finally:
            model.train()
            if self.rows is not None:
                self.rows.close()
