"""Per-sample codec for teacher targets: numpy arrays in, one self-describing bytes blob out.

Two block kinds, byte format in docs/CODEC.md:
- top-k: ids int [P, k], log-probs float32 [P, k] (descending per row), tail log-mass float32 [P].
  Also used for attention summaries (vocab_size = T, ids = key positions).
- sampled: ragged per-position token counts (Sparse Logit Sampling), exact.

Log-probs are quantised on a grid of step = 2 * max_error nats (default 0.04: error <= 0.02,
chosen per blob in 0.01-nat units) within at least 10.24 nats of the row's top-1 and on a grid 8x
coarser below that; ids and counts are exact. Every decode failure
raises CodecError; declared sizes are checked against limits and the buffer before any
allocation or decompression. Imports only numpy, zstandard and the standard library.
"""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import zstandard

CODEC_VERSION = 3  # what the encoder writes; 2 added id mode 3 (sampled), 3 the top-k step byte
READ_VERSIONS = (1, 2, 3)  # what the decoder accepts
MAGIC = b"TCDC"
KIND_TOPK = 1
KIND_SAMPLED = 2

STEP_UNITS = 4  # default log-prob step in the header's 0.01-nat units; every v1/v2 blob's step
STEP = STEP_UNITS / 100  # 0.04 nats per fine code unit
MAX_ERROR = STEP / 2  # 0.02: default bound on |stored - exact| log-prob, nats (fine region)
FINE_REGION_UNITS = 1024  # the fine grid covers >= 1024 step units = 10.24 nats below the top-1
COARSE_FACTOR = 8  # past that, one code unit = 8 fine units (0.32 nats at the default step)
LOGPROB_FLOOR = -10000.0  # finite log-probs below this are clamped to it on encode
LOGPROB_SLACK = 0.02  # inputs up to this far above 0 (rounding noise) are read as 0
ZSTD_LEVEL = 15  # encoder default; the decoder accepts any level
PROBE_LEVEL = 3  # encoder: zstd level used to choose the id mode
FRAME_MIN_BYTES = 2048  # encoder: byte planes this large get their own zstd frame

ID_PLAIN, ID_DICT, ID_DICT_BY_COUNT, ID_DICT_ROW_GAPS = 0, 1, 2, 3  # id modes, see _encode_ids

# magic, version, kind, id_mode, n_frames | P, k, vocab_size, U | 8 widths | raw_len, comp_len
_TOPK_HEADER = struct.Struct("<4sBBBBIIII8BII")
# magic, version, kind, id_mode, n_frames | P, N, vocab_size, U, num_draws | 8 widths | raw, comp
_SAMPLED_HEADER = struct.Struct("<4sBBBBIIIII8BII")
_CRC = struct.Struct("<I")
_U32_MAX = (1 << 32) - 1


class CodecError(ValueError):
    """A blob that cannot be decoded: truncated, corrupted, wrong kind/version or out of limits."""


# ----------------------------------------------------------------------------- byte planes


def _width(max_value: int) -> int:
    """Bytes needed to store unsigned ints <= max_value (0 when max_value == 0)."""
    return (int(max_value).bit_length() + 7) // 8


def _to_planes(x: np.ndarray) -> tuple[int, list[bytes]]:
    """Non-negative ints [n] -> (nb, nb little-endian byte planes of n bytes each)."""
    nb = _width(int(x.max())) if x.size else 0
    le = np.ascontiguousarray(x, dtype="<u8").view(np.uint8).reshape(-1, 8)  # [n, 8]
    return nb, [le[:, p].tobytes() for p in range(nb)]


def _from_planes(buf: np.ndarray, n: int, nb: int) -> np.ndarray:
    """Plane-major bytes uint8 [nb * n] -> int64 [n]."""
    if nb == 0:
        return np.zeros(n, np.int64)
    if nb == 1:
        return buf.astype(np.int64)
    if nb == 2:
        return buf[:n].astype(np.int64) | (buf[n:].astype(np.int64) << 8)
    le = np.zeros((n, 8), np.uint8)
    le[:, :nb] = buf.reshape(nb, n).T
    return le.view("<i8").reshape(n)


# ----------------------------------------------------------------------------- zstd

