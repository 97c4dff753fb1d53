"""The mutation fuzzer: real photos (and PNG and WebP re-encodings of them), damaged where
decoders look (headers, sizes, chunk lengths), the same for the same seed, as cases for every
transport: any of 200/400/413/415, never a 5xx."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence

from attacks.catalogue import Case
from attacks.client import oip_grpc, oip_post, post
from attacks.payloads import MIME, NO_PHOTOS, jpeg_segments, jpeg_with_size, photos

FUZZ_ALLOWED = frozenset({200, 400, 413, 415})


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, whole length) of each chunk after the signature."""
    out, i = [], 8
    while i + 12 <= len(data):
        length = struct.unpack(">I", data[i : i + 4])[0]
        out.append((i, 12 + length))
        i += 12 + length
    return out


def _dimension(rng: random.Random, bits: int) -> int:
    """A width or height for a header of ``bits`` bits: an edge value or a random one."""
    edges = [0, 1, 2, 255, 4096, 8192, 32767, 65000, 65535]
    if bits > 16:
        edges += [2**31 - 1, 2**31, 2**32 - 1]
    return rng.choice(edges) if rng.random() < 0.6 else rng.randrange(min(2**bits, 100_000))


def _bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    # Half of the time within the first 2 KB, where the headers are.
    span = min(len(out), 2048) if rng.random() < 0.5 else len(out)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _run_overwrite(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    start = rng.randrange(len(out))
    length = min(rng.randint(1, 256), len(out) - start)
    fill = rng.choice([b"\x00" * length, b"\xff" * length, rng.randbytes(length)])
    out[start : start + length] = fill
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(1, len(data))]


def _jpeg_sof_size(rng: random.Random, data: bytes) -> bytes:
    return jpeg_with_size(data, _dimension(rng, 16), _dimension(rng, 16))


def _jpeg_segment_edit(duplicate: bool) -> Callable[[random.Random, bytes], bytes]:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        segments = [s for s in jpeg_segments(data) if s[2] != 0xD8]  # keep SOI
        offset, size, _ = rng.choice(segments)
        segment = data[offset : offset + size]
        if duplicate:
            return data[: offset + size] + segment + data[offset + size :]
        return data[:offset] + data[offset + size :]

    return mutate


def _png_ihdr_size(fix_crc: bool) -> Callable[[random.Random, bytes], bytes]:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        out = bytearray(data)
        out[16:24] = struct.pack(">II", _dimension(rng, 32), _dimension(rng, 32))
        if fix_crc:
            out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        return bytes(out)

    return mutate


def _png_chunk_length(rng: random.Random, data: bytes) -> bytes:
    offset, whole = rng.choice(_png_chunks(data))
    value = rng.choice([0, 1, whole - 11, whole + 1, 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])
    return data[:offset] + struct.pack(">I", value) + data[offset + 4 :]


def _png_chunk_edit(duplicate: bool) -> Callable[[random.Random, bytes], bytes]:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        offset, whole = rng.choice(_png_chunks(data))
        chunk = data[offset : offset + whole]
        end = offset + whole
        return data[:end] + chunk + data[end:] if duplicate else data[:offset] + data[end:]

    return mutate


def _webp_riff_size(rng: random.Random, data: bytes) -> bytes:
    value = rng.choice([0, 4, len(data), len(data) + 1000, 2**32 - 1, rng.randrange(2**32)])
    return data[:4] + struct.pack("<I", value) + data[8:]


def _webp_dimensions(rng: random.Random, data: bytes) -> bytes:
    """The first chunk's own idea of the size: VP8 (14 bits + scale), VP8L (14 bits each, minus
    one, bit-packed) or VP8X (24 bits each, minus one)."""
    out = bytearray(data)
    kind = bytes(out[12:16])
    if kind == b"VP8 ":
        out[26:30] = struct.pack("<HH", _dimension(rng, 16), _dimension(rng, 16))
    elif kind == b"VP8L":
        packed = struct.unpack("<I", out[21:25])[0]
        packed = (packed & ~0x0FFFFFFF) | (rng.randrange(1 << 14) | rng.randrange(1 << 14) << 14)
        out[21:25] = struct.pack("<I", packed)
    elif kind == b"VP8X":
        width, height = rng.randrange(1 << 24), rng.randrange(1 << 24)
        out[24:30] = width.to_bytes(3, "little") + height.to_bytes(3, "little")
    return bytes(out)


