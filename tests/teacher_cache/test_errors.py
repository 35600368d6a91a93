"""teacher_cache/errors.py: exceptions as one-line messages."""

from __future__ import annotations

import pytest

from teacher_cache.errors import one_line, os_reason, plural


def test_a_multi_line_message_becomes_one_line():
    e = ValueError("line one\n  line two\r\n\tline three  ")
    assert one_line(e) == "line one line two line three"


@pytest.mark.parametrize("e", [RuntimeError(), RuntimeError(""), RuntimeError(" \n ")])
def test_an_empty_message_falls_back_to_the_class_name(e):
    assert one_line(e) == "RuntimeError"
    assert one_line(e, 3) == "RuntimeError"  # the name is never cut


def test_limit_cuts_the_joined_message_at_a_word_and_says_so():
    """A cut mid-word ("... was transferred incorrectly, o)") read as a typo."""
    e = OSError("abc\ndef " + "x" * 500)
    assert one_line(e) == "abc def " + "x" * 500
    assert one_line(e, 300) == ("abc def " + "x" * 500)[:297] + "..."  # one long word: cut inside it
    assert one_line(ValueError("short"), 300) == "short" and one_line(ValueError("12345"), 5) == "12345"
    words = ValueError("the file was transferred incorrectly, or it was truncated")
    assert one_line(words, 40) == "the file was transferred incorrectly,..."
    assert len(one_line(words, 40)) <= 40


def test_key_errors_keep_their_repr_quotes():
    assert one_line(KeyError("missing")) == "'missing'"  # what str(e) gives: the CLIs always printed that


def test_counts_in_messages_agree_with_their_nouns():
    assert [plural(n, "sample") for n in (0, 1, 2)] == ["0 samples", "1 sample", "2 samples"]
    assert plural(1, "repeated record") == "1 repeated record" and plural(3, "index", "indices") == "3 indices"


def test_an_os_error_about_a_file_reads_path_then_reason():
    """Not "[Errno 30] Read-only file system: 'ro/c.png'"."""
    assert one_line(OSError(30, "Read-only file system", "ro/c.png")) == "ro/c.png: read-only file system"
    moved = FileNotFoundError(2, "No such file or directory", "a", None, "b")  # os.rename's, say
    assert one_line(moved) == "a -> b: no such file or directory"
    assert one_line(OSError("no errno")) == "no errno" and one_line(OSError(5, "I/O error")) == "[Errno 5] I/O error"
    assert os_reason(OSError(28, "No space left on device")) == "no space left on device"
