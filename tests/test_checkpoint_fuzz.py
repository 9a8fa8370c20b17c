"""Fuzzing checkpoint files: hundreds of corrupted and crafted files, each either refused
with ``CheckpointError`` or (for a change the format cannot see) loaded, never another
exception, in a process whose address space is capped so that an allocation the file
does not back fails the test.

main failed this: a declared huge shape raised MemoryError, deep nesting RecursionError,
zip-directory corruptions RuntimeError/NotImplementedError, and a 0.5 MB DEFLATE member
expanded to 1.3 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import xpoptim

from conftest import selected_backends

LEGACY = Path(__file__).parent / "data" / "checkpoint-v1-adam.npz"

FUZZER = textwrap.dedent(
    r"""
    import json, random, resource, sys, zipfile, zlib
    import numpy as np
    import xpoptim

    new_path, old_path, work, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(20261202)

    def npy_header(shape):
        text = repr({"descr": "<f8", "fortran_order": False, "shape": shape}).encode()
        text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text

    def deflate_bomb(path, gib):
        # A 2**30-byte member of zeros, DEFLATE-compressed to about 1 MB, next to real metadata.
        with zipfile.ZipFile(old_path) as zf:
            meta = zf.read("__xpoptim__.npy")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("__xpoptim__.npy", meta)
            n = gib * 2**30
            with zf.open("a0.npy", "w", force_zip64=True) as member:
                member.write(npy_header((n // 8,)))
                chunk = bytes(2**20)
                for _ in range(n // len(chunk)):
                    member.write(chunk)
        with open(path, "rb") as f:
            return f.read()

    new, old = open(new_path, "rb").read(), open(old_path, "rb").read()
    cases = []  # (family, kind, bytes, must_refuse)
    for family, good in (("new", new), ("old", old)):
        strict = family == "new"  # every byte of the new format is checked
        for n in sorted({*range(0, 17), *(rng.randrange(len(good)) for _ in range(60))}):
            cases.append((family, "truncated", good[:n], True))
        for _ in range(300):
            data = bytearray(good)
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
            cases.append((family, "flipped byte", bytes(data), strict))
        for _ in range(60):
            data = bytearray(good)
            at = rng.randrange(len(data))
            span = rng.randrange(1, 64)
            data[at : at + span] = rng.randbytes(span)
            cases.append((family, "overwritten span", bytes(data), strict))
        cases.append((family, "appended bytes", good + rng.randbytes(100), strict))

    # Crafted headers (the new format): declared sizes the file does not hold.
    n = int.from_bytes(new[:8], "little")
    header = json.loads(new[8 : 8 + n])
    def crafted(edit, raw=None):
        h = json.loads(json.dumps(header))
        edit(h)
        blob = json.dumps(h).encode() if raw is None else raw
        return len(blob).to_bytes(8, "little") + blob + new[8 + n :]
    huge = 2**62
    DEEP = "[" * 200000 + "]" * 200000
    cases += [
        ("new", "header size 2**64-1", b"\xff" * 8 + new[8:], True),
        ("new", "header size = file", len(new).to_bytes(8, "little") + new[8:], True),
        ("new", "huge shape", crafted(lambda h: h["a0"].update(shape=[huge, huge])), True),
        ("new", "huge offsets", crafted(lambda h: h["a0"].update(data_offsets=[0, huge])), True),
        ("new", "negative offsets", crafted(lambda h: h["a0"].update(data_offsets=[-8, 0])), True),
        ("new", "float shape", crafted(lambda h: h["a0"].update(shape=[1e300])), True),
        ("new", "bool shape", crafted(lambda h: h["a0"].update(shape=[True])), True),
        ("new", "1000 dims", crafted(lambda h: h["a0"].update(shape=[1] * 1000)), True),
        ("new", "deep nesting", crafted(lambda h: None, b'{"a":' + DEEP.encode() + b"}"), True),
        ("new", "deep metadata", crafted(lambda h: h["__metadata__"].update(
            xpoptim=DEEP, xpoptim_crc32=f"{zlib.crc32(DEEP.encode()):08x}")), True),
        ("new", "huge integer", crafted(lambda h: None, b'{"a0": ' + b"9" * 100000 + b"}"), True),
        ("new", "metadata not strings", crafted(lambda h: h["__metadata__"].update(x=[1])), True),
    ]
    cases.append(("old", "DEFLATE bomb (1 GiB)", deflate_bomb(work + "/bomb.npz", 1), True))

    # Imports warmed up by one good load; then cap the address space: what is mapped now,
    # plus the headroom, which a 1 GiB allocation exceeds.
    xpoptim.load(new_path)
    xpoptim.load(old_path)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, resource.RLIM_INFINITY))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    counts, bad = {}, []
    path = work + "/case.ckpt"
    for family, kind, data, must_refuse in cases:
        with open(path, "wb") as f:
            f.write(data)
        try:
            xpoptim.load(path)
            outcome = "loaded"
        except xpoptim.CheckpointError:
            outcome = "refused"
        except BaseException as exc:
            outcome = "other"
            bad.append(f"{family} {kind}: {type(exc).__name__}: {exc}"[:300])
        if outcome == "loaded" and must_refuse:
            bad.append(f"{family} {kind}: loaded, not refused")
        key = f"{family} {kind} {outcome}"
        counts[key] = counts.get(key, 0) + 1
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"counts": counts, "bad": bad, "cases": len(cases),
                      "rss_growth_kib": rss_after - rss_before}))
    """
)


def test_fuzzed_checkpoints_raise_only_checkpoint_error_in_bounded_memory(tmp_path):
    if "numpy" not in selected_backends():
        pytest.skip("backend-independent; runs in the numpy session")
    opt = xpoptim.Adam(learning_rate=0.02)
    rng = np.random.default_rng(0)
    params = {"dense.weights": rng.normal(size=(4, 3)), "dense.bias": rng.normal(size=3)}
    state = opt.init(params)
    params, state = opt.update(params, params, state)
    new = tmp_path / "new.safetensors"
    xpoptim.save(new, opt, params, state=state)
    src = str(Path(xpoptim.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    headroom = 512 * 2**20
    out = subprocess.run(
        [sys.executable, "-c", FUZZER, str(new), str(LEGACY), str(tmp_path), str(headroom)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert report["bad"] == []
    assert report["cases"] > 850
    # Memory: nothing near the size any file declared (the bomb alone declares 1 GiB).
    assert report["rss_growth_kib"] < 64 * 1024
    counts = report["counts"]
    assert counts.get("old DEFLATE bomb (1 GiB) refused") == 1
    assert not any(k.startswith("new") and k.endswith("loaded") for k in counts)
