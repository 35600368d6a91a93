"""Both CLIs as a user types them: help, version, and one-line errors with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

TC = [sys.executable, "-m", "teacher_cache.cli"]
ST = [sys.executable, "-m", "student_train.cli"]


def sh(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "cli,commands",
    [(TC, ["run", "inspect", "verify", "merge", "presets", "build"]), (ST, ["check", "train", "eval", "plot"])],
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
    assert done.returncode == 0 and done.stdout.startswith(f"{name}, version 0.1.0")


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
    assert one_line_error(done) == "Error: --worker-index must be in [0, --num-workers)"
    done = sh([*TC, "run", "--data", str(chats_file)])
    assert done.returncode == 2 and "--teacher" in done.stderr


def test_inspect_and_verify_refuse_a_non_cache(tmp_path):
    assert "not a teacher cache" in one_line_error(sh([*TC, "inspect", str(tmp_path)]))
    assert "not a teacher cache" in one_line_error(sh([*TC, "verify", str(tmp_path)]))


def test_presets_command_lists_the_registry():
    done = sh([*TC, "presets"])
    assert done.returncode == 0
    for name in ("mixtral", "mistral-7b", "tiny-mixtral", "tiny-mistral", "smollm2-135m", "smollm2-135m-half"):
        assert name in done.stdout
