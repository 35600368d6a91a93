"""The trainer end to end: from the cache alone, resume after kill -9, DAE mixing, DDP on gloo."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from student_train.train import TrainConfig, TrainError, train
from teacher_cache import open_cache
from teacher_cache.models import resolve_model
from teacher_cache.run import RunConfig, run
from tests.procs import descendants

ST = [sys.executable, "-m", "student_train.cli"]


@pytest.fixture(scope="module")
def kd_teacher(tmp_path_factory, tiny_teacher) -> Path:
    """A private copy of tiny-mixtral, so a test may take it away without touching the shared one."""
    dst = tmp_path_factory.mktemp("teacher") / "tiny-mixtral"
    shutil.copytree(tiny_teacher.path, dst)
    return dst


@pytest.fixture(scope="module")
def kd_cache(tmp_path_factory, chats_file, kd_teacher) -> Path:
    out = tmp_path_factory.mktemp("kd") / "cache"
    run(
        RunConfig(
            teacher=str(kd_teacher),
            data=(str(chats_file),),
            out=str(out),
            backend="hf",
            top_k=16,
            attention_layers=(0, 1),
            attention_top_k=8,
            shard_size=4,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def k4_cache(tmp_path_factory, chats_file) -> Path:
    """Top-4 targets and no attention summaries: a cache kd_cache's runs may not mix with freely."""
    out = tmp_path_factory.mktemp("k4") / "cache"
    run(RunConfig(teacher="tiny-mixtral", data=(str(chats_file),), out=str(out), backend="hf", top_k=4, progress=False))
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_student_trains_from_the_cache_alone(tmp_path, kd_cache, kd_teacher, tiny_student, monkeypatch):
    """The teacher's files are out of reach while the student trains, and no preset is looked up
    or built (the model home is an empty folder); loss falls; the checkpoint loads."""
    from transformers import AutoModelForCausalLM

    from student_train.evaluate import evaluate

    student = tmp_path / "student"
    shutil.copytree(tiny_student.path, student)
    monkeypatch.setenv("TEACHER_CACHE_HOME", str(tmp_path / "home"))
    hidden = kd_teacher.with_name("out-of-reach")
    os.rename(kd_teacher, hidden)
    try:
        result = train(
            TrainConfig(
                student=str(student),
                caches=(str(kd_cache),),
                out=str(tmp_path / "run"),
                max_steps=24,
                batch_size=4,
                lr=2e-3,
                warmup_steps=2,
                attn_weight=0.5,
                save_every=12,
                progress=False,
            )
        )
        report = evaluate(result["checkpoint"], [str(kd_cache)])
        before = evaluate(str(student), [str(kd_cache)])
    finally:
        os.rename(hidden, kd_teacher)
    assert not (tmp_path / "home").exists(), "training looked up a preset"
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == list(range(1, 25))
    first, last = np.mean([r["kd"] for r in m[:4]]), np.mean([r["kd"] for r in m[-4:]])
    assert last < 0.7 * first, (first, last)
    assert all("attn" in r and r["attn"] > 0 for r in m)
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint"])
    assert model.config.model_type == "mistral"
    assert set(report["all"]) >= {"kl_to_teacher", "nll", "top1_agreement"}
    assert report["all"]["positions"] == open_cache(kd_cache).manifest["counts"]["target_positions"]
    assert report["all"]["kl_to_teacher"] < before["all"]["kl_to_teacher"]


def train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        *ST,
        "train",
        "--student",
        "tiny-mistral",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--max-steps",
        "8",
        "--batch-size",
        "3",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--save-every",
        "2",
        "--no-progress",
        *extra,
    ]


def endless_train_args(cache: Path, out: Path) -> list[str]:
    """train_args of a run that neither ends nor checkpoints before the test stops it."""
    args = train_args(cache, out)
    for option in ("--max-steps", "--save-every"):
        args[args.index(option) + 1] = "100000"
    return args


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.05)


