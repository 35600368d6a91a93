"""merge's row digests: equal exactly when two rows hold the same content, or input (sample id aside)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from teacher_cache.merge import row_digests
from teacher_cache.shards import SCHEMA

BASE = {
    "sample_id": "s",
    "source": "tiny-mixtral",
    "domain": "geo",
    "input_ids": [1, 2, 3, 4],
    "target_positions": [1, 2],
    "targets": b"\x00blob",
    "attention": [b"l0", b"l1"],
}

# each changes one column of BASE, including the cases a careless encoding confuses
VARIANTS = {
    "source": {"source": "tiny-mixtrak"},
    "domain null": {"domain": None},
    "domain empty": {"domain": ""},
    "input id": {"input_ids": [1, 2, 3, 5]},
    "input ids shorter": {"input_ids": [1, 2, 3]},
    "input id 2^16": {"input_ids": [1, 2, 3, 4 + 65536]},
    "ids moved between lists": {"input_ids": [1, 2, 3, 4, 1], "target_positions": [2]},
    "positions": {"target_positions": [1, 3]},
    "targets": {"targets": b"\x00blob\x00"},
    "attention null": {"attention": None},
    "attention empty": {"attention": []},
    "attention split differently": {"attention": [b"l", b"0l1"]},
    "attention layer": {"attention": [b"l0", b"l2"]},
    "source/domain boundary": {"source": "tiny-mixtralg", "domain": "eo"},
}


def table(rows: list[dict], chunks: int = 1) -> pa.Table:
    step = -(-len(rows) // chunks)
    batches = [pa.RecordBatch.from_pylist(rows[i : i + step], schema=SCHEMA) for i in range(0, len(rows), step)]
    return pa.Table.from_batches(batches, schema=SCHEMA)


OUTPUTS = {"targets", "attention null", "attention empty", "attention split differently", "attention layer"}


@pytest.mark.parametrize("name,change", VARIANTS.items(), ids=VARIANTS.keys())
def test_a_row_differing_in_one_column_has_another_digest(name, change):
    """(input digest, row digest): the row digest changes with any column, the input digest
    with the input columns only (a repeat whose teacher outputs differ still merges)."""
    base, other, again = row_digests(table([BASE, {**BASE, **change}, dict(BASE, sample_id="t")]))
    assert base[1] != other[1]
    assert (base[0] == other[0]) == (name in OUTPUTS)
    assert base == again  # the sample id is not content


def test_digests_do_not_depend_on_chunking_or_slicing():
    rows = [{**BASE, **change, "sample_id": str(i)} for i, change in enumerate(VARIANTS.values())]
    whole = row_digests(table(rows))
    assert len(set(whole)) == len(rows)
    assert row_digests(table(rows, chunks=3)) == whole
    assert row_digests(table(rows).slice(4, 5)) == whole[4:9]
