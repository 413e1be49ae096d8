#!/usr/bin/env python3
"""Deterministic tree generator for the corral sync benchmark.

    gen.py tree DEST [--seed N] [--scale S]    make the tree (same bytes and mtimes every time)
    gen.py change DEST [--seed N] [--percent P] edit P% of the files in place (same size)
    gen.py image DEST [--seed N] [--scale S]   make DEST/image.img (1 GiB at scale 1)
    gen.py image-edit FILE [--seed N] [--bytes B] [--pieces K]
                                               overwrite B bytes in K scattered places
    gen.py undo UNDO                           put back what `change`/`image-edit --undo UNDO`
                                               edited (bytes and mtimes), then remove UNDO

At scale 1 the tree holds 50,000 files from 1 KiB to 1 MiB (75% 1-16 KiB, 20% 16-256 KiB,
5% 256 KiB-1 MiB; about 3.2 GB) in about 500 directories, half of them text-like
(compressible) and half random bytes. Sizes, names, contents and mtimes depend only on the
seed and the scale. SCALE multiplies the file count and the image size.
"""

import argparse
import json
import os
import random
import sys

MTIME_BASE = 1_700_000_000
WORDS = [
    "server", "cluster", "child", "master", "rsync", "corral", "config", "daemon", "kernel",
    "package", "update", "restart", "network", "address", "mail", "spool", "include", "exclude",
    "the", "a", "of", "and", "to", "in", "is", "for", "on", "with", "#", "=", "{", "}", ";",
]


_CORPUS = {}


def text_bytes(rng: random.Random, n: int) -> bytes:
    """Text-like bytes: a slice of a seeded 4 MiB corpus of lines (compressible, deterministic)."""
    if "c" not in _CORPUS:
        crng = random.Random("corpus")
        lines = []
        size = 0
        while size < 4 << 20:
            line = " ".join(crng.choice(WORDS) for _ in range(crng.randint(3, 12))) + "\n"
            lines.append(line)
            size += len(line)
        _CORPUS["c"] = "".join(lines).encode()
    c = _CORPUS["c"]
    off = rng.randrange(len(c) - n) if n < len(c) else 0
    return (c[off:off + n] + b"\0" * n)[:n]


def file_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.75:
        return rng.randint(1024, 16 * 1024)
    if r < 0.95:
        return rng.randint(16 * 1024, 256 * 1024)
    return rng.randint(256 * 1024, 1024 * 1024)