def test_resume_after_kill_equals_uninterrupted(tmp_path, kd_cache, k4_cache):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    done = subprocess.run(train_args(kd_cache, clean), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(
        train_args(kd_cache, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoint-4" / "trainer_state.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint-8").exists(), "the kill must land mid-run"
    again = subprocess.run(train_args(kd_cache, killed), capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr
    for left in (".checkpoint-6.tmp", ".checkpoint-2.old"):  # what a kill mid-save or mid-prune leaves
        (killed / left).mkdir(exist_ok=True)
        (killed / left / "model.safetensors").write_bytes(b"partial")
    resumed = subprocess.run(train_args(kd_cache, killed, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.name.startswith(".checkpoint-") for p in killed.iterdir()), "partial checkpoints are swept"
    a, b = json.loads((clean / "rank0.json").read_text()), json.loads((killed / "rank0.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"]
    assert [r["step"] for r in metrics(killed)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(clean)]
    assert (clean / "samples.rank0.jsonl").read_text() == (killed / "samples.rank0.jsonl").read_text()
    for cache, other, named in (
        (kd_cache, ["--lr", "5e-4"], "(lr)"),
        (kd_cache, ["--max-steps", "12", "--seed", "1"], "(max_steps, seed)"),
        (k4_cache, [], "(the caches' contents)"),
    ):
        refused = subprocess.run(train_args(cache, killed, "--resume", *other), capture_output=True, text=True)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert named in refused.stderr, refused.stderr
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(clean)], "a refusal changes nothing"
    drawn = subprocess.run([*ST, "plot", str(killed)], capture_output=True, text=True)
    assert drawn.returncode == 0 and (killed / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resume_with_the_caches_in_another_order_names_the_order():
    """The same DAE caches given in another order draw another sample order: refused, but it was
    called "the caches' contents", which sent the user looking for a changed cache."""
    from dataclasses import asdict

    from student_train.checkpoints import check_resume as _check_resume

    cfg = TrainConfig(student="tiny-mistral", caches=("ref", "expert"), out="o", domain_ratio=0.25)
    saved = {"config": json.loads(json.dumps(asdict(cfg))), "caches_sha256": ["r", "e"], "student_path": "s"}
    _check_resume(Path("o/checkpoint-2"), saved, cfg, ["r", "e"], "s")  # the same: no refusal
    with pytest.raises(TrainError, match=r"other settings \(the caches' order\)"):
        _check_resume(Path("o/checkpoint-2"), saved, cfg, ["e", "r"], "s")
    with pytest.raises(TrainError, match=r"other settings \(the caches' contents\)"):
        _check_resume(Path("o/checkpoint-2"), saved, cfg, ["r", "x"], "s")
    # a checkpoint that recorded the whole manifests' digests (before content digests) resumes
    _check_resume(Path("o/checkpoint-2"), saved, cfg, ["r", "e"], "s", contents=["R2", "E2"])


def _trained_then_a_shard_lost(tmp_path: Path, chats_file: Path) -> tuple[RunConfig, dict, Path, bytes]:
    """A cache (tiny-mixtral, top-4) and a 2-step training on it cut back to checkpoint-1, then
    the cache's last shard lost: (the cache's RunConfig, the training's TrainConfig arguments, the
    lost shard's path, its bytes)."""
    made = RunConfig(teacher="tiny-mixtral", data=(str(chats_file),), out=str(tmp_path / "cache"), backend="hf",
                     top_k=4, shard_size=4, progress=False)  # fmt: skip
    run(made)
    common = dict(student="tiny-mistral", caches=(made.out,), out=str(tmp_path / "r"), max_steps=2, save_every=1,
                  batch_size=2, progress=False)  # fmt: skip
    train(TrainConfig(**common))
    shutil.rmtree(tmp_path / "r" / "checkpoint-2")
    lost = sorted((tmp_path / "cache").glob("shard-*.arrow"))[-1]
    before = lost.read_bytes()
    lost.unlink()
    return made, common, lost, before


def test_a_resume_takes_a_cache_whose_lost_shard_the_teacher_run_redid(tmp_path, chats_file):
    """A shard lost from a cache is redone by the same `teacher-cache run` (the same bytes), which
    rewrites manifest.json with the redo's timing: a resume refused the cache as "the caches'
    contents", though no sample changed. A cache with other samples is still refused."""
    made, common, lost, before = _trained_then_a_shard_lost(tmp_path, chats_file)
    run(made)  # redoes the lost shard
    assert lost.read_bytes() == before
    assert train(TrainConfig(**common, resume=True))["step"] == 2
    shutil.rmtree(tmp_path / "r" / "checkpoint-2")
    other = tmp_path / "other"
    run(dataclasses.replace(made, out=str(other), top_k=3))
    with pytest.raises(TrainError, match=r"other settings \(the caches' contents\)"):
        train(TrainConfig(**{**common, "caches": (str(other),)}, resume=True))


def test_a_resume_takes_a_cache_whose_lost_shard_was_redone_from_another_directory(tmp_path, chats_file, monkeypatch):
    """Paths, --batch-size and --no-progress are not settings of a cache: the redo of a lost shard
    run from another directory, by a relative --out, without progress bars, makes the same bytes,
    but rewrote the manifest's `config` (the arguments as typed), and a resume refused the cache as
    "the caches' contents" changed."""
    made, common, lost, before = _trained_then_a_shard_lost(tmp_path, chats_file)
    monkeypatch.chdir(tmp_path)
    run(dataclasses.replace(made, out="cache", batch_size=3))  # redoes the lost shard: the same bytes
    assert lost.read_bytes() == before
    assert train(TrainConfig(**common, resume=True))["step"] == 2


def test_resume_takes_the_same_student_by_another_path(tmp_path, kd_cache, monkeypatch):
    """--student is compared by the folder it resolves to: a run started with a relative path
    resumes with an absolute one (or from another directory); another folder is other settings."""
    shutil.copytree(resolve_model("tiny-mistral").path, tmp_path / "st")
    shutil.copytree(resolve_model("tiny-mistral").path, tmp_path / "other")
    common = dict(caches=(str(kd_cache),), out=str(tmp_path / "r"), max_steps=2, save_every=1, progress=False)
    monkeypatch.chdir(tmp_path)
    train(TrainConfig(student="st", **common))
    shutil.rmtree(tmp_path / "r" / "checkpoint-2")
    monkeypatch.chdir(kd_cache.parent)
    with pytest.raises(TrainError, match=r"other settings \(student\)"):
        train(TrainConfig(student=str(tmp_path / "other"), resume=True, **common))
    assert train(TrainConfig(student=str(tmp_path / "st") + "/", resume=True, **common))["step"] == 2


def test_kill_int_stops_a_training_started_with_sigint_ignored(tmp_path, kd_cache):
    """A non-interactive shell starts background jobs with SIGINT ignored; `kill -INT` still stops
    the training as a Ctrl-C does (it used to be ignored), keeping what it wrote."""
    from student_train.train import latest_checkpoint

    out = tmp_path / "bg"
    args = train_args(kd_cache, out)
    args[args.index("--max-steps") + 1] = "100000"
    args[args.index("--save-every") + 1] = "1"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and latest_checkpoint(out) is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a no-op once it has ended; else the run would train on after a failed test
        proc.wait()
    assert proc.returncode == -signal.SIGINT, err  # ended by the signal (see test_cli's shell loop)
    latest = latest_checkpoint(out)
    assert latest is not None
    assert err.strip().splitlines()[-1] == (
        f"interrupted: {latest.name} is the latest checkpoint; the same command with --resume continues from it"
    )


def test_a_training_stopped_before_its_first_checkpoint_says_so(tmp_path, kd_cache):
    """The stop line promised "checkpoints are kept" when none had been written yet."""
    out = tmp_path / "early"
    args = endless_train_args(kd_cache, out)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        "terminated: no checkpoint was written yet: the same command with --resume starts again at step 0"
    )


def test_a_sigterm_to_the_process_group_stops_a_training_with_workers_as_sigterm(tmp_path, kd_cache):
    """Slurm (scancel, the time limit) and torchrun send SIGTERM to every process of the job: the
    DataLoader workers died by it, and the trainer stopped with "DataLoader worker (pid N) is killed
    by signal: Terminated." and exit 1, not the terminated line and 143."""
    out = tmp_path / "group"
    args = [*endless_train_args(kd_cache, out), "--num-workers", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: len(metrics(out)) >= 2 if (out / "metrics.jsonl").is_file() else False)
        workers = descendants(proc.pid)
        assert len(workers) == 2
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        "terminated: no checkpoint was written yet: the same command with --resume starts again at step 0"
    )
    wait_for(lambda: not any(alive(w) for w in workers), timeout=30)
    assert not any(alive(w) for w in workers)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


FORKS_HOLDING_A_LOCK = """
import os, sys, time
from pathlib import Path
from student_train.data import die_with
from teacher_cache.storage import exclusive
with exclusive(Path(sys.argv[1])):
    trainer = os.getpid()
    for dies in (False, True):  # a child that lives on, and one set up as DataLoader workers are
        pid = os.fork()
        if pid == 0:
            if dies:
                die_with(trainer, 0)
            time.sleep(120)
            os._exit(0)
        print(pid, flush=True)
    time.sleep(120)
"""


def test_a_killed_process_s_lock_is_free_though_its_forked_children_live(tmp_path):
    """A flock belongs to the open file, which a fork shares: DataLoader workers that outlived a
    trainer killed by SIGKILL (blocked on a full pipe) held its run directory's lock for minutes, and
    --resume was refused. Children let go of held locks when forked, and workers die with the trainer."""
    from teacher_cache.storage import holder

    lock = tmp_path / ".lock"
    proc = subprocess.Popen([sys.executable, "-c", FORKS_HOLDING_A_LOCK, str(lock)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        lives_on, dies = (int(proc.stdout.readline()) for _ in range(2))
        assert holder(lock) == (str(proc.pid), "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert alive(lives_on) and holder(lock) is None
        wait_for(lambda: not alive(dies), timeout=10)
        assert not alive(dies), "the worker outlived its trainer"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_second_training_into_a_busy_out_is_refused_and_a_kill_frees_it(tmp_path, kd_cache):
    """Two trainings in one --out would interleave metrics.jsonl and checkpoints: the second is
    refused at once, naming the first's pid; the lock dies with its process, even by SIGKILL of
    the trainer alone: its DataLoader workers (forked with the lock's open file) let go of the
    lock when forked and die with it (they lived on, holding the run directory)."""
    out = tmp_path / "busy"
    args = [*endless_train_args(kd_cache, out), "--num-workers", "2"]  # still running at the second's start
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file())
        tasks = Path(f"/proc/{first.pid}/task").iterdir()
        workers = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        assert len(workers) >= 2, workers
        second = subprocess.run(train_args(kd_cache, out, "--resume"), capture_output=True, text=True)
        assert first.poll() is None, "the first run must still be training"
        assert second.returncode == 1, second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert (
            line
            == f"Error: {out} is in use by another training (pid {first.pid}); wait for it to end or use another --out"
        )
        os.kill(first.pid, signal.SIGKILL)  # the trainer, not its workers
        first.wait()
        wait_for(lambda: not any(alive(w) for w in workers), timeout=10)
        assert not any(alive(w) for w in workers), "the workers outlived the trainer"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    steps = len(metrics(out))
    resumed = subprocess.run(train_args(kd_cache, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr  # no checkpoint yet: it starts over, into the freed --out
    assert f"note: no checkpoint in {out} to resume: starting at step 0" in resumed.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 9)) and steps >= 1


DAE_COMMON = dict(backend="hf", top_k=8, shard_size=3, progress=False)


@pytest.fixture(scope="module")
def dae_caches(tmp_path_factory, chats_file) -> tuple[Path, Path]:
    """(reference, expert): a general cache without the 'math' samples (10) and a math expert's cache (2)."""
    where = tmp_path_factory.mktemp("dae")
    expert, reference = where / "expert", where / "reference"
    common = dict(data=(str(chats_file),), **DAE_COMMON)
    run(RunConfig(teacher="tiny-mixtral", out=str(expert), only_domain="math", source="math-expert", **common))
    run(RunConfig(teacher="tiny-mistral", out=str(reference), exclude_domain="math", source="reference", **common))
    return reference, expert


def test_dae_mix_trains_each_sample_against_its_own_source(tmp_path, chats_file, dae_caches, monkeypatch, capsys):
    from student_train.data import Plan, SampleStream, Stream

    reference, expert = dae_caches
    common = dict(data=(str(chats_file),), **DAE_COMMON)
    caches = [open_cache(reference), open_cache(expert)]
    own = {c.manifest["source"]: {s.sample_id: s for s in c} for c in caches}
    plan = Plan(caches, seed=3, window=2, domain_ratio=0.25)
    stream = iter(SampleStream(caches, plan, rank=0, world=1, start=0, window=2))
    drawn = [next(stream) for _ in range(40)]
    assert sum(c == 1 for c, _ in drawn) == 10  # exactly the ratio
    n_domain = len(plan.streams[0])
    built = []  # (stream seed, epoch) of each epoch order a plan builds
    real = Stream.epoch_order
    monkeypatch.setattr(Stream, "epoch_order", lambda self, e: built.append((self.seed, e)) or real(self, e))
    # at 0.9 the small domain stream goes through many epochs while the general one stays in its
    # first: its epoch order (a permutation of the whole cache) is kept, least recently used goes
    mostly_domain = Plan(caches, seed=3, window=2, domain_ratio=0.9)
    for i in range(5 * len(mostly_domain.streams[1])):
        mostly_domain.item(i)
    assert len(built) == len(set(built)) >= 10
    assert plan.short_stream(4 * n_domain) is None and plan.short_stream(4 * n_domain + 4) == n_domain
    for c, s in drawn:
        assert (s.domain == "math") == (c == 1) == (s.source == "math-expert")
        src = own[s.source][s.sample_id]
        np.testing.assert_array_equal(s.topk_ids, src.topk_ids)
        np.testing.assert_array_equal(s.topk_logprobs, src.topk_logprobs)
    # the expert's and the reference's targets differ: they are different models
    assert not np.array_equal(own["math-expert"]["math-1"].topk_ids[:4], own["reference"]["gen-1"].topk_ids[:4])
    result = train(
        TrainConfig(
            student="tiny-mistral",
            caches=(str(reference), str(expert)),
            out=str(tmp_path / "r"),
            max_steps=3,
            batch_size=4,
            domain_ratio=0.25,
            progress=False,
        )
    )
    m = metrics(tmp_path / "r")
    assert all("kd_domain" in r and "kd_general" in r for r in m)
    seen = [
        sid
        for line in (tmp_path / "r" / "samples.rank0.jsonl").read_text().splitlines()
        for sid in json.loads(line)["samples"]
    ]
    assert sum(sid.startswith("math") for sid in seen) == 3 and result["step"] == 3

    # one sample per micro-batch, 4 per step: each kind's loss is its mean over its own micro-batches
    accum = tmp_path / "accum"
    train(TrainConfig(student="tiny-mistral", caches=(str(reference), str(expert)), out=str(accum), max_steps=4,
                      batch_size=1, grad_accum=4, domain_ratio=0.25, progress=False))  # fmt: skip
    steps = [json.loads(line)["samples"] for line in (accum / "samples.rank0.jsonl").read_text().splitlines()]
    for m, ids in zip(metrics(accum), steps, strict=True):
        d = sum(sid.startswith("math") for sid in ids)
        assert 0 < d < 4
        assert m["kd"] == pytest.approx((d * m["kd_domain"] + (4 - d) * m["kd_general"]) / 4, rel=1e-5)

    # a general cache of the same data that keeps the domain's samples: said by train and check
    from student_train.checks import domain_overlap

    assert domain_overlap(caches) is None  # the reference excludes "math"
    plain = tmp_path / "plain"
    run(RunConfig(teacher="tiny-mistral", out=str(plain), source="reference", **common))
    warning = domain_overlap([open_cache(plain), open_cache(expert)])
    assert warning == (
        f"{plain} was made from the same data as the domain cache {expert} without --exclude-domain math: "
        "its 'math' samples are trained against both teachers (remake it with --exclude-domain math)"
    )
    done = subprocess.run([*ST, "check", "--student", "tiny-mistral", "--cache", str(plain), "--cache", str(expert)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and f"warning: {warning}" in done.stderr
    # without --domain-ratio the two caches are one stream: those samples meet both teachers all the same
    train(TrainConfig(student="tiny-mistral", caches=(str(plain), str(expert)), out=str(tmp_path / "plain_run"),
                      max_steps=1, warmup_steps=0, progress=False))  # fmt: skip
    assert f"warning: {warning}\n" in capsys.readouterr().err

    # an empty domain cache (every record refused, skipped by --skip-bad; a filter no record matches
    # is refused by run): the error names it, not the general cache too
    empty = tmp_path / "empty"
    run(RunConfig(teacher="tiny-mixtral", out=str(empty), only_domain="math", source="math-expert", max_length=4,
                  skip_bad=True, **{k: v for k, v in common.items() if k != "max_length"}))  # fmt: skip
    with pytest.raises(ValueError, match=r"no samples in [^,]*empty: it is empty$"):
        Plan([open_cache(reference), open_cache(empty)], seed=3, window=2, domain_ratio=0.25)


def test_two_process_ddp_on_gloo_sees_disjoint_samples_and_ends_identical(tmp_path, kd_cache):
    out = tmp_path / "ddp"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "student_train.cli",
        "train",
        "--student",
        "tiny-mistral",
        "--cache",
        str(kd_cache),
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--save-every",
        "3",
        "--no-progress",
    ]
    env = {**os.environ, **CPU_RANKS}
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 3") == 1  # rank 0's line only
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    per_rank = [
        [
            sid
            for line in (out / f"samples.rank{r}.jsonl").read_text().splitlines()
            for sid in json.loads(line)["samples"]
        ]
        for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    assert not set(per_rank[0]) & set(per_rank[1])  # 12 samples, 12 draws: one epoch split in two
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    # every process prints its own error (unless torchrun stops it first): each says which rank it is
    args[args.index(str(kd_cache))] = str(tmp_path / "missing")
    failed = subprocess.run(args, capture_output=True, text=True, env=env)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("Error: ")]
    assert failed.returncode != 0 and errors
    assert {re.sub(r"rank \d: ", "rank N: ", line) for line in errors} == {
        f"Error: rank N: {tmp_path / 'missing'}: does not exist"
    }


# two ranks on the CPU (gloo), also where a GPU is visible (one GPU cannot hold two ranks)
CPU_RANKS = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _torchrun(out: Path, cache: Path | tuple[Path, ...], *extra: str) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caches = [a for c in (cache if isinstance(cache, tuple) else (cache,)) for a in ("--cache", str(c))]
    args = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)),
        *("-m", "student_train.cli", "train", "--student", "tiny-mistral", *caches, "--out", str(out)),
        *("--max-steps", "3", "--batch-size", "2", "--save-every", "1", "--lr", "1e-3", "--warmup-steps", "0"),
        *("--no-progress", *extra),
    ]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **CPU_RANKS})
    assert done.returncode == 0, done.stderr[-3000:]


def test_more_local_ranks_than_gpus_is_one_line_per_rank(tmp_path, kd_cache):
    """CUDA says "invalid device ordinal"; the run says what to start instead."""
    visible = torch.cuda.device_count()
    if not visible:
        pytest.skip("needs a GPU: without one, every rank trains on the CPU")
    args = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(visible + 1)),
        *("-m", "student_train.cli", "train", "--student", "tiny-mistral", "--cache", str(kd_cache)),
        *("--out", str(tmp_path / "r"), "--max-steps", "1", "--no-progress"),
    ]
    done = subprocess.run(args, capture_output=True, text=True)
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert done.returncode != 0
    assert errors == [
        f"Error: rank {visible}: this process is local rank {visible} and {visible} GPU"
        f"{'s are' if visible > 1 else ' is'} visible: start at most {visible} per node "
        f"(torchrun --nproc-per-node {visible}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU"
    ]


def test_two_ranks_both_mix_domain_and_general_and_an_older_checkpoint_keeps_its_order(tmp_path, dae_caches):
    out = tmp_path / "dae"
    _torchrun(out, dae_caches, "--domain-ratio", "0.5")  # 3 steps of 2 samples per rank

    def math_per_step(rank: int) -> list[int]:
        lines = (out / f"samples.rank{rank}.jsonl").read_text().splitlines()
        return [sum(sid.startswith("math") for sid in json.loads(line)["samples"]) for line in lines]

    assert [sum(math_per_step(r)) for r in (0, 1)] == [3, 3]  # each rank: 6 samples, half of them domain
    # a checkpoint saved before the mix went round by round (no "domain_mix" in its state) resumes
    # in the order it was trained in: index by index, which gave rank 1 every domain sample
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("domain_mix") == "per_round"
    state_file.write_text(json.dumps(state))
    for step in (2, 3):
        shutil.rmtree(out / f"checkpoint-{step}")
    _torchrun(out, dae_caches, "--domain-ratio", "0.5", "--resume")
    assert [math_per_step(r)[1:] for r in (0, 1)] == [[0, 0], [2, 2]]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["domain_mix"] == "per_index"