_local = threading.local()  # per-thread zstd contexts (not thread-safe to share, costly to build)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def _compress(chunks: list[bytes], level: int) -> list[bytes]:
    """Chunks (byte planes) -> zstd frames whose outputs concatenate to b"".join(chunks).

    A chunk of >= FRAME_MIN_BYTES gets a frame of its own (fresh entropy statistics); runs of
    smaller chunks share one frame with a block boundary after each chunk."""
    groups, run = [], []
    for c in chunks:
        if len(c) >= FRAME_MIN_BYTES:
            if run:
                groups.append(run)
                run = []
            groups.append([c])
        elif c:
            run.append(c)
    if run:
        groups.append(run)
    frames = []
    for g in groups:
        cobj = _compressor(level).compressobj(size=sum(len(c) for c in g))
        out = []
        for c in g:
            out.append(cobj.compress(c))
            out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        out.append(cobj.flush())
        frames.append(b"".join(out))
    if len(frames) > 255:
        raise ValueError(f"{len(frames)} zstd frames, format allows 255")
    return frames


def _decompress(frames: list[memoryview], raw_len: int) -> np.ndarray:
    """zstd frames -> uint8 [raw_len]. Each frame must declare its content size; the declared
    sizes must add up to raw_len, checked before each frame is decompressed."""
    parts, budget = [], raw_len
    for i, frame in enumerate(frames):
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as e:
            raise CodecError(f"bad zstd frame header in frame {i}: {e}") from None
        if declared < 0 or declared > budget:
            raise CodecError(f"zstd frame {i} declares {declared} bytes, only {budget} of raw_len left")
        try:
            out = _decompressor().decompress(frame, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise CodecError(f"corrupt zstd frame {i}: {e}") from None
        if len(out) != declared:
            raise CodecError(f"zstd frame {i} gave {len(out)} bytes, declared {declared}")
        parts.append(out)
        budget -= declared
    if budget:
        raise CodecError(f"zstd frames hold {raw_len - budget} bytes, header says raw_len={raw_len}")
    return np.frombuffer(b"".join(parts), np.uint8)


# ----------------------------------------------------------------------------- ids


def _encode_ids(
    ids: np.ndarray, level: int, row_first: np.ndarray | None = None
) -> tuple[int, int, list[int], list[bytes]]:
    """ids int64 [n] (row-major) -> (mode, U, widths [gap, count, index], streams).

    Tries plain ids and the block-dictionary forms (sorted unique ids, gap-coded, plus one
    index per entry into them, either in id order or in (count desc, id) order; with row_first
    bool [n] (True at each row's first entry; rows strictly ascending, as sampled blocks are),
    also the id-order indexes gap-coded within each row) and keeps the smallest after zstd at
    PROBE_LEVEL."""
    nb, plain = _to_planes(ids)
    candidates = [(ID_PLAIN, 0, [0, 0, nb], plain)]
    if ids.size:
        uniq, inv, cnt = np.unique(ids, return_inverse=True, return_counts=True)  # [U]
        inv = inv.reshape(-1)  # [n]
        gaps = np.diff(uniq, prepend=0)  # [U], gaps[0] = uniq[0], rest >= 1
        nb_gap, gap_b = _to_planes(gaps)
        nb_idx, idx_b = _to_planes(inv)
        candidates.append((ID_DICT, uniq.size, [nb_gap, 0, nb_idx], gap_b + idx_b))
        if row_first is not None:
            row_gaps = np.where(row_first, inv, np.diff(inv, prepend=0) - 1)  # [n] >= 0
            nb_rg, rg_b = _to_planes(row_gaps)
            candidates.append((ID_DICT_ROW_GAPS, uniq.size, [nb_gap, 0, nb_rg], gap_b + rg_b))
        order = np.argsort(-cnt, kind="stable")  # [U] dict slot -> freq rank
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        nb_cnt, cnt_b = _to_planes(cnt - 1)
        nb_r, r_b = _to_planes(rank[inv])
        candidates.append((ID_DICT_BY_COUNT, uniq.size, [nb_gap, nb_cnt, nb_r], gap_b + cnt_b + r_b))
    if len(candidates) == 1:
        return candidates[0]
    probe = min(level, PROBE_LEVEL)  # pick the mode with a fast level, compress once at `level`
    sizes = [sum(map(len, _compress(c[3], probe))) for c in candidates]
    return candidates[int(np.argmin(sizes))]


def _decode_ids(
    mode: int, n: int, n_uniq: int, vocab_size: int, widths: list[int], take, rows: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of _encode_ids; take(count, nb) pops the next stream; rows = entries per row
    int64 [R] (sampled blocks; None for top-k, where mode 3 is refused). -> int64 [n] in range."""
    nb_gap, nb_cnt, nb_idx = widths
    if mode == ID_PLAIN:
        if n_uniq != 0 or nb_gap or nb_cnt:
            raise CodecError("plain id mode with dictionary fields set")
        ids = take(n, nb_idx)
        if n and int(ids.max()) >= vocab_size:
            raise CodecError(f"decoded id {int(ids.max())} outside vocab_size {vocab_size}")
        return ids
    if mode not in (ID_DICT, ID_DICT_BY_COUNT, ID_DICT_ROW_GAPS) or (mode == ID_DICT_ROW_GAPS and rows is None):
        raise CodecError(f"unknown id mode {mode}")
    if mode != ID_DICT_BY_COUNT and nb_cnt:
        raise CodecError("dictionary id mode with count width set")
    if n and not n_uniq:
        raise CodecError("empty id dictionary for a non-empty block")
    gaps = take(n_uniq, nb_gap)  # [U]
    if n_uniq > 1 and int(gaps[1:].min()) < 1:
        raise CodecError("id dictionary is not strictly increasing")
    uniq = np.cumsum(gaps)  # [U] sorted unique ids
    if n_uniq and int(uniq[-1]) >= vocab_size:
        raise CodecError(f"id dictionary entry {int(uniq[-1])} outside vocab_size {vocab_size}")
    if mode == ID_DICT_BY_COUNT:
        cnt = take(n_uniq, nb_cnt)  # [U] count - 1, only its order matters
        uniq = uniq[np.argsort(-cnt, kind="stable")]  # [U] in (count desc, id) order
    idx = take(n, nb_idx)  # [n]
    if mode == ID_DICT_ROW_GAPS and n:  # undo the gaps within each row: a cumsum restarted per row
        starts = np.cumsum(rows) - rows  # [R] first entry of each row (rows >= 1, sum n)
        step = idx + 1  # [n] a later entry = previous + gap + 1
        step[starts] = idx[starts]  # a row's first entry is the index itself
        run = np.cumsum(step)  # [n]
        idx = run - np.repeat(run[starts] - step[starts], rows)
    if n and int(idx.max()) >= n_uniq:
        raise CodecError(f"id index {int(idx.max())} outside dictionary of {n_uniq}")
    return uniq[idx]


class _Reader:
    """Pops consecutive plane-coded streams off the decompressed payload."""

    def __init__(self, raw: np.ndarray):
        self.raw, self.pos = raw, 0

    def take(self, n: int, nb: int) -> np.ndarray:
        end = self.pos + n * nb
        out = _from_planes(self.raw[self.pos : end], n, nb)
        self.pos = end
        return out


# ----------------------------------------------------------------------------- header helpers


def _check_vocab(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= _U32_MAX:
        raise ValueError(f"vocab_size must be in [1, 2**32), got {vocab_size}")
    return int(vocab_size)


def _as_ids(ids: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array, got {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what} must lie in [0, vocab_size={vocab_size})")
    return ids.astype(np.int64)


def _finish(header: bytes, frames: list[bytes]) -> bytes:
    table = struct.pack(f"<{len(frames)}I", *(len(f) for f in frames))
    body = b"".join([header, table, *frames])
    return body + _CRC.pack(zlib.crc32(body))


def _open(blob: bytes, header: struct.Struct, kind: int) -> tuple[tuple, list[memoryview]]:
    """Checks length, magic, version, kind, frame table and checksum.
    Returns (header fields, zstd frames)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"blob must be bytes, got {type(blob).__name__}")
    mv = memoryview(blob).cast("B")
    n = len(mv)
    if n < header.size + _CRC.size:
        raise CodecError(f"blob truncated: {n} bytes, header alone needs {header.size + 4}")
    fields = header.unpack_from(mv)
    magic, version, got_kind, n_frames = fields[0], fields[1], fields[2], fields[4]
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in READ_VERSIONS:
        raise CodecError(f"unsupported codec version {version}, this reader knows {READ_VERSIONS}")
    if got_kind != kind:
        names = {KIND_TOPK: "top-k", KIND_SAMPLED: "sampled"}
        raise CodecError(f"blob kind {got_kind} ({names.get(got_kind, 'unknown')}), expected {names[kind]}")
    raw_len, comp_len = fields[-2], fields[-1]
    start = header.size + 4 * n_frames
    if n != start + comp_len + _CRC.size:
        raise CodecError(
            f"blob is {n} bytes but header declares {n_frames} frames and comp_len={comp_len} "
            f"(expected {start + comp_len + _CRC.size} bytes)"
        )
    (crc,) = _CRC.unpack_from(mv, n - _CRC.size)
    if zlib.crc32(mv[: n - _CRC.size]) != crc:
        raise CodecError("checksum mismatch: blob corrupted")
    lengths = struct.unpack_from(f"<{n_frames}I", mv, header.size)
    if sum(lengths) != comp_len or (n_frames and min(lengths) == 0):
        raise CodecError(f"frame lengths {lengths} do not add up to comp_len={comp_len}")
    if (raw_len == 0) != (n_frames == 0):
        raise CodecError(f"{n_frames} frames for raw_len={raw_len}")
    frames, pos = [], start
    for ln in lengths:
        frames.append(mv[pos : pos + ln])
        pos += ln
    return fields, frames


# ----------------------------------------------------------------------------- top-k


def step_units(max_error: float) -> int:
    """A log-prob error bound in nats -> the quantisation step in 0.01-nat units (step = 2 * bound).
    The bound must be a multiple of 0.005 in [0.005, 1.275]; raises ValueError otherwise."""
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float, np.floating)):
        raise ValueError(f"max_error must be a number, got {type(max_error).__name__}")
    v = float(max_error) if abs(max_error) < 2 else 2.0  # huge ints, inf and NaN: out of range
    units = round(200 * v)
    if not 1 <= units <= 255 or abs(units / 200 - v) > 1e-9:
        raise ValueError(f"log-prob error bound must be a multiple of 0.005 in [0.005, 1.275] nats, got {max_error}")
    return units