def _webp_chunk_size(rng: random.Random, data: bytes) -> bytes:
    value = rng.choice([0, 1, len(data), 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])
    return data[:16] + struct.pack("<I", value) + data[20:]


Mutation = Callable[[random.Random, bytes], bytes]
_GENERIC: list[tuple[str, Mutation]] = [
    ("bit-flips", _bit_flips),
    ("run-overwrite", _run_overwrite),
    ("truncated", _truncate),
]
MUTATIONS: dict[str, list[tuple[str, Mutation]]] = {
    "jpeg": [
        *_GENERIC,
        ("sof-size", _jpeg_sof_size),
        ("segment-duplicated", _jpeg_segment_edit(True)),
        ("segment-dropped", _jpeg_segment_edit(False)),
    ],
    "png": [
        *_GENERIC,
        ("ihdr-size-crc-fixed", _png_ihdr_size(True)),
        ("ihdr-size-crc-stale", _png_ihdr_size(False)),
        ("chunk-length", _png_chunk_length),
        ("chunk-duplicated", _png_chunk_edit(True)),
        ("chunk-dropped", _png_chunk_edit(False)),
    ],
    "webp": [
        *_GENERIC,
        ("riff-size", _webp_riff_size),
        ("dimensions", _webp_dimensions),
        ("chunk-size", _webp_chunk_size),
    ],
}


def _reencode(photo: bytes, fmt: str) -> bytes:
    """``photo`` at most 160 pixels across, as PNG or WebP, in memory: small, so that fuzzing
    costs little, yet a real encoder's output."""
    from PIL import Image

    image = Image.open(io.BytesIO(photo))
    image.draft("RGB", (160, 160))
    image = image.convert("RGB")
    image.thumbnail((160, 160))
    out = io.BytesIO()
    image.save(out, fmt.upper())
    return out.getvalue()


def mutations(
    seed: int, count: int, sources: Sequence[bytes] | None = None
) -> Iterator[tuple[str, bytes, str]]:
    """``count`` (name, bytes, content type) damaged images, the same for the same seed. The
    declared type matches the bytes four times in five: the service must sniff, not trust it."""
    sources = list(sources) if sources is not None else photos()
    if not sources:
        raise FileNotFoundError(NO_PHOTOS)
    rng = random.Random(seed)
    encoded: dict[tuple[int, str], bytes] = {}
    for i in range(count):
        index = rng.randrange(len(sources))
        kind = rng.choice(list(MUTATIONS))
        if kind == "jpeg":
            original = sources[index]
        else:
            if (index, kind) not in encoded:
                encoded[index, kind] = _reencode(sources[index], kind)
            original = encoded[index, kind]
        name, mutate = rng.choice(MUTATIONS[kind])
        content_type = MIME[kind] if rng.random() < 0.8 else rng.choice(list(MIME.values()))
        yield f"fuzz-{seed}-{i:04d}-{kind}-{name}", mutate(rng, original), content_type


def fuzz_cases(
    seed: int, count: int, sources: Sequence[bytes] | None = None, protocol: str = "detect"
) -> list[Case]:
    """The mutations as cases: any of 200/400/413/415, never a 5xx. ``protocol``: how they are
    sent, ``detect`` (POST /detect, the declared type of the mutation), ``oip-rest`` or ``oip-grpc``."""
    if protocol == "detect":
        return [
            Case(name, lambda target, d=data, t=content_type: post(target, d, t), FUZZ_ALLOWED)
            for name, data, content_type in mutations(seed, count, sources)
        ]
    send = {"oip-rest": oip_post, "oip-grpc": oip_grpc}[protocol]
    return [
        Case(f"{protocol} {name}", lambda target, d=data: send(target, d), FUZZ_ALLOWED, oip=True)
        for name, data, _ in mutations(seed, count, sources)
    ]