def test_fsdp_trains_like_ddp_saves_a_plain_checkpoint_and_resumes_exactly(tmp_path, kd_cache):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    # measured at every step: 5 samples over 2 ranks in batches of 2 are 2 forwards on rank 0 and
    # 1 on rank 1, which under FSDP must run a spare one (every forward gathers from both ranks)
    held_out = ("--eval-cache", str(kd_cache), "--eval-samples", "5")
    _torchrun(fsdp, kd_cache, "--fsdp", *held_out)
    _torchrun(ddp, kd_cache, *held_out)
    weights = {name: load_file(d / "checkpoint-3" / "model.safetensors") for name, d in (("fsdp", fsdp), ("ddp", ddp))}
    first = load_file(ddp / "checkpoint-1" / "model.safetensors")
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    # the same training up to float reduction order: the two runs differ by 1e-5 (measured) of
    # what the last two steps moved the weights, and their losses agree step by step
    norm = lambda ts: float(torch.cat([t.flatten() for t in ts]).norm())  # noqa: E731
    diff = norm([weights["fsdp"][k] - weights["ddp"][k] for k in first])
    moved = norm([weights["ddp"][k] - first[k] for k in first])
    assert diff < 1e-3 * moved, (diff, moved)
    fsdp_loss, ddp_loss = ([r["loss"] for r in metrics(d)] for d in (fsdp, ddp))
    np.testing.assert_allclose(fsdp_loss, ddp_loss, rtol=1e-5)
    ranks = [json.loads((fsdp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # metrics.jsonl is every rank's: step 1's loss is the mean of both ranks' micro-batch losses
    # under the initial weights (each rank's batch is in its samples.rankN.jsonl)
    from student_train.data import collate
    from student_train.train import DistillStep

    by_id = {s.sample_id: s for s in open_cache(kd_cache)}
    start = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-mistral").path, dtype=torch.float32)
    step = DistillStep(start.train(), TrainConfig(student="tiny-mistral", caches=("c",), out="-"), "topk", [])
    batches = [json.loads((ddp / f"samples.rank{r}.jsonl").read_text().splitlines()[0])["samples"] for r in (0, 1)]
    with torch.no_grad():
        per_rank = [float(step(collate([(0, by_id[i]) for i in ids], [], attention=False))["loss"]) for ids in batches]
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-3)
    assert ddp_loss[0] == pytest.approx(sum(per_rank) / 2, rel=1e-5)
    AutoModelForCausalLM.from_pretrained(fsdp / "checkpoint-3")  # a plain transformers checkpoint
    # the held-out report of both ranks' shares is what `student-train eval` gives the checkpoint
    from student_train.evaluate import evaluate

    for d in (fsdp, ddp):
        lines = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2, 3] and lines[-1]["all"]["samples"] == 5
        _same_report(lines[-1], evaluate(str(d / "checkpoint-3"), [str(kd_cache)], max_samples=5, batch_size=2))
    # resume from checkpoint-2 (sharded optimizer state gathered by name): step 3 again, exactly
    shutil.rmtree(fsdp / "checkpoint-3")
    _torchrun(fsdp, kd_cache, "--fsdp", "--resume", *held_out)
    again = load_file(fsdp / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(again[k], weights["fsdp"][k]) for k in again)
    assert [json.loads(line)["step"] for line in (fsdp / "eval.jsonl").read_text().splitlines()] == [1, 2, 3]
    # a checkpoint written without --fsdp is not resumed with it (different optimizer layout)
    args = ["--resume", "--fsdp"]
    with pytest.raises(AssertionError, match=r"other settings \(fsdp\); resume with the same ones"):
        _torchrun(ddp, kd_cache, *args)


def test_a_domain_ratio_of_0_or_1_says_which_caches_go_unused(tmp_path, dae_caches, capsys):
    reference, expert = dae_caches
    for ratio, unused in ((0.0, expert), (1.0, reference)):
        out = tmp_path / f"r{ratio:g}"
        train(TrainConfig(student="tiny-mistral", caches=(str(reference), str(expert)), out=str(out), max_steps=1,
                          batch_size=2, domain_ratio=ratio, progress=False))  # fmt: skip
        kind = "general" if ratio == 0 else "domain"
        want = f"warning: --domain-ratio {ratio:g} draws from the {kind} caches only: {unused} unused"
        assert want in capsys.readouterr().err.splitlines()


def test_a_stream_left_unfinished_exits_without_tracebacks(kd_cache):
    """Every loop over the (infinite) stream stops mid-way: at interpreter exit each open shard's
    generator was closed after this module's names were cleared, and its `except StorageError`
    printed "Exception ignored ... TypeError" once per shard."""
    script = (
        "import sys, torch\n"
        "from teacher_cache import open_cache\n"
        "from student_train.data import Plan, SampleStream\n"
        "c = open_cache(sys.argv[1])\n"
        "stream = SampleStream([c], Plan([c], seed=0), rank=0, world=1, start=0, window=4)\n"
        "it = iter(torch.utils.data.DataLoader(stream, batch_size=None))\n"
        "print(len([next(it) for _ in range(4)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(kd_cache)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "4\n" and "Exception ignored" not in done.stderr, done.stderr


def test_the_python_api_takes_one_cache_where_a_list_is_usual_or_says_what_it_needs(kd_cache):
    """evaluate(model, "caches/held") looked for a cache at "/"; Plan(cache) decoded samples
    as if they were caches ("'CachedSample' object has no attribute 'manifest'")."""
    from student_train.data import Plan
    from student_train.evaluate import evaluate

    assert evaluate("tiny-mistral", kd_cache)["all"]["samples"] == 12  # a Path, not in a list
    cache = open_cache(kd_cache)
    with pytest.raises(TypeError, match="caches must be a list of Cache, got Cache"):
        Plan(cache, seed=0)
    with pytest.raises(ValueError, match="window and world must be >= 1, got 0 and 1"):
        Plan([cache], seed=0, window=0)
    from student_train.data import SampleStream, collate

    with pytest.raises(ValueError, match="rank must be in \\[0, world\\) and start >= 0, got rank 2, world 2"):
        SampleStream([cache], Plan([cache], seed=0), rank=2, world=2, start=0, window=4)  # took rank 0's samples
    with pytest.raises(ValueError, match="worker must be in \\[0, workers\\), got worker 2, workers 2"):
        SampleStream([cache], Plan([cache], seed=0), rank=0, world=1, start=0, window=4, worker=2, workers=2)
    with pytest.raises(ValueError, match="collate needs at least one sample"):
        collate([], [], attention=False)
    config = TrainConfig(student="tiny-mistral", caches=kd_cache, out=Path("r"), lr=1)
    assert config.caches == (str(kd_cache),) and config.out == "r" and config.lr == 1.0


def test_collate_refuses_a_batch_of_top_k_and_sampled_samples(kd_cache, sampled_cache):
    """It failed on the sampled ones' missing top-k arrays ("'NoneType' object has no attribute
    'shape'"); train refuses such caches long before, so this guards the Python API."""
    from student_train.data import collate

    topk, sampled = next(iter(open_cache(kd_cache))), next(iter(open_cache(sampled_cache)))
    with pytest.raises(ValueError, match="top-k and sampled targets cannot share a batch"):
        collate([(0, topk), (1, sampled)], [], attention=False)
    assert collate([(0, topk), (0, topk)], [], attention=False).topk_ids is not None


def test_plan_mixes_domain_and_general_on_every_rank(dae_caches):
    """Round by round: at a ratio of 1/world, routing index by index gave one rank every domain sample."""
    from student_train.data import Plan

    caches = [open_cache(c) for c in dae_caches]
    for world in (1, 2, 3, 4):
        for ratio in (0.25, 1 / 3, 0.5, 0.9):
            plan = Plan(caches, seed=1, window=2, domain_ratio=ratio, world=world)
            routes = [plan._route(i) for i in range(40 * world)]
            for rank in range(world):
                kinds = [s for s, _ in routes[rank::world]]
                assert kinds.count(0) == math.floor(40 * ratio), (world, ratio, rank)
            for s in (0, 1):  # each stream's indices used once each, in order, by the ranks together
                assert [j for t, j in routes if t == s] == list(range(sum(t == s for t, _ in routes)))


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, chats_file) -> Path:
    out = tmp_path_factory.mktemp("sampled") / "cache"
    run(
        RunConfig(
            teacher="tiny-mixtral",
            data=(str(chats_file),),
            out=str(out),
            backend="hf",
            targets="sampled",
            num_draws=32,
            progress=False,
        )
    )
    return out


def test_sampled_targets_train(tmp_path, sampled_cache):
    train(
        TrainConfig(
            student="tiny-mistral",
            caches=(str(sampled_cache),),
            out=str(tmp_path / "r"),
            max_steps=12,
            batch_size=4,
            lr=2e-3,
            warmup_steps=1,
            progress=False,
        )
    )
    m = metrics(tmp_path / "r")
    assert np.mean([r["kd"] for r in m[-3:]]) < np.mean([r["kd"] for r in m[:3]])


def test_a_sampled_cache_refuses_another_temperature(tmp_path, sampled_cache):
    """Draws from the teacher at temperature 1 estimate p: with --temperature T the sampled loss
    would pull the student towards p^T, so train and eval refuse it before any work; CE alone
    (--lam 0) has no teacher target to temper."""
    from student_train.checks import IncompatibleCacheError
    from student_train.evaluate import evaluate

    common = dict(student="tiny-mistral", caches=(str(sampled_cache),), max_steps=1, progress=False)
    with pytest.raises(IncompatibleCacheError, match="--temperature 2 with a sampled cache"):
        train(TrainConfig(out=str(tmp_path / "t2"), temperature=2.0, **common))
    assert not (tmp_path / "t2").exists()
    with pytest.raises(IncompatibleCacheError, match="--temperature 0.5 with a sampled cache"):
        evaluate("tiny-mistral", [str(sampled_cache)], temperature=0.5)
    assert train(TrainConfig(out=str(tmp_path / "ce"), temperature=2.0, lam=0.0, **common))["step"] == 1
    report = evaluate("tiny-mistral", [str(sampled_cache)], max_samples=2)  # at temperature 1: what it reports
    assert report["kl_kind"] == "sampled cross-entropy estimate (KL + teacher entropy)"
    assert report["top1_kind"] == "the most-drawn id (ties: the lowest id)"


def test_a_micro_batch_without_target_positions_has_a_zero_loss(kd_cache, tiny_student):
    """Rows with no target positions (a foreign writer may store them) give a finite, zero loss
    and no division by zero."""
    import dataclasses

    from student_train.data import collate
    from student_train.train import DistillStep
    from teacher_cache.models import load_causal_lm

    def empty(s):
        k = s.topk_ids.shape[1]
        return dataclasses.replace(
            s,
            target_positions=np.zeros(0, np.int64),
            topk_ids=np.zeros((0, k), np.int64),
            topk_logprobs=np.zeros((0, k), np.float32),
            tail_logprob=np.zeros(0, np.float32),
            attention_ids=None,
            attention_logprobs=None,
            attention_tail_logprob=None,
            attention_layers=(),
        )

    samples = [empty(s) for s in list(open_cache(kd_cache))[:2]]
    batch = collate([(0, s) for s in samples], [], attention=False)
    cfg = TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out="-", lam=0.5)
    model = load_causal_lm(tiny_student.path, progress=False, dtype=torch.float32)
    out = DistillStep(model, cfg, "topk", [])(batch)
    assert float(out["kd"].detach()) == 0.0 and math.isfinite(float(out["loss"].detach()))


def test_the_training_bar_says_when_it_saves_and_no_bar_nests_under_it(tmp_path, kd_cache, capsys):
    """transformers drew its "Writing model shards" bar under the training bar at every checkpoint."""
    train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "r"), max_steps=2,
                      save_every=1, progress=True))  # fmt: skip
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "saving=checkpoint-1" in err and "saving=checkpoint-2" in err
    from teacher_cache.storage import current_umask

    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r" / "checkpoint-2").iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~current_umask())  # safetensors wrote the weights 0600
    assert "2/2" in err.rsplit("saving=checkpoint-2", 1)[0].rsplit("training:", 1)[1]
    # into a log (not a terminal) each redraw is a line: the start, each checkpoint, the end; the
    # steps themselves at most every 30 s (it drew two lines per step: 300 for 150 steps)
    train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "long"), max_steps=12,
                      save_every=6, progress=True))  # fmt: skip
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "training:" in line]
    assert len(lines) <= 5, lines


def test_resume_refuses_another_process_count_and_a_lora_run(tmp_path, kd_cache, capsys):
    """The data position is saved per process: a resume with another number of processes would
    skip or repeat samples. A LoRA checkpoint holds merged weights: a resume could not go on
    with its adapters. Both are refused, naming the way on."""
    common = dict(student="tiny-mistral", caches=(str(kd_cache),), save_every=1, progress=False)
    out, lora = tmp_path / "r", tmp_path / "lora"
    train(TrainConfig(out=str(out), max_steps=2, **common))
    assert "Writing model shards" not in capsys.readouterr().err  # no progress bar when asked for none
    shutil.rmtree(out / "checkpoint-2")  # as if killed before it: the resume starts from checkpoint-1
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["world_size"] == 1
    (out / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(TrainError, match="was trained by 2 processes, this run has 1: .*resume with 2"):
        train(TrainConfig(out=str(out), max_steps=2, resume=True, **common))
    train(TrainConfig(out=str(lora), max_steps=2, lora_rank=2, **common))
    shutil.rmtree(lora / "checkpoint-2")
    with pytest.raises(TrainError, match="holds LoRA adapters merged into the weights"):
        train(TrainConfig(out=str(lora), max_steps=2, lora_rank=2, resume=True, **common))


def test_keep_last_removes_the_oldest_checkpoints_after_each_save(tmp_path, kd_cache):
    """--keep-last N keeps the newest N complete checkpoints; it may change on --resume (what is
    removed is not what the resume reads), and the leftover of a removal killed midway goes too."""
    out = tmp_path / "r"
    common = dict(student="tiny-mistral", caches=(str(kd_cache),), out=str(out), save_every=1, progress=False)
    train(TrainConfig(max_steps=4, keep_last=2, **common))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    shutil.rmtree(out / "checkpoint-4")  # as if killed before it
    (out / ".checkpoint-2.old").mkdir()  # as if killed while removing it
    (out / "checkpoint-0").mkdir()  # not a complete checkpoint (no trainer_state.json): not ours to judge
    train(TrainConfig(max_steps=4, keep_last=1, resume=True, **common))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-0", "checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    with pytest.raises(TrainError, match="--keep-last must be >= 0"):
        TrainConfig(max_steps=4, keep_last=-1, **common)


def test_resume_is_exact_for_a_student_with_dropout(tmp_path, kd_cache, tiny_student, capsys):
    """Creating the data iterator draws from the global RNG: the RNG is put back after it, so a
    resumed run draws the same dropout masks as an uninterrupted one."""
    student = tmp_path / "student"
    shutil.copytree(tiny_student.path, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    common = dict(student=str(student), caches=(str(kd_cache),), save_every=2, progress=False)
    clean = train(TrainConfig(out=str(tmp_path / "clean"), max_steps=4, **common))
    train(TrainConfig(out=str(tmp_path / "cut"), max_steps=4, **common))
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")  # as if killed after step 2's checkpoint
    capsys.readouterr()
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), max_steps=4, resume=True, **common))
    assert f"resuming from {tmp_path / 'cut' / 'checkpoint-2'} (step 2 of 4)\n" in capsys.readouterr().err
    assert resumed["weights_sha256"] == clean["weights_sha256"]
    assert [m["loss"] for m in metrics(tmp_path / "cut")] == [m["loss"] for m in metrics(tmp_path / "clean")]