class _Grid:
    """The log-prob grid of one blob, from its step in 0.01-nat units (header byte 31, 1..255)."""

    def __init__(self, units: int):
        self.step = units / 100  # nats per fine code unit (float64; units * 0.01 can differ in the last bit)
        self.fine_codes = -(-FINE_REGION_UNITS // units)  # fine codes 0..fine_codes below the top-1
        self.code_limit = (1 << 20) // units  # absolute codes above this are corrupt (floor + 4)


def _quantise_rows(logprobs: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float [P, k] descending -> (top1 code int64 [P], relative codes int64 [P, k], n_finite [P]).

    top1 code a = rint(-lp0 / step); relative r = -lp / step - a; code c = rint(r) if
    rint(r) <= fine_codes else fine_codes + rint((r - fine_codes) / COARSE_FACTOR).
    -inf entries (at the row end) get the previous code, so their delta is 0."""
    finite = np.isfinite(logprobs)  # [P, k]
    n_finite = finite.sum(axis=1)  # [P]
    x = -np.clip(logprobs.astype(np.float64), LOGPROB_FLOOR, 0.0) / grid.step  # [P, k], +inf for -inf
    x = np.where(finite, x, 0.0)
    a = np.where(n_finite > 0, np.rint(x[:, 0]), 0.0)  # [P]
    r = x - a[:, None]  # [P, k]
    fine = np.rint(r)
    coarse = grid.fine_codes + np.rint((r - grid.fine_codes) / COARSE_FACTOR)
    c = np.maximum(np.where(fine <= grid.fine_codes, fine, coarse), 0.0)  # [P, k]
    c = np.where(finite, c, 0.0)
    c = np.maximum.accumulate(c, axis=1)  # -inf entries repeat the last finite code
    return a.astype(np.int64), c.astype(np.int64), n_finite


def _tail_codes(tail_logprob: np.ndarray, grid: _Grid) -> np.ndarray:
    """float [P] -> int64 [P]: 0 for -inf, else 1 + rint(-tail / step) (tail clamped to the floor)."""
    t = -np.clip(tail_logprob.astype(np.float64), LOGPROB_FLOOR, 0.0) / grid.step  # [P]
    return np.where(np.isneginf(tail_logprob), 0, np.rint(t) + 1).astype(np.int64)


def _rank_groups(k: int) -> list[tuple[int, int]]:
    """Delta columns 1..k-1 split at powers of two: [1,2), [2,4), [4,8), ... (encoder only)."""
    out, lo = [], 1
    while lo < k:
        hi = min(2 * lo, k)
        out.append((lo, hi))
        lo = hi
    return out


def encode_topk(
    ids: np.ndarray,
    logprobs: np.ndarray,
    tail_logprob: np.ndarray,
    *,
    vocab_size: int,
    max_error: float = MAX_ERROR,
    level: int = ZSTD_LEVEL,
) -> bytes:
    """Encode one sample's top-k targets.

    ids int [P, k] distinct per row in [0, vocab_size); logprobs float [P, k] natural-log,
    non-increasing per row, <= 0.02, -inf allowed (always last); tail_logprob float [P]
    = log of the mass outside the top-k, -inf allowed. max_error: the log-prob bound in nats
    (topk_error_bound). Raises ValueError on bad input."""
    vocab_size = _check_vocab(vocab_size)
    units = step_units(max_error)
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs)
    tail_logprob = np.asarray(tail_logprob)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [P, k], got shape {ids.shape}")
    P, k = ids.shape
    if logprobs.shape != (P, k):
        raise ValueError(f"logprobs shape {logprobs.shape} != ids shape {ids.shape}")
    if tail_logprob.shape != (P,):
        raise ValueError(f"tail_logprob shape {tail_logprob.shape} != ({P},)")
    if k < 1:
        raise ValueError("k must be >= 1")
    if k > vocab_size:
        raise ValueError(f"k={k} exceeds vocab_size={vocab_size}: ids per row cannot be distinct")
    if P > _U32_MAX:
        raise ValueError(f"P={P} too large")
    ids = _as_ids(ids, vocab_size, "ids")  # int64 [P, k]
    if k > 1 and P and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
        raise ValueError("ids must be distinct within each position")
    for name, v in (("logprobs", logprobs), ("tail_logprob", tail_logprob)):
        if not np.issubdtype(v.dtype, np.floating):
            raise ValueError(f"{name} must be a float array, got {v.dtype}")
        if np.isnan(v).any() or (v > LOGPROB_SLACK).any():
            raise ValueError(f"{name} must be log-probabilities: no NaN, nothing above 0")
    if k > 1 and P and (logprobs[:, 1:] > logprobs[:, :-1]).any():
        raise ValueError("logprobs must be sorted descending within each position")

    mode, n_uniq, widths, streams = _topk_streams(ids, logprobs, tail_logprob, level, units)
    chunks = [ch for stream in streams.values() for ch in stream]
    raw_len = sum(len(ch) for ch in chunks)
    frames = _compress(chunks, level)
    header = _TOPK_HEADER.pack(
        MAGIC, CODEC_VERSION, KIND_TOPK, mode, len(frames), P, k, vocab_size, n_uniq, *widths,
        raw_len, sum(map(len, frames)),
    )  # fmt: skip
    return _finish(header, frames)


def _topk_streams(
    ids: np.ndarray, logprobs: np.ndarray, tail_logprob: np.ndarray, level: int, units: int = STEP_UNITS
) -> tuple[int, int, tuple[int, ...], dict[str, list[bytes]]]:
    """Checked top-k inputs ids int64 [P, k], logprobs [P, k], tail [P] -> (id mode, U, the
    header's 8 width bytes (the last is the step in 0.01-nat units), the payload's streams in
    format order: name -> byte chunks, each chunk followed by a zstd block boundary).
    Benchmarks size the streams one by one."""
    P, k = ids.shape
    grid = _Grid(units)
    a, c, n_finite = _quantise_rows(logprobs, grid)  # [P], [P, k], [P]
    deltas = np.diff(c, axis=1)  # [P, k-1] >= 0
    nb_a, a_b = _to_planes(a)
    nb_m, m_b = _to_planes(k - n_finite)
    nb_t, t_b = _to_planes(_tail_codes(tail_logprob, grid))
    nb_d, d_b = _to_planes(deltas.T.reshape(-1))  # rank-major [k-1, P]
    # extra block boundaries between rank groups inside every plane of the deltas stream
    d_chunks = [plane[(lo - 1) * P : (hi - 1) * P] for plane in d_b for lo, hi in _rank_groups(k)]
    mode, n_uniq, (nb_gap, nb_cnt, nb_idx), id_chunks = _encode_ids(ids.reshape(-1), level)
    n_dict = len(id_chunks) - nb_idx  # gap (+ count) planes first, then the index planes
    streams = {
        "top1": a_b,
        "missing": m_b,
        "tail": t_b,
        "deltas": d_chunks,
        "id_dictionary": id_chunks[:n_dict],
        "id_indexes": id_chunks[n_dict:],
    }
    return mode, n_uniq, (nb_a, nb_m, nb_t, nb_d, nb_gap, nb_cnt, nb_idx, units), streams


def decode_topk(
    blob: bytes,
    *,
    vocab_size: int,
    max_positions: int = 1 << 20,
    max_k: int = 4096,
    max_entries: int = 1 << 24,
    max_error: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a top-k blob -> (ids int64 [P, k], logprobs float32 [P, k] descending,
    tail_logprob float32 [P]). Raises CodecError on any malformed or out-of-limit blob, and
    with `max_error` on a blob encoded with another error bound."""
    vocab_size = _check_vocab(vocab_size)  # the caller's argument: a ValueError, not the blob's fault
    fields, frames = _open(blob, _TOPK_HEADER, KIND_TOPK)
    mode, P, k, V, n_uniq = fields[3], fields[5], fields[6], fields[7], fields[8]
    nb_a, nb_m, nb_t, nb_d, nb_gap, nb_cnt, nb_idx, units = fields[9:17]
    raw_len = fields[17]
    if vocab_size != V:
        raise CodecError(f"blob vocab_size {V} != expected {vocab_size}")
    if max_positions < P:
        raise CodecError(f"P={P} exceeds max_positions={max_positions}")
    if not 1 <= k <= max_k:
        raise CodecError(f"k={k} outside [1, max_k={max_k}]")
    if k > V:
        raise CodecError(f"k={k} exceeds vocab_size={V}")
    if P * k > max_entries:
        raise CodecError(f"P*k={P * k} exceeds max_entries={max_entries}")
    if n_uniq > min(P * k, V):
        raise CodecError(f"dictionary size U={n_uniq} exceeds min(P*k, vocab_size)")
    if max(nb_a, nb_m, nb_t, nb_d, nb_gap, nb_cnt, nb_idx) > 4:
        raise CodecError("stream byte width outside [0, 4]")
    if fields[1] < 3:  # before version 3 the step byte was padding: 0, the 0.04-nat step
        if units:
            raise CodecError(f"step byte {units} in a version {fields[1]} blob (must be 0)")
        units = STEP_UNITS
    elif units == 0:
        raise CodecError("log-prob step of 0 units")
    if max_error is not None and units != step_units(max_error):
        raise CodecError(f"encoded with a log-prob error bound of {units / 200:g} nats, expected {max_error:g}")
    grid = _Grid(units)
    n = P * k
    expect = P * (nb_a + nb_m + nb_t) + P * (k - 1) * nb_d + n_uniq * (nb_gap + nb_cnt) + n * nb_idx
    if raw_len != expect:
        raise CodecError(f"header raw_len={raw_len} inconsistent with sizes (expected {expect})")
    rd = _Reader(_decompress(frames, raw_len))

    a = rd.take(P, nb_a)  # [P] top-1 code
    missing = rd.take(P, nb_m)  # [P] number of -inf entries
    tail_code = rd.take(P, nb_t)  # [P]
    deltas = rd.take(P * (k - 1), nb_d).reshape(k - 1, P)  # rank-major
    ids = _decode_ids(mode, n, n_uniq, V, [nb_gap, nb_cnt, nb_idx], rd.take).reshape(P, k)
    if P and int(missing.max()) > k:
        raise CodecError(f"row claims {int(missing.max())} -inf entries but k={k}")

    c = np.zeros((P, k), np.int64)  # [P, k] relative codes
    np.cumsum(deltas, axis=0, out=c[:, 1:].T)
    c += (COARSE_FACTOR - 1) * np.maximum(c - grid.fine_codes, 0)  # coarse codes -> fine units
    c += a[:, None]
    if P and int(c[:, -1].max()) > grid.code_limit:
        raise CodecError(f"log-prob code {int(c[:, -1].max())} beyond limit {grid.code_limit}")
    logprobs = (c * -grid.step).astype(np.float32)  # [P, k]
    if P and missing.any():
        logprobs[np.arange(k)[None, :] >= (k - missing)[:, None]] = -np.inf
    if P and int(tail_code.max()) > grid.code_limit + 1:
        raise CodecError(f"tail code {int(tail_code.max())} beyond limit {grid.code_limit}")
    tail = ((tail_code - 1) * -grid.step).astype(np.float32)  # [P]
    tail[tail_code == 0] = -np.inf
    return ids, logprobs, tail


def topk_error_bound(max_error: float = MAX_ERROR) -> dict:
    """Documented worst-case errors of decode_topk(encode_topk(..., max_error=...)) vs the
    float32 input."""
    grid = _Grid(step_units(max_error))
    return {
        "step_nats": grid.step,
        "logprob_abs_err_within_10_nats": grid.step / 2,  # entries with lp >= top1 - 10
        "fine_region_nats": grid.fine_codes * grid.step,  # the bound actually holds to here
        "logprob_abs_err_below_fine_region": COARSE_FACTOR * grid.step / 2,
        "top1_logprob_abs_err": grid.step / 2,
        "tail_logprob_abs_err": grid.step / 2,
        "logprob_floor": LOGPROB_FLOOR,  # finite values below are clamped here first
        "mass_rel_err": float(np.expm1(grid.step / 2)),  # per entry and for the total, incl. tail
        "float32_output_rel_err": 2.0**-24,  # added rounding of the float32 result
        "ids": "exact",
        "neg_inf": "exact (-inf in, -inf out)",
    }


# ----------------------------------------------------------------------------- sampled


def encode_sampled(
    offsets: np.ndarray,
    ids: np.ndarray,
    counts: np.ndarray,
    *,
    vocab_size: int,
    num_draws: int,
    level: int = ZSTD_LEVEL,
) -> bytes:
    """Encode one sample's sampled targets (exact).

    offsets int [P+1] (offsets[0] = 0, nondecreasing, offsets[-1] = N); ids int [N] distinct
    within each position; counts int [N] >= 1 summing to num_draws at every position.
    Order within a position is not kept: decode returns ids ascending."""
    vocab_size = _check_vocab(vocab_size)
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)):
        raise ValueError("num_draws must be an int")
    if not 1 <= num_draws < 1 << 31:
        raise ValueError(f"num_draws must be in [1, 2**31), got {num_draws}")
    offsets, ids, counts = np.asarray(offsets), np.asarray(ids), np.asarray(counts)
    if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be int [P+1], got {offsets.dtype} {offsets.shape}")
    if ids.ndim != 1 or counts.shape != ids.shape or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"ids and counts must be int [N], got {ids.shape} and {counts.shape}")
    P, N = offsets.size - 1, ids.size
    offsets = offsets.astype(np.int64)
    lengths = np.diff(offsets)  # [P]
    if offsets[0] != 0 or offsets[-1] != N or (lengths < 0).any():
        raise ValueError("offsets must start at 0, be nondecreasing and end at len(ids)")
    if P and int(lengths.min()) < 1:
        raise ValueError("every position needs at least one sampled id (counts sum to num_draws)")
    if P > _U32_MAX or N > _U32_MAX:
        raise ValueError("too many positions or entries")
    ids = _as_ids(ids, vocab_size, "ids")  # int64 [N]
    counts = counts.astype(np.int64)
    if N and int(counts.min()) < 1:
        raise ValueError("counts must be >= 1")
    if P and (np.add.reduceat(counts, offsets[:-1]) != num_draws).any():
        raise ValueError(f"counts must sum to num_draws={num_draws} at every position")
    row = np.repeat(np.arange(P), lengths)  # [N]
    order = np.lexsort((ids, row))  # [N] canonical: per position, id ascending
    ids, counts = ids[order], counts[order]
    if ((np.diff(ids) <= 0) & (np.diff(row) == 0)).any():
        raise ValueError("ids must be distinct within each position")
    rest = np.ones(N, bool)
    rest[offsets[:-1]] = False  # each position's first count is implied by num_draws
    nb_len, len_b = _to_planes(lengths - 1)
    nb_cnt, cnt_b = _to_planes(counts[rest] - 1)
    mode, n_uniq, (nb_gap, nb_dc, nb_idx), id_chunks = _encode_ids(ids, level, row_first=~rest)
    chunks = [*len_b, *cnt_b, *id_chunks]
    raw_len = sum(len(ch) for ch in chunks)
    frames = _compress(chunks, level)
    widths = (nb_len, nb_cnt, nb_gap, nb_dc, nb_idx, 0, 0, 0)
    header = _SAMPLED_HEADER.pack(
        MAGIC, CODEC_VERSION, KIND_SAMPLED, mode, len(frames), P, N, vocab_size, n_uniq,
        num_draws, *widths, raw_len, sum(map(len, frames)),
    )  # fmt: skip
    return _finish(header, frames)