def plan(seed: int, scale: float):
    """Yield (relative path, size, kind, mtime) for every file, in a fixed order."""
    rng = random.Random(seed)
    nfiles = max(1, round(50_000 * scale))
    ndirs = max(1, nfiles // 100)
    dirs = [""]
    for i in range(1, ndirs):
        parent = dirs[rng.randrange(len(dirs))] if len(dirs) < 8 or rng.random() < 0.7 else ""
        if parent.count("/") >= 3:
            parent = ""
        dirs.append(f"{parent}d{i:04d}/" if parent else f"d{i:04d}/")
    for i in range(nfiles):
        d = dirs[rng.randrange(len(dirs))]
        ext = rng.choice([".conf", ".txt", ".so", ".bin", ".html", ""])
        yield (f"{d}f{i:06d}{ext}", file_size(rng), rng.random() < 0.5,
               MTIME_BASE + rng.randrange(30_000_000))


def cmd_tree(a):
    total = 0
    count = 0
    for rel, size, texty, mtime in plan(a.seed, a.scale):
        path = os.path.join(a.dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        frng = random.Random(f"{a.seed}:{rel}")
        data = text_bytes(frng, size) if texty else frng.randbytes(size)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (mtime, mtime))
        total += size
        count += 1
    for root, dirnames, _ in os.walk(a.dest, topdown=False):
        for d in dirnames:
            os.utime(os.path.join(root, d), (MTIME_BASE, MTIME_BASE))
    os.utime(a.dest, (MTIME_BASE, MTIME_BASE))
    print(f"tree: {count} files, {total} bytes in {a.dest}", file=sys.stderr)


def cmd_change(a):
    files = sorted(
        os.path.relpath(os.path.join(r, f), a.dest)
        for r, _, fs in os.walk(a.dest)
        for f in fs
    )
    rng = random.Random(f"change:{a.seed}")
    n = max(1, round(len(files) * a.percent / 100))
    edits = []
    for rel in rng.sample(files, n):
        path = os.path.join(a.dest, rel)
        size = os.path.getsize(path)
        off = rng.randrange(max(1, size - 64))
        edits.append((path, off, rng.randbytes(min(64, size))))
    apply_edits(edits, a.undo)
    print(f"change: edited 64 bytes in {len(edits)} of {len(files)} files", file=sys.stderr)


def apply_edits(edits, undo):
    """Writes each (path, offset, bytes) in place and moves the file's mtime on by 1 s. With
    `undo`, first records (durably) the old bytes and times, so `gen.py undo` puts them back
    even after an interrupted run: the tree need not be generated again."""
    if undo:
        old = []
        for path, off, data in edits:
            st = os.stat(path)
            with open(path, "rb") as f:
                f.seek(off)
                old.append({"path": os.path.abspath(path), "offset": off,
                            "bytes": f.read(len(data)).hex(),
                            "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns})
        tmp = undo + ".tmp"
        with open(tmp, "w") as f:
            json.dump(old, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, undo)
    for path, off, data in edits:
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(data)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def cmd_undo(a):
    with open(a.undo) as f:
        old = json.load(f)
    # Reversed: where one file was edited twice, the first record holds the original bytes.
    for e in reversed(old):
        with open(e["path"], "r+b") as f:
            f.seek(e["offset"])
            f.write(bytes.fromhex(e["bytes"]))
        os.utime(e["path"], ns=(e["atime_ns"], e["mtime_ns"]))
    os.remove(a.undo)
    print(f"undo: restored {len(old)} edits from {a.undo}", file=sys.stderr)


def cmd_image(a):
    size = max(1 << 20, int((1 << 30) * a.scale)) // (1 << 20) * (1 << 20)
    rng = random.Random(f"image:{a.seed}")
    os.makedirs(a.dest, exist_ok=True)
    path = os.path.join(a.dest, "image.img")
    with open(path, "wb") as f:
        for i in range(size >> 20):
            # A disk image: mostly data, some zeroed regions.
            if i % 16 == 15:
                f.write(bytes(1 << 20))
            else:
                f.write(rng.randbytes(1 << 20))
    os.utime(path, (MTIME_BASE, MTIME_BASE))
    print(f"image: {size} bytes in {path}", file=sys.stderr)


def cmd_image_edit(a):
    rng = random.Random(f"image-edit:{a.seed}")
    size = os.path.getsize(a.file)
    piece = a.bytes // a.pieces
    edits = []
    for _ in range(a.pieces):
        off = rng.randrange(size - piece)
        edits.append((a.file, off, rng.randbytes(piece)))
    apply_edits(edits, a.undo)
    print(f"image-edit: {a.pieces} x {piece} bytes in {a.file}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tree")
    t.add_argument("dest")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--scale", type=float, default=float(os.environ.get("SCALE", "1")))
    c = sub.add_parser("change")
    c.add_argument("dest")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--percent", type=float, default=1.0)
    c.add_argument("--undo", help="record the old bytes here first (for `gen.py undo`)")
    i = sub.add_parser("image")
    i.add_argument("dest")
    i.add_argument("--seed", type=int, default=1)
    i.add_argument("--scale", type=float, default=float(os.environ.get("SCALE", "1")))
    e = sub.add_parser("image-edit")
    e.add_argument("file")
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--bytes", type=int, default=32 * 1024)
    e.add_argument("--pieces", type=int, default=8)
    e.add_argument("--undo", help="record the old bytes here first (for `gen.py undo`)")
    u = sub.add_parser("undo")
    u.add_argument("undo")
    a = p.parse_args()
    {"tree": cmd_tree, "change": cmd_change, "image": cmd_image, "image-edit": cmd_image_edit,
     "undo": cmd_undo}[a.cmd](a)


if __name__ == "__main__":
    main()