def test_a_non_finite_gradient_stops_before_the_step(tmp_path, kd_cache, monkeypatch):
    """A finite loss can still give an infinite gradient (a student attention weight underflowing
    next to teacher mass): the run stops before the optimizer step, keeping the checkpoints."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(math.inf))
    with pytest.raises(TrainError, match="step 1: the gradient is not finite"):
        train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "r"), max_steps=2,
                          save_every=1, progress=False))  # fmt: skip
    assert not list((tmp_path / "r").glob("checkpoint-*"))


def test_weight_decay_spares_norms_biases_and_embeddings(tiny_student):
    from student_train.train import _param_groups
    from teacher_cache.models import load_causal_lm

    model = load_causal_lm(tiny_student.path, progress=False)
    params = list(model.parameters())
    assert _param_groups(model, params, 0.0) == [{"params": params, "weight_decay": 0.0}]
    decay, rest = _param_groups(model, params, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(params)
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert any("norm" in names[id(p)] for p in rest["params"]) and any("embed" in names[id(p)] for p in rest["params"])


def test_a_data_loader_workers_error_is_its_own_line(tmp_path, kd_cache):
    """With --num-workers the loader wraps a worker's error in its traceback; the user sees the
    error's own line, as without workers."""
    damaged = tmp_path / "cache"
    shutil.copytree(kd_cache, damaged)
    shard = sorted(damaged.glob("shard-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = subprocess.run(train_args(damaged, tmp_path / "r", "--num-workers", "1"), capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert shard.name in lines[0] and "Traceback" not in lines[0] and "DataLoader worker" not in lines[0]


def test_lora_checkpoint_is_a_plain_transformers_model(tmp_path, kd_cache):
    from transformers import AutoModelForCausalLM

    result = train(
        TrainConfig(
            student="tiny-mistral",
            caches=(str(kd_cache),),
            out=str(tmp_path / "r"),
            max_steps=2,
            batch_size=2,
            lora_rank=4,
            progress=False,
        )
    )
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint"])
    assert not any("lora" in n for n, _ in model.named_parameters())
    # the saved weights are the adapters merged into the student's weights, which they moved
    from student_train.checkpoints import merged_lora_state as _merged_lora_state
    from student_train.train import _lora
    from teacher_cache.models import resolve_model

    start = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-mistral").path)
    peft_model = _lora(AutoModelForCausalLM.from_pretrained(resolve_model("tiny-mistral").path), 4)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: B is no longer zero
    _, merged = _merged_lora_state(peft_model)
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], start.state_dict()[q])
    saved, initial = model.state_dict(), start.state_dict()
    assert not torch.equal(saved[q], initial[q]), "two LoRA steps must have moved q_proj"
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])


def test_refusals(tmp_path, kd_cache, k4_cache, sampled_cache):
    with pytest.raises(TrainError, match="no attention summaries"):
        train(
            TrainConfig(
                student="tiny-mistral",
                caches=(str(k4_cache),),
                out=str(tmp_path / "a"),
                attn_weight=1.0,
                max_steps=1,
                progress=False,
            )
        )
    with pytest.raises(TrainError, match="student layers"):
        train(
            TrainConfig(
                student="tiny-mistral",
                caches=(str(kd_cache),),
                out=str(tmp_path / "b"),
                attn_weight=1.0,
                attention_layer_map=((1, 5),),
                max_steps=1,
                progress=False,
            )
        )
    windowed = tmp_path / "windowed"  # tiny-mistral attending within 64 keys; the cache allows 2048
    shutil.copytree(resolve_model("tiny-mistral").path, windowed)
    config = json.loads((windowed / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    with pytest.raises(TrainError, match="sliding window of 64: the attention loss needs caches made with"):
        train(TrainConfig(student=str(windowed), caches=(str(kd_cache),), out=str(tmp_path / "f"), attn_weight=1.0))
    short = tmp_path / "short"  # tiny-mistral trained on 1024 positions; the cache allows 2048
    shutil.copytree(resolve_model("tiny-mistral").path, short)
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    from student_train.checks import IncompatibleCacheError

    past = "up to 2048 tokens, past the 1024 positions the student was trained on"
    with pytest.raises(IncompatibleCacheError, match=past):
        train(TrainConfig(student=str(short), caches=(str(kd_cache),), out=str(tmp_path / "p")))
    assert not (tmp_path / "p").exists()
    checked = subprocess.run([*ST, "check", "--student", str(short), "--cache", str(kd_cache)],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 1 and past in checked.stderr and not checked.stdout  # check said "ok"

    # check gives train's attention refusals before any weight is read (attention loss on only)
    def check(student: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*ST, "check", "--student", student, "--cache", str(kd_cache), *args],
                              capture_output=True, text=True)  # fmt: skip

    for student, args, said in (
        ("tiny-mistral", ["--attn-weight", "1", "--attention-layer-map", "1:5"], "student layers [5] out of range"),
        ("tiny-mistral", ["--attn-weight", "1", "--attention-layer-map", "3:0"], "teacher layers [3] not in the cache"),
        ("tiny-mistral", ["--attention-layer-map", "1:0"], "needs --attn-weight > 0"),
        (str(windowed), ["--attn-weight", "1"], "sliding window of 64: the attention loss needs caches made with"),
        ("tiny-mistral", ["--attn-weight", "1", "--cache", str(k4_cache)], "the attention loss needs the same layers"),
    ):
        checked = check(student, *args)
        usage = said == "needs --attn-weight > 0"  # a usage error, as train's (status 2)
        assert checked.returncode == (2 if usage else 1) and said in checked.stderr, (args, checked.stderr)
        assert not checked.stdout
    assert check(str(windowed)).returncode == 0  # the attention loss off: the window does not matter
    twice = check("tiny-mistral", "--cache", str(kd_cache))  # as train and eval refuse it
    assert twice.returncode == 1 and "the same cache is given twice" in twice.stderr and not twice.stdout
    checked = check("tiny-mistral", "--attn-weight", "1", "--attention-layer-map", "1:0")
    assert checked.returncode == 0 and checked.stdout.startswith("ok: "), checked.stderr

    mixed = (str(kd_cache), str(k4_cache))  # attention of layers (0, 1) and none at all
    with pytest.raises(IncompatibleCacheError, match=r"teacher layers \[\].*the attention loss needs the same layers"):
        train(TrainConfig(student="tiny-mistral", caches=mixed, out=str(tmp_path / "d"), attn_weight=1.0))
    with pytest.raises(IncompatibleCacheError, match="sampled targets mixed with topk"):
        train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache), str(sampled_cache)), out=str(tmp_path / "e")))
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    failed = tmp_path / "g"  # what a run that failed before its first step leaves: no run to resume
    failed.mkdir()
    (failed / "metrics.jsonl").write_text("")
    assert train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(failed), max_steps=1,
                             progress=False))["step"] == 1  # fmt: skip
    with pytest.raises(ValueError, match="--domain-ratio needs a domain cache"):
        train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "c"), domain_ratio=0.5))
    assert not (tmp_path / "c").exists(), "a refused run leaves no --out behind"


def test_a_step_larger_than_the_cache_warns(tmp_path, kd_cache, capsys):
    """12 samples, 2 micro-batches of 7: the step repeats samples, legal but said once on stderr."""
    common = dict(student="tiny-mistral", caches=(str(kd_cache),), max_steps=1, warmup_steps=0, progress=False)
    train(TrainConfig(out=str(tmp_path / "big"), batch_size=7, grad_accum=2, **common))
    assert "warning: a step takes 14 samples (batch size x ranks x grad accum) but the caches hold only 12" in (
        capsys.readouterr().err
    )
    train(TrainConfig(out=str(tmp_path / "fits"), batch_size=6, grad_accum=2, **common))
    assert "warning" not in capsys.readouterr().err


def test_a_warmup_as_long_as_the_run_warns(tmp_path, kd_cache, capsys):
    """--max-steps 2 with the default --warmup-steps 10 trained at a fifth of --lr at most, unsaid."""
    train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "r"), max_steps=2,
                      lr=1e-4, progress=False))  # fmt: skip
    assert (
        "warning: --warmup-steps 10 >= --max-steps 2: the learning rate rises through the whole run (to 2e-05 at "
        "the last step, of --lr 0.0001) and never decays\n"
    ) in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="not a training run's"):  # refused: only the reason is said
        train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "mine"), max_steps=2))
    assert "warning" not in capsys.readouterr().err


