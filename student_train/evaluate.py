"""`student-train eval`: a student against held-out cached teacher targets, split by domain."""

from __future__ import annotations

import os

import numpy as np
import torch

from student_train import losses
from student_train.checks import check_distinct, check_student_matches, check_student_model, check_temperature
from student_train.data import Plan, ShardCache, collate
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
    # the first N of each cache (a domain cache given last is still in the report), listed as they
    # are drawn: not every row of a large cache first
    taken = dict.fromkeys(range(len(caches)), 0)
    items = []  # (cache index, shard, row)
    for item in (it for s in plan.streams if s is not None for it in s.items()):
        if max_samples is None or taken[item[0]] < max_samples:
            taken[item[0]] += 1
            items.append(item)
    kind = caches[0].kind
    check_temperature(kind, temperature)

    sums = {"domain": _zero(), "general": _zero()}
    by_domain: dict[str, dict] = {}  # the domain group split by each sample's domain
    shards = ShardCache(caches, size=1)  # items run shard by shard
    # the bar is closed (its line ended) before an error or Ctrl-C says anything
    with progress_bar(len(items), "evaluating", "sample", enabled=progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = [(item[0], shards.get(item)) for item in items[start : start + batch_size]]
            bar.update(len(chunk))
            _add_batch(model, chunk, plan.domain_caches, kind, temperature, sums, by_domain)
    report = {}
    total = _zero()
    for group, g in sums.items():
        for k in total:
            total[k] += g[k]
        if g["positions"]:
            report[group] = _finish(g)
    report["all"] = _finish(total)
    if by_domain:
        report["by_domain"] = {name: _finish(g) for name, g in sorted(by_domain.items())}
    report["kl_kind"] = (
        "KL over the cached top-k + tail" if kind == "topk" else "sampled cross-entropy estimate (KL + teacher entropy)"
    )
    report["top1_kind"] = (  # a sampled cache's most-drawn id is the teacher's top-1 only most of the time
        "the teacher's top-1" if kind == "topk" else "the most-drawn id (ties: the lowest id)"
    )
    report["model"] = model_path
    report["caches"] = cache_paths
    return report


def _zero() -> dict:
    return {"kl": 0.0, "nll": 0.0, "agree": 0.0, "positions": 0, "samples": 0}


def _add_batch(
    model, chunk: list, domain_caches: list[int], kind: str, temperature: float, sums: dict, by_domain: dict
) -> None:
    """Add one batch's KL, NLL, top-1 agreement and counts to `sums` (domain / general) and to
    `by_domain` (each domain cache sample's own domain)."""
    b = collate(chunk, domain_caches, attention=False)
    hidden = model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    # hidden float32 [B, T, D] -> the target positions' rows [P, D] -> logits float32 [P, V]
    logits = model.get_output_embeddings()(hidden[b.row, b.pos]).float()
    nll = torch.nn.functional.cross_entropy(logits, b.labels, reduction="none")  # float32 [P]
    if kind == "topk":
        teacher_top1 = b.topk_ids[:, 0]  # int64 [P], ids come by descending log-prob
    else:
        # the id of each row's largest weight: argmax [P, 1] gathered from sampled_ids [P, m]
        teacher_top1 = b.sampled_ids.gather(1, b.sampled_weights.argmax(1, keepdim=True))[:, 0]  # int64 [P]
    agree = (logits.argmax(-1) == teacher_top1).float()  # float32 [P]
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
        if kind == "topk":
            kl = losses.topk_kl(
                logits[sel], b.topk_ids[sel], b.topk_logprobs[sel], b.tail_logprob[sel], temperature=temperature
            )
        else:
            kl = losses.sampled_kl(logits[sel], b.sampled_ids[sel], b.sampled_weights[sel], temperature=temperature)
        g["kl"] += float(kl) * n
        g["nll"] += float(nll[sel].sum())
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
