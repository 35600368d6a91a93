"""Both CLIs as a user types them: help, version, and one-line errors with a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

TC = [sys.executable, "-m", "teacher_cache.cli"]
ROOT = Path(__file__).resolve().parents[1]
ST = [sys.executable, "-m", "student_train.cli"]


def sh(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(
    "cli,commands",
    [(TC, ["run", "inspect", "show", "verify", "merge", "presets", "build"]), (ST, ["check", "train", "eval", "plot"])],
)
def test_help_lists_commands_and_each_command_has_help(cli, commands):
    top = sh([*cli, "--help"])
    assert top.returncode == 0
    for c in commands:
        assert c in top.stdout
        assert sh([*cli, c, "--help"]).returncode == 0


@pytest.mark.parametrize("cli,name", [(TC, "teacher-cache"), (ST, "student-train")])
def test_version(cli, name):
    done = sh([*cli, "--version"])
    assert done.returncode == 0 and done.stdout.startswith(f"{name}, version 0.2.1")


def test_help_does_not_import_heavy_engines():
    code = (
        "import sys; from click.testing import CliRunner; from teacher_cache.cli import main; "
        "CliRunner().invoke(main, ['run', '--help']); print('vllm' in sys.modules, 'torch' in sys.modules)"
    )
    assert sh([sys.executable, "-c", code]).stdout.split() == ["False", "False"]


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_unreachable_data_and_unloadable_weights_are_one_line(tmp_path, chats_file):
    """--data on an object store without credentials, and a teacher whose weights file is
    truncated, are one line each (both were tracebacks), and no --out is left behind."""
    import os
    import shutil

    from teacher_cache.models import resolve_model

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run(
        [*TC, "run", "--teacher", "tiny-mixtral", "--backend", "hf", "--no-progress", "--data",
         "s3://no-such-bucket/x.jsonl", "--out", str(tmp_path / "a")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 1 and "s3://no-such-bucket/x.jsonl: cannot reach it (" in one_line_error(done)
    broken = tmp_path / "broken"
    shutil.copytree(resolve_model("tiny-mixtral").path, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    done = sh([*TC, "run", "--teacher", str(broken), "--backend", "hf", "--no-progress", "--data", str(chats_file),
               "--out", str(tmp_path / "b")])  # fmt: skip
    assert done.returncode == 1 and f"{broken}: cannot load the teacher (" in one_line_error(done)
    assert not (tmp_path / "a").exists()


def test_unknown_preset_lists_known_ones(tmp_path, chats_file):
    err = one_line_error(sh([*TC, "run", "--teacher", "gpt-17", "--data", str(chats_file), "--out", str(tmp_path)]))
    assert "unknown model 'gpt-17'" in err and "tiny-mixtral" in err and "smollm2-135m" in err


def test_missing_data_file(tmp_path):
    err = one_line_error(
        sh(
            [
                *TC,
                "run",
                "--teacher",
                "tiny-mixtral",
                "--data",
                str(tmp_path / "nope.jsonl"),
                "--out",
                str(tmp_path / "c"),
            ]
        )
    )
    assert "data file not found" in err and "nope.jsonl" in err


def test_bad_data_found_before_the_first_shard_leaves_no_empty_cache(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    run = [*TC, "run", "--teacher", "tiny-mixtral", "--backend", "hf", "--data", str(bad)]
    done = sh([*run, "--out", str(tmp_path / "new" / "c")])
    assert done.returncode == 1 and "bad.jsonl:1: conversation has no non-empty assistant turn" in one_line_error(done)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"  # a folder the user made: kept, without the parts/ the run added
    mine.mkdir()
    assert sh([*run, "--out", str(mine)]).returncode == 1
    assert mine.is_dir() and not any(mine.iterdir())


def test_unwritable_output(tmp_path, chats_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = one_line_error(
        sh([*TC, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(blocker / "cache")])
    )
    assert "cannot write to " in err and "Not a directory" in err


def test_bad_option_values_are_usage_errors(tmp_path, chats_file):
    done = sh(
        [*TC, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(tmp_path), "--top-k", "0"]
    )
    assert done.returncode == 2 and "--top-k" in done.stderr
    done = sh(
        [
            *TC,
            "run",
            "--teacher",
            "tiny-mixtral",
            "--data",
            str(chats_file),
            "--out",
            str(tmp_path),
            "--worker-index",
            "3",
            "--num-workers",
            "2",
        ]
    )
    want = "Error: --worker-index must be in [0, --num-workers) (see 'python -m teacher_cache.cli run --help')"
    assert done.returncode == 2 and one_line_error(done) == want
    done = sh([*TC, "run", "--data", str(chats_file)])
    assert done.returncode == 2 and "--teacher" in done.stderr
    run = [*TC, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(tmp_path / "c")]
    done = sh([*run, "--only-domain", "math", "--exclude-domain", "code"])
    assert done.returncode == 2 and "--only-domain and --exclude-domain exclude each other" in one_line_error(done)
    done = sh([*run, "--logprob-error", "0.013"])
    assert done.returncode == 2 and "--logprob-error: " in one_line_error(done)
    done = sh([*TC, "merge", str(tmp_path / "a"), "--out", str(tmp_path / "m")])
    assert done.returncode == 2
    assert (
        one_line_error(done)
        == "Error: merge needs at least two caches (see 'python -m teacher_cache.cli merge --help')"
    )
    for extra, message in (
        (["--attention-layers", "1,1"], "--attention-layers lists a layer twice"),
        (["--only-domain", ""], "--only-domain must not be empty"),
        (["--out", " "], "Invalid value for '--out': must not be empty"),
        (["--backend", "hf", "--vllm-mode", "prompt_logprobs"], "--vllm-mode applies to the vllm backend only"),
        (["--backend", "hf", "--tensor-parallel-size", "2"], "--tensor-parallel-size applies to the vllm backend"),
        (["--targets", "sampled", "--vllm-mode", "prompt_logprobs"], "sampled targets need full logits"),
        (["--targets", "sampled", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--targets", "sampled", "--top-k", "8"], "--top-k has no effect with --targets sampled"),
        (["--num-draws", "8"], "--num-draws has no effect with --targets topk"),
        (["--seed", "3"], "--seed has no effect with --targets topk"),
        (["--targets", "sampled", "--logprob-error", "0.1"], "--logprob-error has no effect with --targets sampled"),
        (["--attention-top-k", "4"], "--attention-top-k has no effect without --attention-layers"),
        (["--data", str(chats_file)], "--data names a file twice"),
        (["--data", os.path.relpath(chats_file)], "--data names a file twice"),  # another spelling of it
    ):
        done = sh([*run, *extra])
        assert done.returncode == 2 and message in one_line_error(done), done.stderr
    done = sh([*run, "--backend", "hf", "--attention-layers", "0,5"])  # the tiny teacher has 2 layers
    assert done.returncode == 1 and "attention layer 5 out of range: tiny-mixtral has 2 layers" in one_line_error(done)
    done = sh([*run, "--backend", "hf", "--top-k", "40000"])
    assert "--top-k 40000 is larger than the teacher's vocabulary (32000 tokens)" in one_line_error(done)
    assert not (tmp_path / "c").exists()
    done = sh([*TC, "inspect", ""])
    assert done.returncode == 2 and "Invalid value for 'CACHE_DIR': must not be empty" in one_line_error(done)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    done = sh([*TC, "run", "--teacher", "tiny-mixtral", "--data", str(bad), "--out", str(tmp_path / "c")])
    assert done.returncode == 1 and f"{bad}: not a readable Parquet file" in one_line_error(done)
    done = sh([*ST, "train", "--student", "tiny-mistral", "--cache", str(tmp_path), "--out", str(tmp_path / "r"),
               "--fsdp", "--lora-rank", "4"])  # fmt: skip
    assert done.returncode == 2 and "--fsdp with --lora-rank" in one_line_error(done)
    done = sh([*ST, "train", "--student", "tiny-mistral", "--cache", str(tmp_path), "--out", str(tmp_path / "r"),
               "--attention-layer-map", "a:b"])  # fmt: skip
    want = "Invalid value for '--attention-layer-map': expected TEACHER:STUDENT pairs like 0:0,31:15, got 'a:b'"
    assert done.returncode == 2 and want in one_line_error(done)  # the option was not named
    done = sh([*ST, "train", "--student", "tiny-mistral", "--cache", str(tmp_path), "--out", str(tmp_path / "r"),
               "--fsdp"])  # fmt: skip
    assert done.returncode == 2 and "--fsdp shards the student across torchrun's processes" in one_line_error(done)
    done = sh([*ST, "train", "--student", "tiny-mistral", "--cache", str(tmp_path), "--out", str(tmp_path / "r"),
               "--clip=-1"])  # fmt: skip
    assert done.returncode == 2 and "--clip must be > 0 (the gradient-norm threshold), got -1" in one_line_error(done)
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_option_parsing_errors_are_one_line_too(tmp_path):
    """click prints the usage and a hint before its error: these CLIs print the error alone."""
    tc, st = (str(Path(sys.executable).parent / name) for name in ("teacher-cache", "student-train"))
    bad_precision = "Invalid value for '--precision': 'fp16' is not one of 'auto', 'bf16', 'fp32'."
    for args, line in (
        (
            [tc, "run", "--top-k", "0"],
            "Invalid value for '--top-k': 0 is not in the range x>=1. (see 'teacher-cache run",
        ),
        ([tc, "run", "--out", str(tmp_path)], "Missing option '--teacher'. (see 'teacher-cache run"),
        ([tc, "inspect"], "Missing argument 'CACHE_DIR'. (see 'teacher-cache inspect"),
        ([tc, "frob"], "No such command 'frob'. (see 'teacher-cache"),
        ([st, "train", "--precision", "fp16"], f"{bad_precision} (see 'student-train train"),
        ([st, "eval", "--frob"], "No such option '--frob'. (see 'student-train eval"),
    ):
        done = sh(args)
        assert (done.returncode, done.stderr.splitlines()) == (2, [f"Error: {line} --help')"]), done.stderr
    assert not any(tmp_path.iterdir())
    # under torchrun (its variables set), a settings error says which process printed it
    done = sh([st, "train", "--student", "s", "--cache", "c", "--out", str(tmp_path / "r"), "--lr", "0"],
              env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"})  # fmt: skip
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        ["Error: rank 1: --lr must be > 0, got 0 (see 'student-train train --help')"],  # a settings error too
    )
    done = sh([tc, "run", "--teacher"])  # click gives this error no context: the group's help is named
    assert done.stderr.splitlines() == ["Error: Option '--teacher' requires an argument. (see 'teacher-cache --help')"]
    bare = sh([tc])  # a bare command still prints its help
    assert bare.returncode == 2 and "Commands:" in bare.stderr + bare.stdout


def test_data_folder_and_foreign_out_are_refused_before_anything_is_written(tmp_path, chats_file):
    err = one_line_error(
        sh([*TC, "run", "--teacher", "tiny-mixtral", "--data", str(tmp_path), "--out", str(tmp_path / "c")])
    )
    assert "is a directory: --data takes JSONL or Parquet files" in err and not (tmp_path / "c").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    err = one_line_error(sh([*TC, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(mine)]))
    assert "holds files that are not a cache's (notes.txt)" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    err = one_line_error(
        sh([*TC, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(mine / "notes.txt")])
    )
    assert err == f"Error: --out {mine / 'notes.txt'} is a file, not a directory for the cache"  # was "File exists"
    (mine / "parts").mkdir()  # a folder of one's own that happens to be called parts/ is not a cache's
    (mine / "parts" / "notes.md").write_text("mine too")
    err = one_line_error(sh([*TC, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--out", str(mine)]))
    assert "holds files that are not a cache's (notes.txt)" in err
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == ["notes.txt", "parts", "parts/notes.md"]


def test_build_says_a_hub_preset_has_nothing_to_build():
    done = sh([*TC, "build", "mixtral"])
    assert done.returncode == 0 and "hub model: nothing to build" in done.stderr
    assert done.stdout.strip() == "mistralai/Mixtral-8x7B-Instruct-v0.1"


def test_inspect_and_verify_refuse_a_non_cache(tmp_path):
    assert "not a teacher cache" in one_line_error(sh([*TC, "inspect", str(tmp_path)]))
    assert "not a teacher cache" in one_line_error(sh([*TC, "verify", str(tmp_path)]))


def test_presets_command_lists_the_registry():
    done = sh([*TC, "presets"])
    assert done.returncode == 0
    for name in ("mixtral", "mistral-7b", "tiny-mixtral", "tiny-mistral", "smollm2-135m", "smollm2-135m-half"):
        assert name in done.stdout


def test_the_caching_bar_starts_once_the_teacher_is_loaded(tmp_path, chats_file):
    """Not at 0 % under the engine's start-up (vLLM prints its own lines there)."""
    done = sh([*TC, "run", "--teacher", "tiny-mixtral", "--backend", "hf", "--data", str(chats_file),
               "--out", str(tmp_path / "c")])  # fmt: skip
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert err.index("loading the teacher tiny-mixtral (hf)\n") < err.index("caching:") and "12/12" in err
    assert done.stdout == f"done: 12 samples in {tmp_path / 'c'}\n"  # one line on stdout, as train's


