"""`teacher-cache`: thin click layer; each command builds a config and calls a plain function."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from teacher_cache import __version__
from teacher_cache.errors import one_line, plural, printable
from teacher_cache.manifest import MANIFEST, MAX_NUM_DRAWS, read_part
from teacher_cache.storage import Location, is_url

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or over a disk quota


class UserError(click.ClickException):
    """Printed as one line, exit code 1."""


class SettingsError(UserError):
    """Options that contradict each other: one line that names the command's --help, exit code 2
    (a usage error, as click's own)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        ctx = click.get_current_context(silent=True)
        super().__init__(f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message)


class _UsageLine(click.ClickException):
    """A usage error as one line (click's own prints the usage and a hint before it); exit 2."""

    exit_code = 2


_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


@contextlib.contextmanager
def _one_line_usage(command_path: str) -> Iterator[None]:
    """Re-raise a click usage error as one line that points at the --help of its command (or of
    `command_path` when click gives no context)."""
    try:
        yield
    except click.UsageError as e:
        if isinstance(e, _HELP):  # a bare command: its help, as click prints it
            raise
        where = e.ctx.command_path if e.ctx is not None else command_path
        raise _UsageLine(f"{e.format_message()} (see '{where} --help')") from None


class OneLineGroup(click.Group):
    """A command group whose usage errors (an unknown option, a bad value) are one line, as every
    other error of these CLIs is."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        with _one_line_usage(info_name or self.name or ""):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:  # parses the subcommand's options, then runs it
        try:
            with _one_line_usage(ctx.command_path):
                return super().invoke(ctx)
        except KeyboardInterrupt as e:  # one no command reported (before its own handler): said here
            stopped(e, f"{ctx.command_path} {ctx.invoked_subcommand or ''}".rstrip() + " stopped")

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's main; a Ctrl-C that `stopped` reported leaves as an uncaught KeyboardInterrupt
        (click would make it "Aborted!"), printed by no one: Python then ends the process with
        SIGINT itself, after every exit handler, so a shell loop or make stops as well (an exit
        status of 130 tells bash the program handled the signal, and its loop went on)."""
        try:
            return super().main(*args, **kwargs)
        except _Interrupted:
            sys.excepthook = _quiet_interrupt
            raise KeyboardInterrupt from None


class NonBlankPath(click.ParamType):
    """A path or fsspec URL: any non-blank string ("" would resolve to the working directory or /)."""

    name = "path"

    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail("must not be empty", param, ctx)
        return value


PATH = NonBlankPath()


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes, `timeout` and torchrun send), handled as Ctrl-C is."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def interruptible() -> None:
    """Make SIGINT a KeyboardInterrupt even where it was inherited ignored: a non-interactive shell
    starts background jobs that way (POSIX), and then `kill -INT` did nothing to an hf run and left
    a vLLM run waiting forever on an engine the signal had stopped. SIGTERM too (it killed the
    process where it stood, a half-written shard and the bar's line left behind)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)


def finished(line: str | None) -> None:
    """Say a finished command's last line (`done: ...`, merge's, verify's; None: one rank of
    several, or eval, whose report is out). The work is durable, so a signal from now on (Ctrl-C
    during the interpreter's shutdown, which can take seconds after vLLM or torch) ends the process
    at once with status 0, not with a traceback from an exit handler."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # while the line is written
    if line is not None:
        click.echo(line)

    def leave(signum: int, frame: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)


class _Interrupted(SystemExit):
    """Ctrl-C, reported: OneLineGroup.main ends the process by the signal."""


def _quiet_interrupt(kind: type, value: BaseException, tb: object) -> None:
    """sys.excepthook once a Ctrl-C is reported: no traceback for it, others as usual."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)


def stopped(e: KeyboardInterrupt, what: str, prefix: str = "") -> None:
    """The one line for a run stopped by a signal, then its end: by SIGINT itself for Ctrl-C (see
    OneLineGroup.main; status 130 where the signal cannot be re-raised), 143 for SIGTERM."""
    term = isinstance(e, Terminated)
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # one the signal caught mid-draw: end its line first
        # a bar stopped inside its constructor, drawn but before its clock was set, closes silently
        drawn = not hasattr(bar, "last_print_t") and getattr(bar, "sp", None) is not None
        bar.close()
        if drawn:
            bar.fp.write("\n")
    click.echo(f"{prefix}{'terminated' if term else 'interrupted'}: {what}", err=True)
    if term:
        sys.exit(143)
    raise _Interrupted(130)


def _kept_shards(out: str, worker: int, num_workers: int) -> str:
    """What a stopped run leaves and how to go on, for its message: the shards the worker's part
    file lists, which a resume keeps (a shard published after the part's last write, which a full
    disk or a signal can stop, is redone); local --out is looked at, an object store is not."""
    if is_url(out):
        return "finished shards are kept; the same command resumes after them"
    there = Path(out).is_dir()
    try:
        part = read_part(Location(out), worker, num_workers) if there else None
    except (ValueError, OSError):  # unreadable: the resume says what to do with it
        part = None
    n = len(part["shards"]) if part is not None else 0
    if not n:
        what = "no shard was finished" if there else "nothing was written"
        return f"{what}; the same command starts again"
    return f"{n} finished shard{'s are' if n != 1 else ' is'} kept; the same command resumes after them"


def _refuse_unused_options(kw: dict) -> None:
    """Options typed on the command line that the other settings would ignore: a usage error,
    not a cache silently made without them."""
    ctx = click.get_current_context()
    typed = {n for n in kw if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE}
    targets = f"with --targets {kw['targets']}"
    sampled_alone = kw["targets"] == "sampled" and not kw["attention_layers"]  # no block with an error bound
    for option, name, unused, why in (
        ("--top-k", "top_k", kw["targets"] == "sampled", targets),
        ("--num-draws", "num_draws", kw["targets"] == "topk", targets),
        ("--seed", "seed", kw["targets"] == "topk", targets),  # it draws nothing, but its value is hashed
        ("--logprob-error", "logprob_error", sampled_alone, f"{targets} and without --attention-layers"),
        ("--attention-top-k", "attention_top_k", not kw["attention_layers"], "without --attention-layers"),
    ):
        if unused and name in typed:
            raise SettingsError(f"{option} has no effect {why}")


def _parse_layers(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer indices, got {value!r}") from None


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="teacher-cache")
def main() -> None:
    """Cache a teacher model's targets (top-k or sampled log-probs, attention summaries) to Arrow shards."""


def _refuse_memory_out(out: str) -> None:
    """fsspec's memory:// lives in this process: a cache written there is gone when the command
    ends (it said "done" and left nothing). From Python it is fine: the caller's process keeps it."""
    if any(url.strip().lower().startswith("memory:") for url in out.split("::")):  # simplecache::memory:// too
        raise SettingsError(f"--out {out}: memory:// ends with this process, so the cache would be lost")


@main.command()
@click.option(
    "--teacher", type=PATH, required=True, help="Preset name (see `teacher-cache presets`) or checkpoint directory."
)
@click.option(
    "--data", "data", type=PATH, multiple=True, required=True, help="JSONL/Parquet file or fsspec URL; repeatable."
)
@click.option("--out", type=PATH, required=True, help="Cache directory or fsspec URL (s3://bucket/prefix) to write.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "vllm", "hf"]),
    default="auto",
    show_default=True,
    help="Teacher engine; auto = vllm where installed.",
)
@click.option(
    "--vllm-mode",
    type=click.Choice(["hidden", "prompt_logprobs"]),
    default="hidden",
    show_default=True,
    help="hidden: vLLM hidden states + our projection (fast); prompt_logprobs: vLLM's stock path.",
)
@click.option(
    "--tensor-parallel-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="vllm backend: split the teacher across N GPUs (Mixtral-8x7B in bf16 needs 2 of 80 GB).",
)
@click.option(
    "--targets",
    type=click.Choice(["topk", "sampled"]),
    default="topk",
    show_default=True,
    help="topk: top-k log-probs + tail mass; sampled: N teacher draws per position (ids + counts).",
)
@click.option("--top-k", type=click.IntRange(min=1), default=32, show_default=True, help="Top-k targets: k.")
@click.option(
    "--num-draws",
    type=click.IntRange(1, MAX_NUM_DRAWS),
    default=50,
    show_default=True,
    help="Sampled targets: draws per position.",
)
@click.option(
    "--logprob-error",
    type=float,
    default=0.02,
    show_default=True,
    help="Top-k and attention log-probs are stored within this many nats of the exact value "
    "(a multiple of 0.005 up to 1.275; larger = smaller cache, see docs/CODEC.md).",
)
@click.option("--attention-layers", default=None, help="Comma-separated layers to summarise attention for.")
@click.option(
    "--attention-top-k", type=click.IntRange(min=1), default=16, show_default=True, help="Key positions kept per row."
)
@click.option(
    "--max-length", type=click.IntRange(min=2), default=2048, show_default=True, help="Longer samples are truncated."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Samples per forward.")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True, help="Samples per shard.")
@click.option(
    "--chunk-bytes",
    type=click.IntRange(min=4096, max=64 << 20),
    default=1 << 20,
    show_default=True,
    help="Checksum granularity: readers stream and check a shard this many bytes at a time.",
)
@click.option("--only-domain", default=None, help="Keep only records of this domain.")
@click.option(
    "--exclude-domain", multiple=True, help="Drop records of this domain; repeatable (a reference beside experts)."
)
@click.option("--skip-bad", is_flag=True, help="Skip malformed records (counted in the manifest) instead of failing.")
@click.option("--worker-index", type=click.IntRange(min=0), default=0, show_default=True, help="This worker's share.")
@click.option(
    "--num-workers", type=click.IntRange(min=1), default=1, show_default=True, help="Workers splitting the data."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled targets' draws.")
@click.option(
    "--source", default=None, help="Tag stored on every row (default: the preset's name, or the checkpoint folder's)."
)
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(**kw) -> None:
    """Run the teacher over DATA and write targets to OUT (resumable; re-running a finished run does nothing)."""
    from teacher_cache.run import RunConfig
    from teacher_cache.run import run as run_cache

    # vLLM logs to stdout by default; stdout is the one `done:` line (set before vLLM is imported)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    _refuse_unused_options(kw)
    kw["data"] = tuple(kw["data"])
    kw["exclude_domain"] = tuple(kw["exclude_domain"]) or None
    kw["attention_layers"] = _parse_layers(kw["attention_layers"])
    kw["progress"] = not kw.pop("no_progress")
    _refuse_memory_out(kw["out"])
    try:
        cfg = RunConfig(**kw)
    except (ValueError, RuntimeError) as e:  # settings that contradict each other: a usage error (exit 2)
        raise SettingsError(one_line(e)) from None
    interruptible()
    try:
        part = run_cache(cfg)
    except OSError as e:
        if e.errno in DISK_FULL:
            kept = _kept_shards(cfg.out, cfg.worker_index, cfg.num_workers)  # none, before the first shard
            raise UserError(f"no space left on the device of {cfg.out}: {kept}, once there is space") from None
        raise UserError(one_line(e)) from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(one_line(e)) from None
    except KeyboardInterrupt as e:
        stopped(e, _kept_shards(cfg.out, cfg.worker_index, cfg.num_workers))
    worker = f"worker {cfg.worker_index} of {cfg.num_workers}, " if cfg.num_workers > 1 else ""
    samples = plural(part["counts"]["samples"], "sample")
    finished(f"done: {worker}{samples} in {cfg.out}")  # the log above is on stderr


@main.command()
@click.argument("cache_dir", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def inspect(cache_dir: str, as_json: bool) -> None:
    """Show who made a cache and how, with its size and counts."""
    from teacher_cache.inspection import summary

    try:
        info = summary(cache_dir)
    except (ValueError, OSError) as e:
        raise UserError(one_line(e)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    width = max(26, *map(len, info))  # wider only for a merge's duplicates_with_other_targets
    for key, value in info.items():
        shown = value if isinstance(value, (str, int, float)) else json.dumps(value, ensure_ascii=False)
        click.echo(printable(f"{key:>{width}}: {shown}"))  # nested values as JSON (null, not Python's None)


@main.command()
@click.argument("cache_dir", type=PATH)
@click.argument("sample_id", required=False)
@click.option(
    "--tokenizer",
    type=PATH,
    help="Preset, model folder or tokenizer folder to print tokens with (it must be the cache's tokenizer). "
    "Default: the cache's teacher where it is on this machine, else token ids.",
)
@click.option("--positions", type=click.IntRange(min=0), default=20, show_default=True,
              help="Target positions to show, from the first (0: all).")  # fmt: skip
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Teacher entries per position.")
@click.option("--json", "as_json", is_flag=True, help="Print the sample as JSON.")
def show(cache_dir: str, sample_id: str | None, tokenizer: str | None, positions: int, top: int, as_json: bool) -> None:
    """Show one sample's teacher targets position by position (SAMPLE_ID, or the cache's first
    sample): the true next token, the teacher's probability and rank for it, its top entries."""
    from teacher_cache.cache import open_cache
    from teacher_cache.show import format_view, load_view_tokenizer, sample_view

    try:
        cache = open_cache(cache_dir, check_files=False)
        try:
            sample = cache.find(sample_id)
        except KeyError:
            what = f"no sample {sample_id!r}" if sample_id is not None else "no samples"
            raise UserError(printable(f"{cache_dir}: {what}")) from None
        tok, said = load_view_tokenizer(cache.manifest, tokenizer)
        view = sample_view(cache, sample, tok, top=top, positions=positions)
    except (ValueError, RuntimeError, OSError, KeyError) as e:  # KeyError: --tokenizer names no preset nor folder
        raise UserError(one_line(e)) from None
    if as_json:
        click.echo(json.dumps(view, indent=1, ensure_ascii=False))
        return
    for line in format_view(view, said):
        click.echo(printable(line))  # ids, domains and tokens come from the cache


@main.command()
@click.argument("cache_dir", type=PATH)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def verify(cache_dir: str, no_progress: bool) -> None:
    """Check every shard's checksum, schema, value bounds and counts; exit 1 on any problem."""
    from teacher_cache.inspection import verify as verify_cache

    interruptible()
    try:
        problems, checked = verify_cache(cache_dir, progress=not no_progress)
    except KeyboardInterrupt as e:
        stopped(e, f"{cache_dir} was not fully verified (verify only reads: nothing changed)")
    except (ValueError, OSError) as e:
        raise UserError(one_line(e)) from None
    for p in problems:
        click.echo(printable(f"PROBLEM: {p}"), err=True)  # ids and names come from the cache
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {cache_dir}")
    finished(f"ok: {plural(checked, 'sample')} in {cache_dir} verified")


@main.command()
@click.argument("caches", type=PATH, nargs=-1, required=True)
@click.option("--out", type=PATH, required=True, help="New directory for the merged cache.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def merge(caches: tuple[str, ...], out: str, no_progress: bool) -> None:
    """Join finished, compatible caches (several days' runs, say) into OUT; say exactly why when they
    are not. (Workers of one run share its --out: the last to finish writes the manifest.)"""
    from teacher_cache.merge import merge as merge_caches

    if len(caches) < 2:
        raise SettingsError("merge needs at least two caches")
    _refuse_memory_out(out)
    interruptible()
    try:
        m = merge_caches(list(caches), out, progress=not no_progress)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: one line, as for run
        if is_url(out):  # not listed: the store may be what stopped it
            what = f"the merge is unfinished: if {out} holds shards, delete them and merge again"
        elif (Path(out) / MANIFEST).is_file():  # written last, atomically: only the final check was cut
            what = f"the merged cache was written, its final check was not: `teacher-cache verify {out}` checks it"
        elif any(Path(out).glob("shard-*")):
            what = f"the merge is unfinished: delete {out} and merge again"
        else:
            what = "nothing was written"
        stopped(e, what)
    except OSError as e:
        if e.errno in DISK_FULL:  # merges do not resume: the shards copied so far are whole, but start over
            raise UserError(
                f"no space left on the device of {out}: the merge is unfinished; free space, delete {out} "
                "and merge again"
            ) from None
        raise UserError(one_line(e)) from None
    except ValueError as e:
        raise UserError(one_line(e)) from None
    c, other = m["counts"], m["duplicates_with_other_targets"]
    # counts.duplicates also holds the sources' own (a run's repeated records): this merge's are these
    dropped = sum(source["samples"] for source in m["merged_from"]) - c["samples"]
    numerics = (
        f"; {plural(other, 'row')} of the cache kept once over copies with other target values, from another "
        "batch or engine"
        if other
        else ""
    )
    finished(
        f"merged {len(caches)} caches into {out}: {plural(c['samples'], 'sample')} in "
        f"{plural(len(m['shards']), 'shard')} ({plural(dropped, 'duplicate row')} dropped{numerics})"
    )


@main.command()
def presets() -> None:
    """List the model presets."""
    from teacher_cache.presets import PRESETS

    for p in PRESETS.values():
        where = p.hub_id or p.pip_package or p.base or "built from a seed"
        click.echo(f"{p.name:<20} {p.kind:<8} {where:<42} {p.description}")


@main.command()
@click.argument("name")
def build(name: str) -> None:
    """Build a local preset (tiny, GGUF or derived) now and print its directory (hub presets:
    their hub id; they download on first use)."""
    from teacher_cache.models import resolve_model

    try:
        ref = resolve_model(name)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UserError(one_line(e)) from None
    if not ref.is_local:
        click.echo(f"{name} is a hub model: nothing to build; it downloads from the hub on first use", err=True)
    click.echo(ref.path)


if __name__ == "__main__":
    sys.exit(main())
