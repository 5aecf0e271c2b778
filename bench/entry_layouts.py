"""Compare byte layouts of the sparse-logit entries on the content of one existing cache.

    python bench/entry_layouts.py CACHE [--json PATH]

Reads every complete shard's (ids, counts|probs, entries per position) through the public
reader, re-encodes them under each candidate layout, compresses each block of entries the
way the writer does (1 MiB of entries per zstd frame, frame checksum on), and reports
logits bytes per token (entries + per-position counts) and the decode throughput of each
layout (decompress + rebuild ids and values), so that layouts are judged on the same
content. Use a cache of a real teacher: random teachers have no structure to exploit.

Measured (SmolLM2-135M-Instruct, 10 stdlib modules, 27,648 tokens, seq-len 512, 2 shared
cores), logits bytes/token with the per-position counts: rs-kd N=50 (13.2 ids/position):
schema-1 records 27.5; byte planes 26.4; delta ids 26.3; delta ids + byte planes 24.6 at
zstd 3, 23.9 at zstd 12 (schema 2), 23.0 at zstd 17-19. top-k k=50: 182.0; byte planes
146.0; delta ids + byte planes 140.9 at zstd 3, 138.9 at zstd 12. All decode at > 15 M
entries/s. zstd 17 and up compress at ~40K tokens/s on one core, too close to a GPU
teacher's rate for the writer thread; zstd 12 runs at ~200K tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from kdpipe.teacher_cache import open_cache
from kdpipe.teacher_cache.packing import delta_code_ids, delta_decode_ids, entry_layout, pack_entries, unpack_entries

BLOCK_BYTES = 1 << 20


def load(cache_dir: Path) -> dict[str, np.ndarray | str | int]:
    cache = open_cache(cache_dir)
    ids, values, per_position = [], [], []
    for split in cache.splits:
        for info in cache.shards(split):
            if not info.complete:
                continue
            shard = cache.open_shard(split, info.index)
            batch = shard.read(0, shard.num_sequences)
            ids.append(batch.target_ids)
            values.append(batch.target_weights)
            per_position.append(np.diff(batch.target_offsets))
    m = cache.manifest
    value = np.concatenate(values)
    if m.sampler.mode == "rs-kd":
        value = np.rint(value * m.sampler.num_draws).astype(np.int32)
    return {
        "mode": m.sampler.mode, "vocab": m.teacher.vocab_size, "num_draws": m.sampler.num_draws,
        "ids": np.concatenate(ids), "values": value, "num_entries": np.concatenate(per_position).astype(np.int64),
    }  # fmt: skip


def zstd_frames(streams: list[np.ndarray], level: int, per_block: int, joint: bool) -> list[bytes]:
    """Each block of entries one frame (its byte planes concatenated) or one frame per plane."""
    codec = Zstd(level=level, checksum=True)
    frames = []
    for start in range(0, streams[0].shape[0], per_block):
        parts = [s[start : start + per_block].tobytes() for s in streams]
        frames.extend([codec.encode(b"".join(parts))] if joint else [codec.encode(p) for p in parts])
    return frames


def count_bytes(num_entries: np.ndarray) -> int:
    """The per-position counts array as the writer stores it (uint8, one frame per 32x512 rows)."""
    codec = Zstd(level=3, checksum=True)
    data, step = num_entries.astype(np.uint8), 32 * 512
    return sum(len(codec.encode(data[i : i + step].tobytes())) for i in range(0, data.size, step))


def layouts(d: dict) -> dict[str, tuple[list[bytes], Callable[[], object]]]:
    """name -> (compressed frames, decode: frames back to ids and values)."""
    ids, values, ne = d["ids"], d["values"], d["num_entries"]
    layout = entry_layout(d["mode"], d["vocab"], d["num_draws"])
    bpe = layout.bytes_per_entry
    per_block = BLOCK_BYTES // bpe

    def planes_of(records: np.ndarray) -> list[np.ndarray]:
        rows = records.reshape(-1, bpe)
        return [np.ascontiguousarray(rows[:, b]) for b in range(bpe)]

    absolute = pack_entries(ids, values, layout)
    gaps = pack_entries(delta_code_ids(ids, ne, layout.id_bits), values, layout)
    out: dict[str, tuple[list[bytes], Callable[[], object]]] = {}

    def add(name: str, streams: list[np.ndarray], level: int, joint: bool, delta: bool) -> None:
        frames = zstd_frames(streams, level, per_block, joint)
        codec = Zstd(level=level)

        def decode() -> object:
            raw = [np.frombuffer(codec.decode(f), np.uint8) for f in frames]
            if len(streams) > 1:  # planes back to records
                if joint:
                    raw = [r.reshape(bpe, -1).T.reshape(-1) for r in raw]
                else:
                    raw = [np.stack(raw[i : i + bpe], axis=1).reshape(-1) for i in range(0, len(raw), bpe)]
            got_ids, got_values = unpack_entries(np.concatenate(raw), layout)
            return (delta_decode_ids(got_ids, ne, layout.id_bits) if delta else got_ids), got_values

        out[name] = (frames, decode)

    add("records, absolute ids, zstd 3 (schema 1)", [absolute], 3, True, False)
    add("records, absolute ids, byte planes, zstd 3", planes_of(absolute), 3, True, False)
    add("records, absolute ids, byte planes, zstd 19", planes_of(absolute), 19, True, False)
    add("records, delta ids, zstd 3", [gaps], 3, True, True)
    add("records, delta ids, byte planes, frame per plane, zstd 3", planes_of(gaps), 3, False, True)
    for level in (3, 9, 12, 17, 19):
        add(f"records, delta ids, byte planes, zstd {level}", planes_of(gaps), level, True, True)
    return out


def time_it(fn: Callable[[], None], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    d = load(args.cache)
    positions = d["num_entries"].size
    entries = d["ids"].size
    counts = count_bytes(d["num_entries"])
    print(f"{d['mode']}: {positions} positions, {entries} entries ({entries / positions:.2f} per position); counts array {counts / positions:.2f} B/token")
    rows = []
    for name, (frames, decode) in layouts(d).items():
        got_ids, got_values = decode()  # type: ignore[misc]
        assert np.array_equal(got_ids, d["ids"]) and np.array_equal(got_values, d["values"]), f"{name} is lossy"
        size = sum(len(f) for f in frames)
        seconds = time_it(decode, args.repeats)
        rows.append({"layout": name, "entry_bytes_per_token": size / positions, "logits_bytes_per_token": (size + counts) / positions,
                     "decode_M_entries_per_s": entries / seconds / 1e6})  # fmt: skip
        print(f"{name:58s} entries {size / positions:6.2f} B/token, +counts {(size + counts) / positions:6.2f}, decode {entries / seconds / 1e6:7.1f} M entries/s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