def decode_sampled(
    blob: bytes,
    *,
    vocab_size: int,
    max_positions: int = 1 << 20,
    max_entries: int = 1 << 24,
    num_draws: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Decode a sampled blob -> (offsets int64 [P+1], ids int64 [N], counts int32 [N],
    num_draws); within a position ids are strictly ascending (checked). With `num_draws`, a blob
    of another number of draws is refused before anything is decompressed."""
    vocab_size = _check_vocab(vocab_size)  # the caller's argument: a ValueError, not the blob's fault
    fields, frames = _open(blob, _SAMPLED_HEADER, KIND_SAMPLED)
    mode, P, N, V, n_uniq, draws = fields[3], *fields[5:10]
    nb_len, nb_cnt, nb_gap, nb_dc, nb_idx, *pad = fields[10:18]
    raw_len = fields[18]
    if vocab_size != V:
        raise CodecError(f"blob vocab_size {V} != expected {vocab_size}")
    if max_positions < P:
        raise CodecError(f"P={P} exceeds max_positions={max_positions}")
    if max_entries < N:
        raise CodecError(f"N={N} exceeds max_entries={max_entries}")
    if num_draws is not None and draws != num_draws:
        raise CodecError(f"num_draws={draws}, expected {num_draws}")
    num_draws = draws
    if not 1 <= num_draws < 1 << 31:
        raise CodecError(f"num_draws={num_draws} outside [1, 2**31)")
    if N < P or P * min(num_draws, V) < N:
        raise CodecError(f"N={N} impossible for P={P}, num_draws={num_draws}, vocab_size={V}")
    if n_uniq > min(N, V):
        raise CodecError(f"dictionary size U={n_uniq} exceeds min(N, vocab_size)")
    if max(nb_len, nb_cnt, nb_gap, nb_dc, nb_idx) > 4 or any(pad):
        raise CodecError("stream byte width outside [0, 4]")
    expect = P * nb_len + (N - P) * nb_cnt + n_uniq * (nb_gap + nb_dc) + N * nb_idx
    if raw_len != expect:
        raise CodecError(f"header raw_len={raw_len} inconsistent with sizes (expected {expect})")
    rd = _Reader(_decompress(frames, raw_len))

    lengths = rd.take(P, nb_len) + 1  # [P]
    offsets = np.zeros(P + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != N:
        raise CodecError(f"row lengths sum to {int(offsets[-1])}, header says N={N}")
    rest = rd.take(N - P, nb_cnt) + 1  # [N-P] counts after each row's first
    if mode == ID_DICT_ROW_GAPS and fields[1] < 2:
        raise CodecError(f"id mode {mode} needs codec version 2, blob says {fields[1]}")
    ids = _decode_ids(mode, N, n_uniq, V, [nb_gap, nb_dc, nb_idx], rd.take, rows=lengths)  # [N]
    counts = np.zeros(N, np.int64)
    first = offsets[:-1]  # [P]
    is_rest = np.ones(N, bool)
    is_rest[first] = False
    counts[is_rest] = rest
    if P:
        counts[first] = num_draws - np.add.reduceat(counts, first)
        if int(counts[first].min()) < 1:
            raise CodecError(f"counts exceed num_draws={num_draws} at some position")
        if (np.diff(ids)[is_rest[1:]] <= 0).any():
            raise CodecError("ids not strictly ascending (distinct) within a position")
    return offsets, ids, counts.astype(np.int32), int(num_draws)