def test_a_student_with_fewer_output_rows_than_the_vocabulary_is_refused_before_work(kd_cache, tiny_student, tmp_path):
    """resize_token_embeddings(31000) keeps the tokenizer (same fingerprint): check said "ok", then train
    and eval died mid-run on torch's "index 31379 is out of bounds for dimension 1 with size 31000"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_train.checks import IncompatibleCacheError
    from student_train.evaluate import evaluate

    small = tmp_path / "small"
    model = AutoModelForCausalLM.from_pretrained(tiny_student.path)
    model.resize_token_embeddings(31000)
    model.save_pretrained(small)
    AutoTokenizer.from_pretrained(tiny_student.path).save_pretrained(small)
    rows = "token ids up to 31999, but the student's output layer has 31000 rows (vocab_size): the ids past it"
    checked = subprocess.run([*ST, "check", "--student", str(small), "--cache", str(kd_cache)],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 1 and checked.stderr == f"Error: {kd_cache}: {rows} have no logit\n", checked.stderr
    with pytest.raises(IncompatibleCacheError, match=re.escape(rows)):
        train(TrainConfig(student=str(small), caches=(str(kd_cache),), out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()
    with pytest.raises(IncompatibleCacheError, match=re.escape(rows)):
        evaluate(str(small), [str(kd_cache)])


def test_a_student_with_another_chat_template_is_warned_not_refused(kd_cache, tiny_student, tmp_path):
    """Same vocabulary, other chat template: the ids mean the same, so training is sound, but the
    student learns the cache's format; check (and train) said nothing about it."""
    same = subprocess.run([*ST, "check", "--student", str(tiny_student.path), "--cache", str(kd_cache)],
                          capture_output=True, text=True)  # fmt: skip
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr
    student = tmp_path / "student"
    shutil.copytree(tiny_student.path, student)
    template = student / "chat_template.jinja"
    template.write_text(template.read_text().replace("[INST]", "<|user|>"))
    other = subprocess.run([*ST, "check", "--student", str(student), "--cache", str(kd_cache)],
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode == 0 and other.stdout.startswith("ok: "), other.stderr
    assert other.stderr == (
        f"warning: the student's chat template is not the one {kd_cache} formatted its samples with: the student "
        "learns that format (prompt it so, e.g. with the teacher's tokenizer's template), not its own\n"
    )


@pytest.mark.slow
def test_student_with_another_tokenizer_is_refused(kd_cache, tmp_path):
    resolve_model("smollm2-135m-half")  # built first: a first build says so on stderr, this test is about the refusal
    done = subprocess.run(
        [
            *ST,
            "train",
            "--student",
            "smollm2-135m-half",
            "--cache",
            str(kd_cache),
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "token ids would mean different things" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r").exists(), "the refusal comes before --out is created"


def test_gradient_checkpointing_gives_the_same_first_step(tmp_path, kd_cache):
    common = dict(
        student="tiny-mistral",
        caches=(str(kd_cache),),
        max_steps=1,
        batch_size=3,
        attn_weight=0.5,
        lam=0.7,
        progress=False,
    )
    train(TrainConfig(out=str(tmp_path / "plain"), **common))
    train(TrainConfig(out=str(tmp_path / "ckpt"), gradient_checkpointing=True, **common))
    a, b = metrics(tmp_path / "plain")[0], metrics(tmp_path / "ckpt")[0]
    for key in ("loss", "ce", "kd", "attn", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_bf16_autocast_trains_close_to_fp32(tmp_path, kd_cache):
    """--precision bf16 on CPU runs the same autocast path as on CUDA: the matmuls change (losses
    not bit-equal to fp32) but stay within bf16 rounding, and weights/optimizer stay float32."""
    from safetensors.torch import load_file

    common = dict(
        student="tiny-mistral",
        caches=(str(kd_cache),),
        max_steps=3,
        batch_size=3,
        attn_weight=0.5,
        lam=0.7,
        progress=False,
    )
    train(TrainConfig(out=str(tmp_path / "fp32"), precision="fp32", **common))
    train(TrainConfig(out=str(tmp_path / "bf16"), precision="bf16", **common))
    a, b = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")
    for key in ("loss", "ce", "kd", "attn"):
        assert a[0][key] != b[0][key], f"{key}: bf16 autocast had no effect"
        for x, y in zip(a, b, strict=True):
            assert y[key] == pytest.approx(x[key], rel=0.01), key
    weights = load_file(str(tmp_path / "bf16" / "checkpoint-3" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    with pytest.raises(TrainError, match="--precision"):
        TrainConfig(out=str(tmp_path / "x"), precision="fp16", **common)


@pytest.mark.slow
def test_trained_checkpoint_loads_in_vllm(tmp_path, kd_cache, chats_file):
    """A student checkpoint is a plain model: vLLM serves it, here as the teacher of a new cache."""
    result = train(
        TrainConfig(
            student="tiny-mistral",
            caches=(str(kd_cache),),
            out=str(tmp_path / "r"),
            max_steps=1,
            batch_size=2,
            progress=False,
        )
    )
    out = tmp_path / "cache"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "teacher_cache.cli",
            "run",
            "--teacher",
            result["checkpoint"],
            "--data",
            str(chats_file),
            "--out",
            str(out),
            "--backend",
            "vllm",
            "--top-k",
            "4",
            "--max-length",
            "256",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert open_cache(out).manifest["teacher"]["path"] == str(Path(result["checkpoint"]).resolve())
    # --no-progress: no weight-loading bars from vLLM either; on CPU its dozen warnings about this
    # tool's own choices (eager mode, in-process engine, core binding) stay out of the log
    for noise in ("Loading safetensors", " WARNING ", "FutureWarning"):
        assert noise not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize(
    "window, layer_map",
    [(None, [(0, 1), (1, 0)]), (3, [(0, 1), (1, 0)]), (None, [(1, 0)])],
    ids=["crossed", "crossed-window-3", "second-cache-layer-only"],
)
def test_distill_step_losses_equal_a_reference_from_the_cached_samples(kd_cache, tiny_student, window, layer_map):
    """What DistillStep trains on, recomputed by hand from the student's full logits and eager
    attention maps at each sample's own target positions: CE on the next token, the top-k KL
    per source weighted by its positions, the attention KL of the mapped layers (crossed, or the
    cache's second layer alone: read by its index in the cache, not its place in the map), also
    for a student whose layers attend within a sliding window of 3 keys."""
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from student_train import losses
    from student_train.data import collate
    from student_train.train import DistillStep
    from teacher_cache import attention

    samples = list(open_cache(kd_cache))[:3]
    assert len({len(s.target_positions) for s in samples}) > 1, "unequal counts make the weighting visible"
    domain = [True, False, False]  # the first sample plays a domain cache's (cache index 1)
    batch = collate([(int(d), s) for d, s in zip(domain, samples, strict=True)], [1], attention=True)
    cfg = TrainConfig(
        student="tiny-mistral",
        caches=(str(kd_cache),),
        out="-",
        lam=0.6,
        attn_weight=0.5,
        temperature=2.0,
        chunk_size=7,
    )
    # layer_map: (index of the teacher layer in the cache's attention layers, student layer)
    config = AutoConfig.from_pretrained(tiny_student.path)
    config.sliding_window = window
    model = AutoModelForCausalLM.from_pretrained(
        tiny_student.path, config=config, dtype=torch.float32, attn_implementation=attention.register()
    ).eval()
    with torch.no_grad():
        out = DistillStep(model, cfg, "topk", layer_map)(batch)
    attention.attach(model, [0, 1], None)

    eager = AutoModelForCausalLM.from_pretrained(
        tiny_student.path, config=config, dtype=torch.float32, attn_implementation="eager"
    )
    kd_sum = n_sum = 0.0
    logits, labels, attn, other = [], [], {li: [] for li, _ in layer_map}, []
    kd_by_group = {}
    with torch.no_grad():
        for s in samples:  # one sample at a time: no padding, no batching in the reference
            ids = torch.from_numpy(s.input_ids)[None]  # [1, T]
            ref = eager.eval()(input_ids=ids, output_attentions=True)
            pos = torch.from_numpy(s.target_positions)  # [P_s]
            logits.append(ref.logits[0, pos])  # [P_s, V]
            labels.append(torch.from_numpy(s.input_ids[s.target_positions + 1]))  # [P_s]

            def kl(student_layer: int, li: int, s=s, pos=pos, ref=ref) -> torch.Tensor:  # summed over positions
                rows = ref.attentions[student_layer][0].mean(0)[pos]  # [P_s, T_s], heads averaged
                ids, lps = torch.from_numpy(s.attention_ids[li]), torch.from_numpy(s.attention_logprobs[li])
                return losses.attention_kl(rows, ids, lps, torch.from_numpy(s.attention_tail_logprob[li])) * len(pos)

            for li, student_layer in layer_map:
                attn[li].append(kl(student_layer, li))
            other.append(kl(layer_map[0][1], 0))  # the first mapped student layer against cache layer 0
    n = [len(s.target_positions) for s in samples]
    for group, members in (("kd_domain", [0]), ("kd_general", [1, 2])):
        kd_by_group[group] = losses.topk_kl(
            torch.cat([logits[i] for i in members]),
            torch.from_numpy(np.concatenate([samples[i].topk_ids for i in members])),
            torch.from_numpy(np.concatenate([samples[i].topk_logprobs for i in members])),
            torch.from_numpy(np.concatenate([samples[i].tail_logprob for i in members])),
            temperature=2.0,
        )
        kd_sum += float(kd_by_group[group]) * sum(n[i] for i in members)
        n_sum += sum(n[i] for i in members)
    kd = kd_sum / n_sum
    ce = float(F.cross_entropy(torch.cat(logits), torch.cat(labels)))
    attn_ref = float(np.mean([float(sum(v)) / sum(n) for v in attn.values()]))
    close = dict(rel=1e-4, abs=1e-6)
    assert float(out["ce"]) == pytest.approx(ce, **close)
    assert float(out["kd_domain"]) == pytest.approx(float(kd_by_group["kd_domain"]), **close)
    assert float(out["kd_general"]) == pytest.approx(float(kd_by_group["kd_general"]), **close)
    assert float(out["kd"]) == pytest.approx(kd, **close)
    assert float(out["attn"]) == pytest.approx(attn_ref, **close)
    assert float(out["loss"]) == pytest.approx(0.4 * ce + 0.6 * (kd + 0.5 * attn_ref), **close)
    # the checks above can tell the alternatives apart on this batch
    assert abs(kd - (float(kd_by_group["kd_domain"]) + float(kd_by_group["kd_general"])) / 2) > 1e-3
    per_layer = [float(sum(v)) / sum(n) for v in attn.values()]
    if window is not None:  # the teacher attends outside the student's window: no finite KL (train() refuses this)
        assert per_layer[0] == per_layer[1] == float(out["attn"]) == math.inf
    elif len(layer_map) == 2:
        assert abs(per_layer[0] - per_layer[1]) > 1e-4
    else:  # the cache's other layer (index 0, first in the cache) gives another loss here
        assert abs(float(out["attn"]) - float(sum(other)) / sum(n)) > 1e-3


def test_caches_of_different_top_k_share_a_batch(kd_cache, k4_cache, tmp_path, capsys):
    """A DAE mix of a top-16 and a top-4 cache: the top-4 rows are padded with weightless
    entries, so every sample's loss is the one of its own targets, and training runs."""
    from student_train import losses
    from student_train.data import collate

    a, b = next(iter(open_cache(kd_cache))), next(iter(open_cache(k4_cache)))
    batch = collate([(0, a), (1, b)], [], attention=False)
    assert batch.topk_ids.shape[1] == 16
    torch.manual_seed(0)
    V = open_cache(kd_cache).vocab_size
    logits = torch.randn(len(batch.pos), V)  # [P, V]
    na = len(a.target_positions)
    mixed = losses.topk_kl(logits, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob)
    own = [
        losses.topk_kl(
            x, torch.from_numpy(s.topk_ids), torch.from_numpy(s.topk_logprobs), torch.from_numpy(s.tail_logprob)
        )
        for x, s in ((logits[:na], a), (logits[na:], b))
    ]
    expect = (float(own[0]) * na + float(own[1]) * (len(batch.pos) - na)) / len(batch.pos)
    assert float(mixed) == pytest.approx(expect, rel=1e-5)
    result = train(
        TrainConfig(
            student="tiny-mistral",
            caches=(str(kd_cache), str(k4_cache)),
            out=str(tmp_path / "r"),
            max_steps=2,
            batch_size=4,
            progress=False,
        )
    )
    assert result["step"] == 2 and all(np.isfinite(r["kd"]) for r in metrics(tmp_path / "r"))
    # both made from the same data file: each sample trains twice, said (legal: two teachers, say)
    said = f"{kd_cache} and {k4_cache} were made from the same data files: the samples both hold are trained "
    said += "once per cache"
    assert f"warning: {said}" in capsys.readouterr().err
    check = [*ST, "check", "--student", "tiny-mistral", "--cache", str(kd_cache), "--cache", str(k4_cache)]
    done = subprocess.run(check, capture_output=True, text=True)
    assert done.returncode == 0 and f"warning: {said}" in done.stderr, done.stderr


def test_evaluate_equals_a_reference_per_sample(kd_cache, kd_teacher, capsys):
    """`student-train eval` figures recomputed one sample at a time from the model's logits. The
    model is the teacher itself: it agrees with its own cached top-1, so a wrong column shows."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from student_train import losses
    from student_train.evaluate import evaluate

    report = evaluate(str(kd_teacher), [str(kd_cache)], batch_size=5, progress=True)
    assert (report["kl_kind"], report["top1_kind"]) == ("KL over the cached top-k + tail", "the teacher's top-1")
    err = capsys.readouterr().err
    assert "evaluating: 100%" in err and "12/12" in err  # progress, on stderr
    model = AutoModelForCausalLM.from_pretrained(kd_teacher, dtype=torch.float32).eval()
    kl = nll = agree = n = 0.0
    with torch.no_grad():
        for s in open_cache(kd_cache):
            pos = torch.from_numpy(s.target_positions)  # [P_s]
            logits = model(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0, pos]  # [P_s, V]
            nxt = torch.from_numpy(s.input_ids[s.target_positions + 1])  # [P_s]
            ids = torch.from_numpy(s.topk_ids)  # [P_s, k]
            per = losses.topk_kl(logits, ids, torch.from_numpy(s.topk_logprobs), torch.from_numpy(s.tail_logprob))
            kl += float(per) * len(pos)
            nll += float(F.cross_entropy(logits, nxt, reduction="sum"))
            agree += float((logits.argmax(-1) == ids[:, 0]).sum())
            n += len(pos)
    got = report["all"]
    assert got["positions"] == n
    assert got["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-3, abs=1e-7)
    assert got["nll"] == pytest.approx(nll / n, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / n, abs=1e-9)
    assert agree > 0.9 * n and kl / n < 0.01, "the teacher against its own targets"


def test_ctrl_c_stops_eval_in_one_line(kd_cache):
    """eval said click's "Aborted!" (status 1) to Ctrl-C and nothing at all to SIGTERM."""
    args = [*ST, "eval", "--model", "tiny-mistral", "--cache", str(kd_cache), "--batch-size", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "sample/s]" not in seen:  # the bar drawn: evaluate() is in its loop
            seen += proc.stderr.read(1) or pytest.fail(f"eval ended first: {seen}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGINT and out == "", seen + err
    assert (seen + err).strip().splitlines()[-1] == (
        "interrupted: no report was written (eval keeps nothing between runs: the same command starts again)"
    )


def test_eval_max_samples_is_per_cache(kd_cache, k4_cache):
    """--max-samples N takes the first N samples of each cache, so a cache given last (a domain
    cache, say) is still in the report."""
    from student_train.evaluate import evaluate

    report = evaluate("tiny-mistral", [str(kd_cache), str(k4_cache)], max_samples=2)
    assert report["all"]["samples"] == 4


def _same_report(a: dict, b: dict) -> None:
    """Two eval reports with the same groups, counts and (to float noise) figures."""
    groups = [g for g in ("all", "domain", "general") if g in a] + [f"by_domain.{d}" for d in a.get("by_domain", {})]
    assert groups == [g for g in ("all", "domain", "general") if g in b] + [
        f"by_domain.{d}" for d in b.get("by_domain", {})
    ]
    for g in groups:
        x, y = (r["by_domain"][g[10:]] if g.startswith("by_domain.") else r[g] for r in (a, b))
        assert (x["positions"], x["samples"]) == (y["positions"], y["samples"])
        for k in ("kl_to_teacher", "nll", "top1_agreement"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (g, k)


def test_training_measures_held_out_caches_as_eval_does_and_a_resume_keeps_one_line_a_step(
    tmp_path, dae_caches, capsys, monkeypatch
):
    """--eval-cache: at every checkpoint (and the last step) eval.jsonl gets what `student-train
    eval` reports for that checkpoint; a resume cuts it back to the checkpoint and redoes the rest."""
    from student_train import evaluate as evaluate_module
    from student_train.evaluate import evaluate

    reference, expert = dae_caches  # trained on the reference, measured on the math expert's samples
    out = tmp_path / "run"
    cfg = dict(student="tiny-mistral", caches=(str(reference),), out=str(out), max_steps=5, batch_size=2,
               save_every=2, lr=1e-3, warmup_steps=0, eval_caches=(str(expert),), progress=False)  # fmt: skip
    train(TrainConfig(**cfg))
    err = capsys.readouterr().err
    assert "not held out" not in err and "trained on" not in err
    lines = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]
    for r in lines:
        _same_report(r, evaluate(str(out / f"checkpoint-{r['step']}"), [str(expert)], batch_size=2))
    assert set(lines[0]["by_domain"]) == {"math"} and lines[0]["all"]["samples"] == 2
    assert lines[0]["all"]["kl_to_teacher"] != lines[-1]["all"]["kl_to_teacher"]  # the student moved
    # killed after step 4's checkpoint: steps 5 redone, its line once; --eval-every may change on a resume
    shutil.rmtree(out / "checkpoint-5")
    train(TrainConfig(**{**cfg, "resume": True}))
    again = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [2, 4, 5]
    _same_report(again[-1], lines[-1])
    shutil.rmtree(out / "checkpoint-5")
    sizes = []  # the batches the evaluation reads (the figures do not depend on them)
    real_measure = evaluate_module.measure
    monkeypatch.setattr(
        evaluate_module, "measure", lambda *a, **kw: sizes.append(kw["batch_size"]) or real_measure(*a, **kw)
    )
    train(TrainConfig(**{**cfg, "resume": True, "eval_every": 1, "eval_batch_size": 3}))
    again = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [2, 4, 5] and sizes == [3]
    _same_report(again[-1], lines[-1])


def test_eval_cache_warnings_and_settings(tmp_path, dae_caches, capsys):
    reference, _ = dae_caches
    train(TrainConfig(student="tiny-mistral", caches=(str(reference),), out=str(tmp_path / "a"), max_steps=1,
                      batch_size=2, eval_caches=(str(reference),), eval_samples=1, progress=False))  # fmt: skip
    err = capsys.readouterr().err
    assert f"--eval-cache {reference} is also a --cache: it is not held out" in err
    line = json.loads((tmp_path / "a" / "eval.jsonl").read_text())
    assert line["step"] == 1 and line["all"]["samples"] == 1  # --eval-samples 1, and the last step is measured
    for bad in (dict(eval_every=2), dict(eval_samples=3), dict(eval_batch_size=4)):
        with pytest.raises(TrainError, match="need --eval-cache"):
            TrainConfig(student="tiny-mistral", caches=(str(reference),), out=str(tmp_path / "b"), **bad)


def test_an_evaluation_that_fails_loses_no_checkpoint(tmp_path, dae_caches):
    """A damaged eval cache is found only when it is first read (its shards stream then): the
    checkpoint of that step is written before the evaluation, so the steps trained are kept."""
    from teacher_cache.shards import ShardError

    reference, expert = dae_caches
    damaged = tmp_path / "damaged"
    shutil.copytree(expert, damaged)
    shard = damaged / open_cache(damaged).shard_names[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    out = tmp_path / "run"
    advice = "; checkpoint-2 is the latest checkpoint; the same command with --resume continues from it$"
    with pytest.raises(ShardError, match="sha256 mismatch.*" + advice):  # what is kept, said
        train(TrainConfig(student="tiny-mistral", caches=(str(reference),), out=str(out), max_steps=2, batch_size=2,
                          save_every=2, eval_caches=(str(damaged),), progress=False))  # fmt: skip
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    # a training shard damaged mid-run, read by a dataloader worker: its type and the same advice
    train_cache = tmp_path / "train-cache"
    shutil.copytree(reference, train_cache)
    names = open_cache(train_cache).shard_names
    shard = train_cache / names[-1]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    out = tmp_path / "run-2"
    with pytest.raises(ShardError, match="sha256 mismatch.*; no checkpoint was written yet: the same command"):
        train(TrainConfig(student="tiny-mistral", caches=(str(train_cache),), out=str(out), max_steps=20,
                          batch_size=2, save_every=50, num_workers=2, shuffle_window=1, progress=False))  # fmt: skip


def test_held_out_rows_are_fetched_once_not_at_every_evaluation(tmp_path, dae_caches, monkeypatch):
    """An eval cache on a web server (a real one on loopback) was downloaded again at every
    evaluation; its rows are now kept after the first (up to KEEP_BYTES of shards; past that,
    read again each time, as before)."""
    import functools
    import http.server
    import threading

    from student_train import evaluate as evaluate_module

    reference, expert = dae_caches
    asked: list[str] = []

    class Counting(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if "shard-" in self.path:
                asked.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Counting, directory=str(reference.parent))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{reference.name}"
    cfg = dict(student="tiny-mistral", caches=(str(expert),), batch_size=2, eval_caches=(url,), progress=False)

    def shard_gets(name: str, steps: int) -> int:
        asked.clear()
        out = tmp_path / name
        train(TrainConfig(**cfg, out=str(out), max_steps=steps, eval_every=1))  # type: ignore[arg-type]
        assert len((out / "eval.jsonl").read_text().splitlines()) == steps
        return len(asked)

    try:
        once = shard_gets("one", 1)
        assert once > 0
        assert shard_gets("kept", 3) == once  # three evaluations, one download
        monkeypatch.setattr(evaluate_module, "KEEP_BYTES", 0)  # too large to keep: read at each evaluation
        assert shard_gets("read", 3) == 3 * once
    finally:
        server.shutdown()
        server.server_close()


def test_held_out_logits_keep_no_kv_cache(dae_caches, tiny_student):
    """The evaluation forward is no generation: in eval mode the decoder would otherwise build a
    cache of every layer's keys and values (memory beside the training's, for nothing)."""
    from student_train.data import collate
    from student_train.evaluate import position_stats
    from teacher_cache.models import load_causal_lm

    reference, _ = dae_caches
    model = load_causal_lm(tiny_student.path, progress=False, dtype=torch.float32).eval()
    kept = []
    model.get_decoder().register_forward_hook(lambda _m, _a, out: kept.append(out.past_key_values))
    samples = list(open_cache(reference))[:2]
    with torch.no_grad():
        stats = position_stats(model, collate([(0, s) for s in samples], [], attention=False), kind="topk")
    assert stats.shape == (3, sum(len(s.target_positions) for s in samples))
    assert kept == [None]


def test_held_out_figures_per_position_are_the_same_in_chunks_of_logits(dae_caches, sampled_cache, tiny_student):
    """position_stats projects `chunk` target positions at a time (a whole batch's [P, V] logits
    are GBs for a 128k vocabulary): the same figures as the losses on the whole [P, V] logits."""
    from student_train import losses
    from student_train.data import collate
    from student_train.evaluate import position_stats
    from teacher_cache.models import load_causal_lm

    model = load_causal_lm(tiny_student.path, progress=False, dtype=torch.float32).eval()
    for cache, kind in ((dae_caches[0], "topk"), (sampled_cache, "sampled")):
        b = collate([(0, s) for s in list(open_cache(cache))[:3]], [], attention=False)
        with torch.no_grad():
            chunked = position_stats(model, b, kind=kind, chunk=7)  # P is not a multiple of 7
            h = model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            z = model.get_output_embeddings()(h[b.row, b.pos])  # [P, V] at once
        if kind == "topk":
            kl = losses.topk_kl_rows(z, b.topk_ids, b.topk_logprobs, b.tail_logprob)
            top1 = b.topk_ids[:, 0]
        else:
            kl = losses.sampled_kl_rows(z, b.sampled_ids, b.sampled_weights)
            top1 = b.sampled_ids.gather(1, b.sampled_weights.argmax(1, keepdim=True))[:, 0]
        whole = torch.stack([kl, torch.nn.functional.cross_entropy(z, b.labels, reduction="none"),
                             (z.argmax(-1) == top1).float()])  # fmt: skip
        assert chunked.shape == whole.shape and chunked.shape[1] > 7
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
        if kind == "topk":  # the rows are the loss's: their mean is topk_kl
            mean = float(losses.topk_kl(z, b.topk_ids, b.topk_logprobs, b.tail_logprob))
            assert mean == pytest.approx(float(kl.mean()), rel=1e-6)


def test_eval_splits_the_domain_part_by_each_experts_domain(tmp_path, chats_file):
    """With two experts' caches (math, code) beside a general one, the report's "by_domain" gives
    each domain what evaluating its cache alone gives, and together they make the "domain" part."""
    from student_train.evaluate import evaluate

    common = dict(teacher="tiny-mixtral", data=(str(chats_file),), backend="hf", top_k=8, progress=False)
    general, math_, code = tmp_path / "general", tmp_path / "math", tmp_path / "code"
    run(RunConfig(out=str(general), exclude_domain="math", **common))
    run(RunConfig(out=str(math_), only_domain="math", **common))
    run(RunConfig(out=str(code), only_domain="code", **common))
    report = evaluate("tiny-mistral", [str(general), str(math_), str(code)], batch_size=3)
    assert sorted(report["by_domain"]) == ["code", "math"]
    parts = report["by_domain"].values()
    assert sum(p["samples"] for p in parts) == report["domain"]["samples"] == 4
    assert sum(p["positions"] for p in parts) == report["domain"]["positions"]
    mean_kl = sum(p["kl_to_teacher"] * p["positions"] for p in parts) / report["domain"]["positions"]
    assert mean_kl == pytest.approx(report["domain"]["kl_to_teacher"], rel=1e-5)
    for name, path in (("math", math_), ("code", code)):
        alone = evaluate("tiny-mistral", [str(path)])
        assert alone["by_domain"][name] == pytest.approx(report["by_domain"][name], rel=1e-4)
        assert alone["domain"] == pytest.approx(alone["by_domain"][name], rel=1e-6)
    assert "by_domain" not in evaluate("tiny-mistral", [str(general)])
    # the general cache kept the code samples: said, with the remedy for both experts at once
    from student_train.checks import domain_overlap

    caches = [open_cache(p) for p in (general, math_, code)]
    assert domain_overlap(caches).endswith("(remake it with --exclude-domain code --exclude-domain math)")
    reference = tmp_path / "reference"  # the remedy: --exclude-domain repeated
    run(RunConfig(out=str(reference), exclude_domain=("math", "code"), **common))
    assert domain_overlap([open_cache(reference), *caches[1:]]) is None
    assert open_cache(reference).manifest["data"]["exclude_domain"] == ["code", "math"]
    assert {s.domain for s in open_cache(reference)} == {None, "geography"}
    assert open_cache(general).manifest["data"]["exclude_domain"] == "math"  # one: a string, as before
    law = tmp_path / "law"  # an empty expert's cache (every record refused at --max-length 4, skipped):
    data = tmp_path / "law.jsonl"  # refused, as train does (not left out)
    data.write_text("".join(json.dumps({**json.loads(line), "domain": "law"}) + "\n" for line in chats_file.open()))
    run(RunConfig(out=str(law), only_domain="law", max_length=4, skip_bad=True, **{**common, "data": (str(data),)}))
    with pytest.raises(ValueError, match=f"no samples in {law}: it is empty"):
        evaluate("tiny-mistral", [str(reference), str(law)])
    check = [*ST, "check", "--student", "tiny-mistral", "--cache"]  # check: as train, not "ok"
    done = subprocess.run([*check, str(law)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == f"Error: no samples in {law}: it is empty"
    done = subprocess.run([*check, str(law), "--cache", str(reference)], capture_output=True, text=True)
    assert done.returncode == 0 and f"warning: {law} holds no samples" in done.stderr


def test_dataloader_workers_keep_the_ranks_order(kd_cache):
    """--num-workers 2 or 3 yields exactly the samples, in the order, of one process (and of the plan)."""
    from student_train.data import Plan, SampleStream, load_samples

    caches = [open_cache(kd_cache)]
    plan = Plan(caches, seed=1, window=2)
    orders = []
    before = set(descendants(os.getpid()))
    for workers in (0, 2, 3, 5):
        rng = torch.get_rng_state()
        it = load_samples(caches, plan, rank=1, world=2, start=3, window=2, num_workers=workers)
        assert torch.equal(torch.get_rng_state(), rng)  # a resume draws what the run would have drawn
        orders.append([next(it)[1].sample_id for _ in range(18)])
        # a worker past the cache's 3 shards would read none, spinning over indices for ever
        assert len(set(descendants(os.getpid())) - before) == min(workers, 3)
        del it
        wait_for(lambda: not set(descendants(os.getpid())) - before, timeout=10)
    # one stream read by two DataLoader workers would yield every sample twice: refused
    stream = SampleStream(caches, plan, rank=0, world=1, start=0, window=2)
    with pytest.raises(RuntimeError, match="use load_samples"):
        next(iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)))
    at = {
        (si, r): s.sample_id
        for si, name in enumerate(caches[0].shard_names)
        for r, s in enumerate(caches[0].iter_shard(name))
    }
    expect = [at[(s, r)] for _, s, r in (plan.item(i) for i in range(3 * 2 + 1, 3 * 2 + 1 + 36, 2))]  # rank 1 of 2
    assert orders[0] == orders[1] == orders[2] == orders[3] == expect
    assert len(set(orders[0])) > 6
    assert plan.short_stream(12) is None and plan.short_stream(13) == 12  # the cache holds 12 samples


def test_each_dataloader_worker_fetches_only_the_shards_it_reads(tmp_path, kd_cache):
    """A shard's bytes are fetched by one worker, not by every worker (each of N workers fetched
    the whole window: N times the bytes, from an object store N times the egress). With the
    shards worker 1 reads in the first epoch removed, worker 0 still yields all of its samples."""
    from student_train.data import Plan, SampleStream

    shutil.copytree(kd_cache, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    plan = Plan([cache], seed=1, window=2)
    epoch = range(len(plan.streams[0]))  # 12 samples in 3 shards: slots 0 and 2 to worker 0, 1 to worker 1
    mine = [i for i in epoch if plan.reader(i, 2) == 0]
    theirs = {plan.item(i)[1] for i in epoch if plan.reader(i, 2) == 1}
    assert len(mine) == 8 and len(theirs) == 1 and not theirs & {plan.item(i)[1] for i in mine}
    at = {
        (si, r): s.sample_id for si, name in enumerate(cache.shard_names) for r, s in enumerate(cache.iter_shard(name))
    }
    for s in theirs:
        os.unlink(cache.where.path(cache.shard_names[s]))
    stream = iter(SampleStream([cache], plan, rank=0, world=1, start=0, window=2, worker=0, workers=2))
    assert [next(stream)[1].sample_id for _ in mine] == [at[plan.item(i)[1:]] for i in mine]
    other = iter(SampleStream([cache], plan, rank=0, world=1, start=0, window=2, worker=1, workers=2))
    with pytest.raises(Exception, match=cache.shard_names[next(iter(theirs))]):
        next(other)


def test_a_shard_decodes_only_the_rows_asked_for(kd_cache, monkeypatch):
    """Rows are fetched in order, but only the rows asked for are decoded (a resume skips to
    its sample, and a window's shard is read row by row as the shuffle asks)."""
    from student_train.data import ShardCache
    from teacher_cache.cache import Cache

    decoded = []
    real = Cache.decode
    monkeypatch.setattr(Cache, "decode", lambda self, row: decoded.append(row.where) or real(self, row))
    cache = open_cache(kd_cache)
    shards = ShardCache([cache], size=2)
    name = cache.shard_names[0]
    sample = shards.get((0, 0, 3))
    assert decoded == [f"{cache.where.describe(name)} row 3"]
    assert sample.sample_id == list(cache.iter_shard(name))[3].sample_id


def test_learning_rate_schedule():
    from student_train.train import lr_at

    lrs = [lr_at(s, lr=1.0, warmup=4, total=14, min_ratio=0.1) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup, reaching lr at its last step
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55)  # cosine: halfway is the mean
    assert lrs[14] == lrs[15] == pytest.approx(0.1)  # held at lr * min_ratio past the end
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def test_gradient_accumulation_averages_its_micro_batches(tmp_path, kd_cache, tiny_student):
    """batch 2 x accumulation 2: one optimizer step over 4 samples, its loss the mean of the two
    micro-batches' losses under the initial weights."""
    from transformers import AutoModelForCausalLM

    from student_train.data import Plan, SampleStream, collate
    from student_train.train import DistillStep

    cfg = TrainConfig(
        student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "r"), max_steps=1, batch_size=2,
        grad_accum=2, progress=False, precision="fp32",  # as the reference below (auto is bf16 on a GPU)
    )  # fmt: skip
    train(cfg)
    (m,) = metrics(tmp_path / "r")
    caches = [open_cache(kd_cache)]
    plan = Plan(caches, seed=cfg.seed, window=cfg.shuffle_window)
    stream = iter(SampleStream(caches, plan, rank=0, world=1, start=0, window=cfg.shuffle_window))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where train() ran
    model = AutoModelForCausalLM.from_pretrained(tiny_student.path, dtype=torch.float32).to(device)
    step = DistillStep(model.train(), cfg, "topk", [])
    with torch.no_grad():
        parts = [step(collate([next(stream) for _ in range(2)], [], attention=False).to(device)) for _ in range(2)]
    assert m["loss"] == pytest.approx(float(parts[0]["loss"] + parts[1]["loss"]) / 2, rel=1e-5)
    (seen,) = [json.loads(line) for line in (tmp_path / "r" / "samples.rank0.jsonl").read_text().splitlines()]
    assert len(seen["samples"]) == 4 and m["samples_seen"] == 4


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_earlier_ones(tmp_path, kd_cache):
    """A write failure while saving (here: a file where checkpoint-2's staging folder goes; a full
    disk takes the same path) stops the run with one line; checkpoint-1 survives and resumes."""
    out = tmp_path / "r"
    out.mkdir()
    (out / ".checkpoint-2.tmp").write_text("in the way")
    args = [*train_args(kd_cache, out), "--save-every", "1", "--max-steps", "3"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: could not write checkpoint-2 in ") and "the checkpoints before it are kept" in line
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and not (out / "checkpoint-2").exists()
    (out / ".checkpoint-2.tmp").unlink()
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    first = tmp_path / "first"  # the first checkpoint fails: no earlier ones to speak of
    first.mkdir()
    (first / ".checkpoint-1.tmp").write_text("in the way")
    done = subprocess.run([*train_args(kd_cache, first), "--save-every", "1", "--max-steps", "1"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "; it was the first: fix that, then rerun" in done.stderr.strip().splitlines()[-1]


def test_a_log_that_cannot_be_written_is_one_line(tmp_path, kd_cache):
    """metrics.jsonl on a device that is full (here /dev/full, which fails every write with
    ENOSPC): one line naming the file and the step, not a bare '[Errno 28]'."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    done = subprocess.run([*train_args(kd_cache, out), "--max-steps", "2"], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: could not write {out / 'metrics.jsonl'} at step 1 (")
    assert "; no checkpoint was written yet (--resume starts again at step 0): free space" in line, line  # none kept


FULL_DISK = """
"$@" 2> "$OUTSIDE/first.err"; echo $? > "$OUTSIDE/first.rc"
ls -a "$DISK/r" > "$OUTSIDE/first.ls"
mount -o remount,size=2g "$DISK"                   # space freed
"$@" --resume 2> "$OUTSIDE/second.err"; echo $? > "$OUTSIDE/second.rc"
cp "$DISK/r/metrics.jsonl" "$OUTSIDE/"
"""


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_says_so_and_resumes(kd_cache, tiny_student, small_disk):
    """A real full device with room for one checkpoint: one line, checkpoint-1 kept, --resume finishes."""
    out = small_disk.disk / "r"
    weights = (Path(tiny_student.path) / "model.safetensors").stat().st_size
    room = int(weights * 4.5)  # a checkpoint is ~3x the weights (AdamW's two moments): one fits, two do not
    small_disk.run(FULL_DISK, [*train_args(kd_cache, out), "--save-every", "1", "--max-steps", "2"], size=room)
    first = small_disk.read("first.err")
    assert small_disk.read("first.rc").strip() == "1" and "Traceback" not in first, first
    assert first.strip().splitlines()[-1] == (
        f"Error: could not write checkpoint-2 in {out} (no space left on the device); the checkpoints "
        "before it are kept: free space, then rerun with --resume"
    )
    left = small_disk.read("first.ls").split()
    assert "checkpoint-1" in left and not any("checkpoint-2" in name for name in left)  # nor its staging folder
    assert small_disk.read("second.rc").strip() == "0", small_disk.read("second.err")
    assert [json.loads(line)["step"] for line in small_disk.read("metrics.jsonl").splitlines()] == [1, 2]


def test_a_read_only_out_is_one_line_naming_the_path_typed(kd_cache, small_disk, tmp_path):
    """train said "[Errno 30] Read-only file system: 'ro/run'", plot named its own temp file
    ('.c.png.7351-eca3e38d.tmp': the cleanup's error replaced the write's)."""
    run = tmp_path / "run"
    train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(run), max_steps=1, warmup_steps=0,
                      progress=False))  # fmt: skip
    script = (
        'mount -o remount,ro "$DISK" || exit 97\n'
        '"$@" > /dev/null 2> "$OUTSIDE/train.err"\n'
        f'{sys.executable} -m student_train.cli plot {run} --out "$DISK/c.png" 2> "$OUTSIDE/plot.err"\n'
        "exit 0\n"
    )
    disk = small_disk.disk
    small_disk.run(script, train_args(kd_cache, disk / "run"), size="1m")
    last = small_disk.read("train.err").splitlines()[-1]
    assert last == f"Error: --out {disk}/run: cannot create it (read-only file system)"
    assert small_disk.read("plot.err") == f"Error: {disk}/c.png: read-only file system\n"


def test_a_damaged_checkpoint_or_log_is_one_line_and_the_one_before_resumes(tmp_path, kd_cache):
    """--resume on what a kill or full disk leaves: a torn last metrics line is dropped; a
    truncated weights file, an unreadable or lying trainer state, a foreign optimizer file each
    stop in one line that names it and says to move the checkpoint aside; then it resumes."""
    out = tmp_path / "r"
    args = [*train_args(kd_cache, out), "--max-steps", "6"]
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0
    clean = metrics(out)
    shutil.rmtree(out / "checkpoint-6")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "kd": 2')  # torn mid-write
    ckpt = out / "checkpoint-4"
    state = (ckpt / "trainer_state.json").read_text()
    weights = (ckpt / "model.safetensors").read_bytes()
    damage = [
        (ckpt / "model.safetensors", weights[:1000], "cannot load the student's weights"),
        (ckpt / "trainer_state.json", "{", "trainer_state.json: unreadable"),
        (ckpt / "trainer_state.json", state.replace('"step": 4', '"step": -3'), "not a trainer state this run can"),
        (ckpt / "optimizer.pt", b"\x00" * 64, "optimizer.pt: cannot load"),
    ]
    for path, bad, why in damage:
        good = path.read_bytes()
        path.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        done = subprocess.run([*args, "--resume"], capture_output=True, text=True)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("Error")]
        assert why in line and f"move {ckpt} aside to resume from the checkpoint before it" in line, line
        path.write_bytes(good)
    plot = subprocess.run([*ST, "plot", str(out)], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr  # the torn line does not stop the plot either
    shutil.move(ckpt, tmp_path / "aside")  # as the message says: resume from checkpoint-2
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in clean]


@pytest.mark.parametrize(
    "setting,value,message",
    [
        ("lr", -1e-3, "--lr must be > 0, got -0.001"),
        ("lr", 0.0, "--lr must be > 0, got 0"),
        ("min_lr_ratio", -1.0, "--min-lr-ratio must be within [0, 1], got -1"),
        ("min_lr_ratio", 5.0, "--min-lr-ratio must be within [0, 1], got 5"),
        ("weight_decay", -0.1, "--weight-decay must be >= 0, got -0.1"),
        ("clip", 0.0, "--clip must be > 0 (the gradient-norm threshold), got 0"),
        ("attn_weight", -5.0, "--attn-weight must be >= 0, got -5"),
        ("domain_ratio", 1.5, "--domain-ratio must be within [0, 1], got 1.5"),
        ("lam", 3.0, "--lam must be within [0, 1], got 3"),
        ("seed", -1, "--seed must be >= 0, got -1"),
        (
            "attention_layer_map",
            ((0, 0), (0, 1)),
            "--attention-layer-map names a teacher layer twice: [(0, 0), (0, 1)]",
        ),
        ("attention_layer_map", ((0, 0),), "--attention-layer-map needs --attn-weight > 0 (the attention loss is off)"),
        # the CLI's ranges, for configs built in Python (save_every=0 failed after the first step)
        ("save_every", 0, "--save-every must be >= 1, got 0"),
        ("warmup_steps", -5, "--warmup-steps must be >= 0, got -5"),
        ("shuffle_window", 0, "--shuffle-window must be >= 1, got 0"),
        ("num_workers", -1, "--num-workers must be >= 0, got -1"),
        ("chunk_size", 0, "--chunk-size must be >= 1, got 0"),
        ("lora_rank", -1, "--lora-rank must be >= 0 (0: no LoRA), got -1"),
        ("caches", (), "no caches given (--cache)"),
    ],
)
def test_out_of_range_settings_are_refused_before_anything_runs(tmp_path, setting, value, message):
    """A negative clip threshold or lr floor would train backwards, a negative attention weight
    would silently drop the attention loss: each is refused by name instead."""
    with pytest.raises(TrainError) as err:
        TrainConfig(**{"student": "tiny-mistral", "caches": ("c",), "out": str(tmp_path / "r"), setting: value})
    assert str(err.value) == message


def test_settings_from_python_take_numpy_numbers_and_any_iterable_and_refuse_by_name(tmp_path):
    """Notebook values: numpy ints and floats are numbers, lists are stored as tuples (the config
    stays hashable), and a layer map of other types is refused by its field's name when built, not
    by json.dumps at the first checkpoint (numpy ints) or a comparison deep in the run."""
    import numpy as np

    common = dict(student="tiny-mistral", out=str(tmp_path / "r"), attn_weight=1.0)
    cfg = TrainConfig(caches=["c"], max_steps=np.int64(3), lr=np.float32(1e-3), **common,
                      attention_layer_map=[[np.int64(0), np.int64(1)]])  # fmt: skip
    assert cfg.max_steps == 3 and type(cfg.max_steps) is int and type(cfg.lr) is float
    assert cfg.attention_layer_map == ((0, 1),) and type(cfg.attention_layer_map[0][0]) is int
    assert hash(cfg) and json.dumps(dataclasses.asdict(cfg))
    for bad in ([(0, "1")], [(0.0, 0.0)], {0: 1}, "0:1", [(0, 1, 2)], 3):
        with pytest.raises(TypeError, match=r"^attention_layer_map must be pairs of ints, got "):
            TrainConfig(caches=("c",), **common, attention_layer_map=bad)
    with pytest.raises(TypeError, match=r"^max_steps must be an int, got 3.0"):
        TrainConfig(caches=("c",), **common, max_steps=3.0)


def test_an_attention_weight_that_lam_zero_would_drop_is_refused(tmp_path):
    with pytest.raises(TrainError, match=r"--attn-weight needs --lam > 0: the loss is \(1 - lam\) CE"):
        TrainConfig(student="tiny-mistral", caches=("c",), out=str(tmp_path / "r"), attn_weight=1.0, lam=0.0)
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_missing_a_weight_is_refused_not_filled_at_random(tmp_path, kd_cache, capsys):
    """transformers would initialise a missing tensor at random, print a report and go on: eval
    and train refuse such a checkpoint in one line naming the tensor; an extra tensor only warns."""
    from safetensors.torch import load_file, save_file

    from teacher_cache.models import load_causal_lm

    damaged = tmp_path / "damaged"
    shutil.copytree(resolve_model("tiny-mistral").path, damaged)
    weights = load_file(damaged / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    lacks = "lacks weights its config needs: model.layers.1.mlp.down_proj.weight"
    done = subprocess.run([*ST, "eval", "--model", str(damaged), "--cache", str(kd_cache), "--no-progress"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr and "LOAD REPORT" not in done.stderr
    assert lacks in done.stderr.strip().splitlines()[-1]
    out = tmp_path / "run"
    done = subprocess.run([*ST, "train", "--student", str(damaged), "--cache", str(kd_cache), "--out", str(out),
                           "--max-steps", "1", "--no-progress"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and lacks in done.stderr.strip().splitlines()[-1]
    assert not out.exists()  # the --out it made is removed again: nothing was written into it

    weights = load_file(resolve_model("tiny-mistral").path + "/model.safetensors")
    save_file({**weights, "extra.weight": torch.zeros(2)}, damaged / "model.safetensors", metadata={"format": "pt"})
    load_causal_lm(str(damaged))  # loads: every tensor the config needs is there
    assert "tensors its config has no place for, ignored: extra.weight" in capsys.readouterr().err

    # a config that gives tensors other shapes (transformers said only "look at the above report")
    config = json.loads((damaged / "config.json").read_text())
    size = config["intermediate_size"]
    (damaged / "config.json").write_text(json.dumps({**config, "intermediate_size": size + 8}))
    with pytest.raises(ValueError) as e:
        load_causal_lm(str(damaged), role="the student")
    assert str(e.value) == (
        f"{damaged}: the checkpoint has misshapen weights its config needs: model.layers.0.mlp.down_proj.weight "
        f"(stored [{config['hidden_size']}, {size}], config [{config['hidden_size']}, {size + 8}]), "
        f"model.layers.0.mlp.gate_proj.weight (stored [{size}, {config['hidden_size']}], "
        f"config [{size + 8}, {config['hidden_size']}]) and 4 more"
    )


def test_out_must_be_a_run_directory_of_its_own(tmp_path, kd_cache):
    """--out may not be a file, a teacher cache or a folder inside one, or a folder of other
    files; a folder that already holds a run keeps its other files (eval reports) on resume."""
    afile, foreign = tmp_path / "afile", tmp_path / "mine"
    afile.write_text("x")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for out, message in (
        (afile, "is a file, not a run directory"),
        (kd_cache, f"is inside the teacher cache {kd_cache.resolve()}"),
        (kd_cache / "run", f"is inside the teacher cache {kd_cache.resolve()}"),
        (foreign, "holds files that are not a training run's (notes.txt)"),
    ):
        with pytest.raises(TrainError, match=re.escape(message)):
            train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(out), max_steps=1))
    assert not (kd_cache / "run").exists() and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (foreign / "plan.md").write_text("mine too")
    with pytest.raises(TrainError, match=re.escape("not a training run's (notes.txt and 1 more)")):
        train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(foreign), max_steps=1))
    with pytest.raises(ValueError, match=f"^{kd_cache}/manifest.json is a file, not a teacher cache's folder: give "):
        train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache / "manifest.json"),), out=str(foreign)))
    run = tmp_path / "run"
    train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(run), max_steps=2, progress=False))
    (run / "eval.json").write_text("{}")
    done = train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(run), max_steps=2,
                             resume=True, progress=False))  # fmt: skip
    assert done["step"] == 2


def test_a_shard_listed_twice_in_one_cache_or_in_two_is_refused_before_training(tmp_path, kd_cache):
    """A copy of a cache whose manifest was touched (another timing: another digest), or a shard
    file copied under a second name and listed again: the caches' digests differ, and every row of
    that shard was trained on twice an epoch."""
    first = json.loads((kd_cache / "manifest.json").read_text())["shards"][0]
    copied, within = tmp_path / "copied", tmp_path / "within"
    for dst in (copied, within):
        shutil.copytree(kd_cache, dst)
    m = json.loads((copied / "manifest.json").read_text())
    m["timing"]["wall_s"] += 1
    (copied / "manifest.json").write_text(json.dumps(m))
    again = "shard-w00000-000099.arrow"
    shutil.copy(within / first["name"], within / again)
    m = json.loads((within / "manifest.json").read_text())
    m["shards"].append({**first, "name": again})
    m["counts"]["samples"] += first["rows"]
    (within / "manifest.json").write_text(json.dumps(m))
    assert len(list(open_cache(within))) == m["counts"]["samples"]  # each shard reads, and checks out
    for caches, said in (
        ([kd_cache, copied], f"{copied}/{first['name']}: the same file as {kd_cache}/{first['name']} (same sha256)"),
        ([within], f"{within}/{again}: the same file as {within}/{first['name']} (same sha256)"),
    ):
        args = [a for c in caches for a in ("--cache", str(c))]
        for command in (["check"], ["train", "--out", str(tmp_path / "run"), "--no-progress"]):
            done = subprocess.run([*ST, *command, "--student", "tiny-mistral", *args], capture_output=True, text=True)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert f"Error: {said}: its samples would count twice" in done.stderr, done.stderr
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_shard_in_two_caches_names_both_caches_to_choose_from(tmp_path, kd_cache):
    """Each cache given once (a merge and its source): the advice was "give each --cache once"."""
    from student_train.checks import check_distinct

    copied = tmp_path / "copied"
    shutil.copytree(kd_cache, copied)
    m = json.loads((copied / "manifest.json").read_text())
    m["timing"]["wall_s"] += 1
    (copied / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrainError, match=f"count twice; give {kd_cache} or {copied} as --eval-cache, not both$"):
        check_distinct([open_cache(kd_cache), open_cache(copied)], "--eval-cache")


def test_check_refuses_caches_without_target_positions_as_train_does(tmp_path, kd_cache):
    """check said "ok" for caches that train and eval refuse (Plan: no target positions)."""
    cache = tmp_path / "no-targets"
    shutil.copytree(kd_cache, cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["counts"]["target_positions"] = 0
    (cache / "manifest.json").write_text(json.dumps(m))
    done = subprocess.run([*ST, "check", "--student", "tiny-mistral", "--cache", str(cache)], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"Error: no target positions in {cache}: no sample has a token to learn"


def test_settings_and_caches_a_run_cannot_use(tmp_path, kd_cache, k4_cache):
    with pytest.raises(TrainError, match="--temperature must be a finite number"):
        TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out=str(tmp_path / "a"), temperature=math.inf)
    with pytest.raises(TrainError, match="the same cache is given twice"):
        train(TrainConfig(student="tiny-mistral", caches=(str(kd_cache), str(kd_cache) + "/"), out=str(tmp_path / "b")))
    # a ratio of 0 draws general samples only: no domain cache needed
    cfg = TrainConfig(student="tiny-mistral", caches=(str(k4_cache),), out=str(tmp_path / "c"), max_steps=1,
                      domain_ratio=0.0, progress=False)  # fmt: skip
    assert train(cfg)["step"] == 1
    eval_out = tmp_path / "missing" / "report.json"
    done = subprocess.run([*ST, "eval", "--model", "tiny-mistral", "--cache", str(kd_cache), "--out", str(eval_out)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "does not exist" in done.stderr.strip().splitlines()[-1]
    # eval --out never overwrites what is not an eval report (a cache's manifest, a run's file),
    # nor writes into a cache, nor takes a URL; an earlier report is replaced
    manifest = kd_cache / "manifest.json"
    before = manifest.read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    report = tmp_path / "report.json"
    for out, code, said in (
        (manifest, 1, "is inside the teacher cache"),
        (tmp_path / "notes.txt", 1, "exists and is not an eval report: it is left as it is"),
        ("s3://bucket/report.json", 2, "a local path is needed"),
        (report, 0, None),
        (report, 0, None),
    ):
        done = subprocess.run([*ST, "eval", "--model", "tiny-mistral", "--cache", str(kd_cache), "--max-samples", "1",
                               "--no-progress", "--out", str(out)], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == code, done.stderr
        assert said is None or said in done.stderr.strip().splitlines()[-1]
    assert manifest.read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads(report.read_text())["all"]["samples"] == 1 and not (tmp_path / "s3:").exists()
    with pytest.raises(TrainError, match="a local run directory is needed"):
        TrainConfig(student="tiny-mistral", caches=(str(kd_cache),), out="s3://bucket/run")
    from student_train.evaluate import evaluate

    with pytest.raises(TrainError, match="the same cache is given twice"):
        evaluate("tiny-mistral", [str(kd_cache), str(kd_cache)], max_samples=1)
    # a config.json that describes a model over twice its weights: refused before it is built
    # ({"model_type": "llama"} alone is a 7B model: ~28 GB in float32, killed by the OOM killer)
    for name, config in (("deep", {**json.loads((Path(resolve_model("tiny-mistral").path) / "config.json").read_text()),
                                   "num_hidden_layers": 80}), ("llama", {"model_type": "llama"})):  # fmt: skip
        shutil.copytree(resolve_model("tiny-mistral").path, tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(TrainError, match="config.json describes .* parameters but the weight files hold"):
            train(TrainConfig(student=str(tmp_path / name), caches=(str(kd_cache),), out=str(tmp_path / name / "r")))
    odd = tmp_path / "odd"
    shutil.copytree(resolve_model("tiny-mistral").path, odd)
    (odd / "config.json").write_text("[1, 2]")
    with pytest.raises(RuntimeError, match="not a model config"):
        resolve_model(str(odd))


def test_a_resume_replaces_its_logs_whole_never_in_place(tmp_path):
    """A resume drops the log lines of steps after its checkpoint. It rewrote metrics.jsonl in
    place (emptied, then written): a kill between the two left it empty, and the next resume
    ended with steps 1..N gone from the log. Now the kept lines go to a new file renamed over it:
    the old file (here: a hard link to it) is never touched."""
    from student_train.train import _truncate_jsonl

    log, old = tmp_path / "metrics.jsonl", tmp_path / "old"
    lines = [json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 7)]
    log.write_text("".join(lines) + '{"step": 7, "lo')  # torn by a kill mid-line
    os.link(log, old)
    _truncate_jsonl(log, 4)
    assert log.read_text() == "".join(lines[:4])
    assert old.read_text() == "".join(lines) + '{"step": 7, "lo'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "old"]  # no temp file left
    inode = log.stat().st_ino
    _truncate_jsonl(log, 4)  # nothing to drop: not rewritten
    assert log.stat().st_ino == inode


def test_the_python_api_leaves_the_caller_s_rng_and_returns_json(tmp_path, kd_cache):
    """A notebook's torch RNG was reseeded by train() (even one that failed at once); evaluate()
    took max_samples=0 (a KL of 0 over no position, read as a perfect student) and returned the
    caller's Path objects in a report json.dumps refused."""
    from student_train.evaluate import evaluate

    torch.manual_seed(123)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="not a teacher cache|does not exist|no manifest"):
        train(TrainConfig(student="tiny-mistral", caches=(str(tmp_path / "none"),), out=str(tmp_path / "r")))
    assert torch.equal(torch.get_rng_state(), before)
    for bad, said in ((dict(max_samples=0), "max_samples must be an int >= 1, got 0"),
                      (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
                      (dict(max_samples=1.5), "max_samples must be an int >= 1, got 1.5")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(said)):
            evaluate("tiny-mistral", kd_cache, **bad)
    with pytest.raises(ValueError, match="no caches given"):
        evaluate("tiny-mistral", [])
    report = evaluate(Path(resolve_model("tiny-mistral").path), Path(kd_cache), max_samples=2)
    assert json.loads(json.dumps(report))["caches"] == [str(kd_cache)]
    assert torch.equal(torch.get_rng_state(), before)


def test_caches_without_target_positions_are_refused_not_trained_at_loss_zero(tmp_path, kd_cache, tiny_student):
    """Rows without target positions (legal one by one) in every sample: train ran every step at
    loss 0 and eval reported a KL of 0.0 over 0 positions, both with exit 0."""
    from student_train.evaluate import evaluate
    from teacher_cache import codec
    from tests.teacher_cache.test_untrusted import rewrite_shard

    cache = tmp_path / "no-targets"
    shutil.copytree(kd_cache, cache)

    def empty(rows: list[dict]) -> None:
        for r in rows:
            r["target_positions"] = []
            r["targets"] = codec.encode_topk(np.zeros((0, 16), np.int64), np.zeros((0, 16), np.float32),
                                             np.zeros(0, np.float32), vocab_size=32000)  # fmt: skip
            k = min(8, len(r["input_ids"]))
            r["attention"] = [
                codec.encode_topk(
                    np.zeros((0, k), np.int64),
                    np.zeros((0, k), np.float32),
                    np.zeros(0, np.float32),
                    vocab_size=len(r["input_ids"]),
                )
                for _ in r["attention"]
            ]

    shards = json.loads((cache / "manifest.json").read_text())["shards"]
    for index in range(len(shards)):
        rewrite_shard(cache, empty, index=index)
    # the manifest still counts the positions the rows lost: found as the rows are measured
    with pytest.raises(ValueError, match=f"^no target positions in the samples measured of {cache}$"):
        evaluate(tiny_student.path, [str(cache)], batch_size=4)
    mpath = cache / "manifest.json"
    m = json.loads(mpath.read_text())
    m["counts"]["target_positions"] = 0
    mpath.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"^no target positions in {cache}: no sample has a token to learn$"):
        train(TrainConfig(student="tiny-mistral", caches=(str(cache),), out=str(tmp_path / "run"), max_steps=1))
    assert not (tmp_path / "run").exists()


def test_an_eval_cache_whose_shards_a_training_cache_holds_is_said_to_be_trained_on(tmp_path, kd_cache):
    """A merge's source as --eval-cache beside the merge as --cache (or a copy with another
    manifest): its samples are trained on, and it was only said that they "may be"."""
    from student_train.evaluate import HeldOut
    from teacher_cache.tokenize import load_tokenizer

    copied = tmp_path / "copied"
    shutil.copytree(kd_cache, copied)
    m = json.loads((copied / "manifest.json").read_text())
    m["timing"]["wall_s"] += 1  # another manifest, the same shards
    (copied / "manifest.json").write_text(json.dumps(m))
    tok = load_tokenizer(resolve_model("tiny-mistral").path)
    said = HeldOut((str(copied),), None, tok).not_held_out([open_cache(kd_cache)])
    assert said == [f"--eval-cache {copied} shares 3 shards with --cache {kd_cache} (the same files): those samples "
                    "are trained on"]  # fmt: skip


def test_a_float32_setting_is_the_number_the_cli_reads_and_blank_paths_are_refused(tmp_path):
    """TrainConfig(lr=np.float32(1e-4)) held 9.999999747378752e-05: its checkpoints then refused a
    resume with the CLI's --lr 1e-4 ("trained with other settings (lr)"). out="" trained into the
    working directory, and student="" or a cache "" read it ("." is no checkpoint nor cache), where
    the CLI refuses a blank path."""
    common = {"student": "tiny-mistral", "caches": ("c",), "out": str(tmp_path / "r")}
    typed = TrainConfig(**common, lr=np.float32(1e-4), min_lr_ratio=np.float16(0.1), domain_ratio=np.float32(0.3))
    assert typed == TrainConfig(**common, lr=1e-4, min_lr_ratio=0.1, domain_ratio=0.3)
    assert type(typed.lr) is float and TrainConfig(**common, lr=np.float64(1e-4)).lr == 1e-4
    for field, option in (("out", "--out"), ("student", "--student"), ("caches", "--cache")):
        with pytest.raises(TrainError, match=f"^{option} must not be empty$"):
            TrainConfig(**{**common, field: ""})
    with pytest.raises(TrainError, match="^--eval-cache must not be empty$"):
        TrainConfig(**common, eval_caches=("held", " "))


def test_a_plan_of_paths_or_of_nothing_says_what_it_needs():
    """Plan(["caches/x"]) failed with "'str' object has no attribute 'manifest'", and Plan([]) said
    "no samples in : it is empty"."""
    from student_train.data import Plan

    with pytest.raises(TypeError, match=r"list of Cache \(teacher_cache.open_cache\(path\)\), got 'c'"):
        Plan(["c"], seed=0)
    with pytest.raises(ValueError, match="^no caches given$"):
        Plan([], seed=0)