def test_exclude_domain_repeats_and_a_domain_no_record_has_is_said(tmp_path, chats_file):
    done = sh([*TC, "run", "--teacher", "tiny-mixtral", "--backend", "hf", "--data", str(chats_file), "--no-progress",
               "--out", str(tmp_path / "c"), "--exclude-domain", "Math", "--exclude-domain", "code"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = "(the data's domains: 'code', 'geography', 'math')"
    assert f"warning: no record has domain 'Math': --exclude-domain Math excludes nothing {listed}" in done.stderr
    assert done.stdout == f"done: 10 samples in {tmp_path / 'c'}\n"  # the 2 code samples left out
    # --only-domain with a typo made an empty cache (exit 0) that only train refused, later
    typo = sh([*TC, "run", "--teacher", "tiny-mixtral", "--backend", "hf", "--data", str(chats_file),
               "--out", str(tmp_path / "typo"), "--only-domain", "Science"])  # fmt: skip
    assert typo.returncode == 1 and not (tmp_path / "typo").exists(), typo.stderr
    assert typo.stderr.strip() == f"Error: --only-domain Science: no record of the data has that domain {listed}"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_done_line_ends_the_process_quietly(signame):
    """Ctrl-C during the interpreter's shutdown after `done:` (vLLM's and torch's exit handlers take
    a while) was a KeyboardInterrupt traceback from an atexit callback. The work is durable by then:
    the process ends at once, status 0. The slow exit handler here stands for theirs."""
    import signal
    import time

    script = (
        "import atexit, time\n"
        "from teacher_cache.cli import finished\n"
        "atexit.register(time.sleep, 30)\n"
        "finished('done: 1 sample in x')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "done: 1 sample in x\n"
        time.sleep(0.5)  # into the exit handler
        t = time.time()
        proc.send_signal(getattr(signal, signame))
        rc = proc.wait(timeout=20)
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert rc == 0 and err == "" and time.time() - t < 10, err


def test_ctrl_c_stops_a_shell_loop_of_runs_not_only_the_run(tmp_path, chats_file):
    """Ctrl-C reaches the whole foreground group; bash ends its loop only if the child died of
    SIGINT. The run caught it and exited 130, so `for d in A B; do teacher-cache run ...; done`
    went on to the next run. Now the run says what it kept, then ends by the signal."""

    outs = [tmp_path / "A", tmp_path / "B"]
    run = " ".join(map(shlex.quote, long_run(tmp_path, chats_file)))
    loop = f"for d in {' '.join(map(str, outs))}; do {run} --out $d; echo next; done"
    out, err, _ = ctrl_c_once_a_shard_is_durable(["bash", "-c", loop], outs[0])
    assert "interrupted: " in err and "Traceback" not in err, err
    assert "next" not in out and not outs[1].exists(), (out, err)


def test_the_demo_scripts_steps_pass_ctrl_c_on_and_end_by_it(tmp_path, chats_file):
    """make demo / make experiment run the CLIs through scripts/run_dir.step: Ctrl-C printed a
    KeyboardInterrupt traceback from subprocess.run, which killed the command 0.25 s later, before
    its 'interrupted: ... kept' line."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from run_dir import step\nstep('cache', sys.argv[2:], 'demo')\n"
    )
    args = [sys.executable, "-c", script, str(ROOT / "scripts"), *long_run(tmp_path, chats_file)]
    import signal

    _, err, code = ctrl_c_once_a_shard_is_durable([*args, "--out", str(tmp_path / "c")], tmp_path / "c")
    assert "Traceback" not in err and code == -signal.SIGINT, err
    assert err.strip().splitlines()[-1].endswith(" kept; the same command resumes after them"), err


def test_a_hub_preset_when_the_hub_does_not_answer_is_one_line_not_a_wait(tmp_path, chats_file):
    """`make cache TEACHER=mixtral` without a network retried for ~50 s and ended on transformers'
    words; behind a proxy that accepts and never answers it printed nothing, forever. Here a real
    server on loopback that accepts connections and never answers stands for the hub."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hub = f"http://127.0.0.1:{server.getsockname()[1]}"
        env = {**os.environ, "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf"), "TEACHER_CACHE_HUB_TIMEOUT": "2"}
        env.pop("HF_HUB_OFFLINE", None)
        args = [*TC, "run", "--teacher", "mixtral", "--data", str(chats_file), "--out", str(tmp_path / "c")]
        done = subprocess.run([*args, "--backend", "hf"], capture_output=True, text=True, env=env, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert (
        "mistralai/Mixtral-8x7B-Instruct-v0.1: a hub model, not in the local Hugging Face cache, and the hub"
        in lines[0]
    )
    assert "hf download mistralai/" in lines[0] and "or give a local checkpoint folder" in lines[0]
    assert not (tmp_path / "c").exists()
    # offline (HF_HUB_OFFLINE=1): the same advice at once, not transformers' words about its tokenizer
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*args, "--backend", "hf"], capture_output=True, text=True, env=offline, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set: download it" in lines[0], lines[0]
    assert not (tmp_path / "c").exists()


def long_run(tmp_path: Path, chats_file: Path) -> list[str]:
    """A teacher-cache run of 60 one-sample shards (no --out): it outlasts a signal on a busy machine."""
    data = tmp_path / "many.jsonl"
    records = [json.loads(line) for line in chats_file.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{i}"}) + "\n" for i in range(5) for r in records))
    return [*TC, "run", "--teacher", "tiny-mixtral", "--data", str(data), "--backend", "hf",
            "--shard-size", "1", "--batch-size", "1", "--no-progress"]  # fmt: skip


def ctrl_c_once_a_shard_is_durable(args: list[str], out: Path) -> tuple[str, str, int]:
    """Start `args` in a process group of its own, send the group SIGINT (a terminal's Ctrl-C) once
    the run writing `out` has a durable shard; -> (stdout, stderr, exit status)."""
    import signal
    import time

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        part = out / "parts" / "worker-00000-of-00001.json"
        deadline = time.time() + 120
        while time.time() < deadline and not (part.is_file() and json.loads(part.read_text() or "{}").get("shards")):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return stdout, stderr, proc.returncode


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_keeps_finished_shards_and_says_how_to_resume(tmp_path, chats_file, signame):
    """SIGTERM (Slurm, Kubernetes, timeout) is handled as Ctrl-C is; it killed the run where it stood."""
    import signal
    import time

    out, data = tmp_path / "c", tmp_path / "many.jsonl"
    records = [json.loads(line) for line in chats_file.read_text().splitlines()]
    # 5 copies under their own ids: a run of 60 one-sample shards outlasts the signal even on a busy machine
    data.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{i}"}) + "\n" for i in range(5) for r in records))
    args = [*TC, "run", "--teacher", "tiny-mixtral", "--data", str(data), "--out", str(out), "--backend", "hf",
            "--shard-size", "1", "--batch-size", "1", "--no-progress"]  # fmt: skip
    # started as a non-interactive shell starts a background job, with SIGINT ignored (inherited
    # through exec): the run still takes `kill -INT` as a Ctrl-C (it used to go on to the end)
    inherited = signal.getsignal(signal.SIGINT)
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    part = out / "parts" / "worker-00000-of-00001.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (part.is_file() and json.loads(part.read_text() or "{}").get("shards")):
        time.sleep(0.05)  # until a shard is durable (listed in the part file), not merely on disk
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    status, word = (-signal.SIGINT, "interrupted") if signame == "SIGINT" else (143, "terminated")
    assert proc.returncode == status and "Traceback" not in err, (err, f"SIGINT here: {inherited}")
    kept = len(json.loads(part.read_text())["shards"])  # a shard published just before the signal may be unlisted
    assert 1 <= kept < 60, "interrupted mid-run"
    finished = f"{kept} finished shard{'s are' if kept > 1 else ' is'} kept"
    assert err.strip().splitlines()[-1] == f"{word}: {finished}; the same command resumes after them"
    again = sh(args)
    durable = re.search(r"resuming: (\d+) shards? already durable", again.stderr)
    assert again.returncode == 0 and durable and int(durable[1]) == kept, again.stderr
    assert sh([*TC, "verify", str(out)]).returncode == 0


def test_a_domain_filter_that_matches_nothing_is_reported(tmp_path, chats_file):
    """A filter no record of the data matches is refused (test_exclude_domain_...); one that leaves
    a worker's share empty is warned about; an empty cache is refused by train and eval."""
    from teacher_cache.run import _belongs_to

    math_ids = [r["id"] for r in map(json.loads, chats_file.read_text().splitlines()) if r.get("domain") == "math"]
    idle = next(w for w in range(8) if not any(_belongs_to(i, w, 8) for i in math_ids))
    run = [*TC, "run", "--teacher", "tiny-mixtral", "--data", str(chats_file), "--backend", "hf", "--no-progress"]
    done = sh([*run, "--out", str(tmp_path / "w"), "--only-domain", "math", "--num-workers", "8", "--worker-index",
               str(idle)])  # fmt: skip
    assert done.returncode == 0 and f"warning: no record of worker {idle}'s share has domain 'math'" in done.stderr
    out = tmp_path / "c"  # every math record refused (too long for --max-length 4), skipped
    done = sh([*run, "--out", str(out), "--only-domain", "math", "--max-length", "4", "--skip-bad"])
    assert done.returncode == 0 and "this part of the cache is empty" in done.stderr
    for command in (["train", "--out", str(tmp_path / "r")], ["eval"]):
        err = one_line_error(sh([*ST, command[0], "--student" if command[0] == "train" else "--model", "tiny-mistral",
                                 "--cache", str(out), *command[1:]]))  # fmt: skip
        assert err == f"Error: no samples in {out}: it is empty"


def test_data_nested_too_deeply_and_too_many_draws_are_refused_in_one_line(tmp_path, chats_file):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(chats_file.read_text() + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    run = [*TC, "run", "--teacher", "tiny-mixtral", "--backend", "hf", "--out", str(tmp_path / "c")]
    done = sh([*run, "--data", str(deep)])
    assert done.returncode == 1 and "invalid JSON (ValueError: nested too deeply)" in one_line_error(done)
    run[-1] = str(tmp_path / "d")
    done = sh([*run, "--data", str(chats_file), "--targets", "sampled", "--num-draws", "3000000000"])
    assert done.returncode == 2 and "--num-draws" in done.stderr and not (tmp_path / "d").exists()


def test_a_stopped_runs_line_says_resume_only_when_a_shard_is_kept(tmp_path):
    """A Ctrl-C before the first shard said 'nothing was written; the same command resumes after them'."""
    from teacher_cache.cli import _kept_shards

    out = tmp_path / "c"
    assert _kept_shards(str(out), 0, 1) == "nothing was written; the same command starts again"
    out.mkdir()
    assert _kept_shards(str(out), 0, 1) == "no shard was finished; the same command starts again"
    (out / "shard-w00000-000000.arrow").write_bytes(b"")
    (out / "parts").mkdir()
    listed = {"name": "shard-w00000-000000.arrow", "rows": 1, "bytes": 0}
    (out / "parts" / "worker-00000-of-00001.json").write_text(json.dumps({"config_hash": "h", "shards": [listed]}))
    assert _kept_shards(str(out), 0, 1) == "1 finished shard is kept; the same command resumes after them"


def test_a_stopped_run_counts_only_the_shards_its_part_lists(tmp_path):
    """A shard published after the part file's last write (a full disk failed that write, or a
    signal came between them) is redone by the resume: the line said it was kept (2, resume: 1)."""
    from teacher_cache.cli import _kept_shards

    out = tmp_path / "c"
    (out / "parts").mkdir(parents=True)
    for i in range(2):
        (out / f"shard-w00001-00000{i}.arrow").write_bytes(b"")
    listed = {"name": "shard-w00001-000000.arrow", "rows": 1, "bytes": 0}
    part = out / "parts" / "worker-00001-of-00002.json"
    part.write_text(json.dumps({"config_hash": "h", "shards": [listed]}))
    assert _kept_shards(str(out), 1, 2) == "1 finished shard is kept; the same command resumes after them"
    part.write_text(json.dumps({"config_hash": "h", "shards": []}))  # the first shard's listing failed
    assert _kept_shards(str(out), 1, 2) == "no shard was finished; the same command starts again"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stopped_merge_or_verify_says_so_in_one_line(tmp_path, chats_file, sig):
    """merge and verify read every shard, for minutes on a large cache: Ctrl-C printed click's
    "Aborted!" and SIGTERM nothing at all. Here a real web server on loopback, slow to serve each
    shard, holds the commands in their reading until the signal comes."""
    import functools
    import http.server
    import signal
    import threading
    import time

    from teacher_cache.run import RunConfig, run

    cache = tmp_path / "cache"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(cache), backend="hf", top_k=8, shard_size=2, progress=False))
    asked = threading.Event()

    class Slow(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if "shard-" in self.path:
                asked.set()
                time.sleep(0.5)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cache"
    out = tmp_path / "merged"
    try:
        for args, said in (
            (["merge", url, str(cache), "--out", str(out)], "nothing was written"),
            (["verify", url], f"{url} was not fully verified (verify only reads: nothing changed)"),
        ):
            asked.clear()
            proc = subprocess.Popen([*TC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert asked.wait(120), "the command never asked for a shard"
            proc.send_signal(getattr(signal, sig))
            stdout, stderr = proc.communicate(timeout=120)
            kind = "interrupted" if sig == "SIGINT" else "terminated"
            assert stderr.strip().splitlines()[-1] == f"{kind}: {said}", stderr
            assert "Traceback" not in stderr and "Aborted" not in stderr and not stdout, stderr
            assert proc.returncode == (-signal.SIGINT if sig == "SIGINT" else 143), proc.returncode
        assert not out.exists()
    finally:
        server.shutdown()
        server.server_close()


def test_a_ctrl_c_once_merge_verify_or_eval_have_finished_ends_them_with_status_0(tmp_path, chats_file):
    """A Ctrl-C after the last line (in the interpreter's shutdown: torch's exit handlers take a
    while) printed a traceback, click's "Aborted!" or "interrupted: ... stopped", though the merge
    was whole, the cache verified and the report out; run and train end at once with status 0
    (test_a_signal_after_the_done_line_ends_the_process_quietly). The slow exit handler stands for theirs."""
    import signal
    import time

    from teacher_cache.run import RunConfig, run

    a, b = tmp_path / "a", tmp_path / "b"
    for cache, shard_size in ((a, 4), (b, 3)):  # two runs' caches: merged without a warning
        run(RunConfig("tiny-mixtral", (str(chats_file),), str(cache), backend="hf", top_k=8, shard_size=shard_size,
                      progress=False))  # fmt: skip
    for cli, args, last in (
        ("teacher_cache", ["merge", str(a), str(b), "--out", str(tmp_path / "m"), "--no-progress"], "merged 2 caches"),
        ("teacher_cache", ["verify", str(a), "--no-progress"], "ok: "),
        (
            "student_train",
            ["eval", "--model", "tiny-mistral", "--cache", str(a), "--max-samples", "2", "--no-progress"],
            "}",
        ),
    ):
        script = (
            f"import atexit, sys, time\natexit.register(time.sleep, 30)\nfrom {cli}.cli import main\n"
            f"sys.argv[1:] = {args!r}\nmain()\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            while (line := proc.stdout.readline()) and not line.startswith(last):
                pass
            assert line.startswith(last), proc.stderr.read()
            time.sleep(0.5)  # into the exit handler
            t = time.time()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=20)
            err = proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
        assert rc == 0 and time.time() - t < 10, (args[0], rc, err)
        assert err == "", err


def test_a_merge_stopped_after_its_manifest_says_the_cache_was_written(tmp_path, chats_file, monkeypatch, capsys):
    """A Ctrl-C in the merge's final check (after manifest.json, written last) said "the merge is
    unfinished: delete it and merge again" of a whole cache."""
    import shutil

    import teacher_cache.cli as cli
    import teacher_cache.merge as merge
    from teacher_cache.run import RunConfig, run
    from teacher_cache.storage import Location

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    run(RunConfig("tiny-mixtral", (str(chats_file),), str(a), backend="hf", top_k=8, shard_size=4, progress=False))
    shutil.copytree(a, b)
    opened = merge.open_cache

    def final_check_stopped(where):
        if isinstance(where, Location):  # the merged cache (the sources are opened by their paths)
            raise KeyboardInterrupt
        return opened(where)

    monkeypatch.setattr(merge, "open_cache", final_check_stopped)
    monkeypatch.setattr(cli, "interruptible", lambda: None)  # the test process keeps its handlers
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # and its excepthook (main sets one for a Ctrl-C)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["merge", str(a), str(b), "--out", str(out), "--no-progress"], prog_name="teacher-cache")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the merged cache was written, its final check was not: `teacher-cache verify {out}` checks it"
    )
    assert sh([*TC, "verify", str(out)]).returncode == 0


SIGINT_WHILE_LOADING = """
import os, signal, sys, time
sys.modules.pop("slow_cli", None)
os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the CLI's modules load
time.sleep(30)
"""

SIGINT_IN_A_COMMAND = """
import os, signal, time
import click
from teacher_cache.cli import OneLineGroup

@click.group(cls=OneLineGroup)
def main():
    pass

@main.command()
def build():
    os.kill(os.getpid(), signal.SIGINT)  # before the command has a handler of its own
    time.sleep(30)

main(["build"], prog_name="teacher-cache")
"""


def test_a_ctrl_c_before_a_command_handles_it_is_one_line_and_ends_by_sigint(tmp_path):
    """A Ctrl-C in a command's first second printed a traceback from inside an import, or click's
    "Aborted!" with status 1: now the console scripts' entry (teacher_cache.launch) and the command
    group say one line and end by SIGINT, as a later Ctrl-C does."""
    import signal

    (tmp_path / "slow_cli.py").write_text(SIGINT_WHILE_LOADING)
    loading = [sys.executable, "-c", "from teacher_cache.launch import start; start('slow_cli')"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for args, line in (
        (loading, "interrupted: stopped while starting; nothing was done"),
        ([sys.executable, "-c", SIGINT_IN_A_COMMAND], "interrupted: teacher-cache build stopped"),
    ):
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == -signal.SIGINT and done.stderr.strip() == line, (done.returncode, done.stderr)


def test_an_out_in_memory_is_refused_as_it_would_end_with_the_command(tmp_path, chats_file):
    """run/merge --out memory://... said "done" and the cache was gone with the process."""
    run = [
        *TC,
        "run",
        "--teacher",
        "tiny-mixtral",
        "--backend",
        "hf",
        "--data",
        str(chats_file),
        "--out",
        "memory://x/c",
    ]
    chained = [*run[:-1], "simplecache::memory://x/c"]  # fsspec's chained URL: memory:// all the same
    for args in (run, chained, [*TC, "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", "memory://x/m"]):
        done = sh(args)
        assert done.returncode == 2 and "memory:// ends with this process" in one_line_error(done)
