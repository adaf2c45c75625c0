"""Fuzz the image readers (pdd/data/readers.py): hypothesis-driven mutation of valid seed files of every format.

The only outcomes allowed for a mutated file are a float32 image in [0, 1] or the project's own
``ImageReadError``, within the decode budget's time (plus :data:`SLACK_S`) and the memory bound. Anything
else (another exception, a non-finite or out-of-range image, a slow decode) is a finding: hypothesis
shrinks it and the smallest input is written to ``OUT/findings/`` for a regression test.

Each seed is a payload and a wrapping: the mutations (bit flips, header fields overwritten with boundary
values, truncation, deletions, insertions, duplicated or spliced regions) hit the payload (the NIfTI file
inside its gzip stream, the DICOM dataset inside its deflate stream), then it is wrapped; some cases mutate
the wrapped bytes instead. Rounds of ``--examples`` cases run in child processes with a seed each (the
round's number), an address-space limit (``--memory-gb``) and a wall-clock limit, so a crash, a hang or an
allocation beyond the bound is caught too. Run::

    python benchmarks/fuzz_readers.py --seconds 600 --out benchmarks/results/fuzz-readers

Writes ``OUT/results.md`` (executions, outcomes, findings) and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_model

# Fuzzed under a smaller budget than the readers' default, so that a mutated header that stays within it
# still decodes quickly: the budget's mechanism is what is under test, not its defaults.
FUZZ_BUDGET = {"max_pixels": 1 << 20, "max_voxels": 1 << 22, "max_frames": 64, "max_bytes": 64 << 20,
               "max_seconds": 5.0}
SLACK_S = 2.0
INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\xff\x7f", b"\x00\x80",
               b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\x01\x00\x00\x00",
               b"\x00\x00\x01\x00", b"\x40\x9c\x00\x00", b"\x30\x75", b"\x75\x30")


# --- seeds ----------------------------------------------------------------------------------------------


def _pillow(array: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _dicom(stored: np.ndarray, syntax: str, *, photometric: str = "MONOCHROME2", frames: int | None = None,
           window: bool = True, encapsulated: list[bytes] | None = None, bits: int = 16) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset): a CT-like DICOM file in two parts, so deflate can wrap the second."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import UID, CTImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    rows, cols = stored.shape[-3:-1] if photometric == "RGB" else stored.shape[-2:]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    if window:
        ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
    if encapsulated is not None:
        ds.PixelData = encapsulate(encapsulated)
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = stored.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, UID(syntax).is_implicit_VR
    write_dataset(body, ds)
    return head.getvalue(), body.getvalue()


def _nifti(volume: np.ndarray, version: int = 1) -> bytes:
    import nibabel as nib

    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    return cls(volume, np.diag([1.0, 1.0, 2.0, 1.0])).to_bytes()


def seeds() -> dict[str, tuple[str, bytes, bytes]]:
    """name -> (wrapping, prefix, payload): wrapping "none" (the file is prefix + payload), "gzip" (payload
    gzipped) or "deflate" (prefix, then the payload as a raw deflate stream: DICOM's deflated syntax)."""
    from PIL import Image
    from pydicom.pixels.encoders import RLELosslessEncoder
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        RLELossless,
    )

    rng = np.random.default_rng(0)
    grey = (np.add.outer(np.arange(12), np.arange(16)) * 9).astype(np.uint8)
    rgb = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    deep = (grey.astype(np.uint16) * 257)
    ct = (1000 + grey.astype(np.uint16) * 8)
    out: dict[str, tuple[str, bytes, bytes]] = {
        "png-grey": ("none", b"", _pillow(grey, "PNG")),
        "png-rgb": ("none", b"", _pillow(rgb, "PNG")),
        "png-16bit": ("none", b"", _pillow(deep, "PNG")),
        "png-palette": ("none", b"", _pillow(np.asarray(Image.fromarray(rgb).convert("P")), "PNG")),
        "jpeg-grey": ("none", b"", _pillow(grey, "JPEG", quality=90)),
        "jpeg-rgb-progressive": ("none", b"", _pillow(rgb, "JPEG", progressive=True)),
        "bmp-rgb": ("none", b"", _pillow(rgb, "BMP")),
        "tiff-deflate": ("none", b"", _pillow(grey, "TIFF", compression="tiff_adobe_deflate")),
        "tiff-lzw-rgb": ("none", b"", _pillow(rgb, "TIFF", compression="tiff_lzw")),
        "tiff-16bit": ("none", b"", _pillow(deep, "TIFF")),
        "tiff-float": ("none", b"", _pillow(grey.astype(np.float32) / 7, "TIFF")),
    }
    for name, syntax, kw in (("dicom-explicit", ExplicitVRLittleEndian, {}),
                             ("dicom-implicit", ImplicitVRLittleEndian, {"window": False}),
                             ("dicom-multiframe", ExplicitVRLittleEndian, {"frames": 3})):
        stored = np.stack([ct] * 3) if "frames" in kw else ct
        out[name] = ("none", *_dicom(stored, syntax, **kw))
    out["dicom-deflated"] = ("deflate", *_dicom(ct, DeflatedExplicitVRLittleEndian))
    out["dicom-rgb"] = ("none", *_dicom(rgb, ExplicitVRLittleEndian, photometric="RGB", bits=8, window=False))
    j2k = _pillow(ct, "JPEG2000", irreversible=False, no_jp2=True)
    out["dicom-jpeg2000"] = ("none", *_dicom(ct, JPEG2000Lossless, encapsulated=[j2k]))
    out["dicom-jpeg"] = ("none", *_dicom(grey, JPEGBaseline8Bit, encapsulated=[_pillow(grey, "JPEG")], bits=8,
                                         window=False))
    rle = RLELosslessEncoder.encode(ct, rows=12, columns=16, samples_per_pixel=1, bits_allocated=16, bits_stored=16,
                                    pixel_representation=0, photometric_interpretation="MONOCHROME2",
                                    number_of_frames=1)
    out["dicom-rle"] = ("none", *_dicom(ct, RLELossless, encapsulated=[rle]))
    volume = rng.normal(100, 30, (8, 6, 5)).astype(np.float32)
    out["nifti-int16"] = ("none", b"", _nifti((volume * 10).astype(np.int16)))
    out["nifti-float-gz"] = ("gzip", b"", _nifti(volume))
    out["nifti2-4d-gz"] = ("gzip", b"", _nifti(np.stack([volume, -volume], axis=-1), version=2))
    return out


def wrap(wrapping: str, prefix: bytes, payload: bytes) -> bytes:
    if wrapping == "gzip":
        return gzip.compress(payload, compresslevel=6, mtime=0)
    if wrapping == "deflate":
        comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        return prefix + comp.compress(payload) + comp.flush()
    return prefix + payload


# --- mutations ------------------------------------------------------------------------------------------


def mutation_strategy():
    from hypothesis import strategies as st

    offset = st.one_of(st.integers(0, 511), st.integers(0, 1 << 20))  # headers first
    return st.one_of(
        st.tuples(st.just("flip"), offset, st.integers(0, 7)),
        st.tuples(st.just("set"), offset, st.sampled_from(INTERESTING)),
        st.tuples(st.just("truncate"), offset),
        st.tuples(st.just("delete"), offset, st.integers(1, 64)),
        st.tuples(st.just("insert"), offset, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("duplicate"), offset, st.integers(1, 256), offset),
    )


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op, at, *args in mutations:
        if not buf:
            break
        at %= len(buf)
        if op == "flip":
            buf[at] ^= 1 << args[0]
        elif op == "set":
            buf[at:at + len(args[0])] = args[0]
        elif op == "truncate":
            del buf[at:]
        elif op == "delete":
            del buf[at:at + args[0]]
        elif op == "insert":
            buf[at:at] = args[0]
        else:  # duplicate: copy a region to another place
            buf[args[1] % len(buf):args[1] % len(buf)] = buf[at:at + args[0]]
    return bytes(buf)


# --- one case -------------------------------------------------------------------------------------------


def decode(name: str, data: bytes, budget, folder: Path) -> str:
    """Decode one mutated file as the project would; the outcome's kind, or raise for a finding."""
    from pdd.data.readers import ImageReadError, read_image, read_image_bytes

    try:
        if name.startswith("nifti"):
            path = folder / ("case.nii.gz" if name.endswith("gz") else "case.nii")
            path.write_bytes(data)
            image = read_image(path, budget=budget)
        else:
            image = read_image_bytes(data, name, budget=budget)
    except ImageReadError as exc:
        return f"refused: {type(exc).__name__}"
    if image.dtype != np.float32 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise AssertionError(f"not an image: {image.dtype} {image.shape}")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise AssertionError(f"values outside [0, 1]: {image.min()}..{image.max()}")
    return "decoded"


def run_round(seed: int, examples: int, out: Path) -> dict:
    """One hypothesis run of ``examples`` cases (seeded by ``seed``); its counts and finding (None if none)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    from pdd.data.readers import DecodeBudget

    budget = DecodeBudget(**FUZZ_BUDGET)
    table = seeds()
    outcomes: Counter = Counter()
    last: dict = {}
    slowest = [0.0, ""]
    executions = [0]

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=(Phase.generate, Phase.shrink),
              suppress_health_check=list(HealthCheck), print_blob=False,
              report_multiple_bugs=False)
    @given(name=st.sampled_from(sorted(table)), mutations=st.lists(mutation_strategy(), min_size=1, max_size=8),
           outer=st.booleans())
    def case(name: str, mutations: list, outer: bool) -> None:
        wrapping, prefix, payload = table[name]
        # Mostly mutate what the wrapping hides; sometimes the bytes on disk.
        data = mutate(wrap(wrapping, prefix, payload), mutations) if outer or wrapping == "none" else \
            wrap(wrapping, prefix, mutate(payload, mutations))
        last.update(name=name, data=data)
        executions[0] += 1
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            kind = decode(name, data, budget, Path(tmp))
        elapsed = time.perf_counter() - start
        outcomes[kind] += 1
        if elapsed > slowest[0]:
            slowest[:] = [elapsed, name]
        if elapsed > budget.max_seconds + SLACK_S:
            raise AssertionError(f"{elapsed:.1f} s, over the budget's {budget.max_seconds} s")

    finding = None
    try:
        case()
    except Exception as exc:  # hypothesis re-raises the shrunk failure; its input was the last one run
        path = out / "findings" / f"round{seed}-{last['name']}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(last["data"])
        finding = {"round": seed, "seed_file": last["name"], "error": f"{type(exc).__name__}: {exc}"[:500],
                   "input": str(path), "input_b64": base64.b64encode(last["data"][:4096]).decode()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"round": seed, "executions": executions[0], "outcomes": dict(outcomes), "finding": finding,
            "slowest_s": slowest[0], "slowest_seed": slowest[1], "peak_rss_mb": peak}


# --- the driver -----------------------------------------------------------------------------------------


def _limit_memory(gb: float) -> None:
    limit = int(gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child(seed: int, examples: int, out: Path, memory_gb: float, timeout_s: float) -> dict:
    """Round ``seed`` in a child process; a crash, a hang or an allocation past the limit is a finding too."""
    cmd = [sys.executable, __file__, "--round", str(seed), "--examples", str(examples), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=lambda: _limit_memory(memory_gb))
    except subprocess.TimeoutExpired:
        return {"round": seed, "executions": 0, "outcomes": {}, "slowest_s": timeout_s, "peak_rss_mb": None,
                "finding": {"round": seed, "error": f"the round did not finish in {timeout_s:.0f} s (a hang)"}}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"round": seed, "executions": 0, "outcomes": {}, "slowest_s": None, "peak_rss_mb": None,
                "finding": {"round": seed, "error": f"the round's process ended with status {proc.returncode}: "
                                                    f"{proc.stderr[-1500:]}"}}
    return json.loads(lines[-1])


def _report(rounds: list[dict], args: argparse.Namespace, wall_s: float) -> str:
    executions = sum(r["executions"] for r in rounds)
    outcomes: Counter = Counter()
    for r in rounds:
        outcomes.update(r["outcomes"])
    findings = [r["finding"] for r in rounds if r["finding"]]
    peaks = [r["peak_rss_mb"] for r in rounds if r["peak_rss_mb"] is not None]
    slowest = max(rounds, key=lambda r: r["slowest_s"] or 0.0)
    lines = [
        "# Fuzzing the image readers",
        "",
        f"Command: `python benchmarks/fuzz_readers.py --seconds {args.seconds:g} --examples {args.examples} "
        f"--out {args.out}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}. "
        f"Budget fuzzed under: `DecodeBudget(**{FUZZ_BUDGET})`; a case may take {SLACK_S:g} s over its "
        f"max_seconds; each round runs with an address space of {args.memory_gb:g} GiB at most.",
        "",
        f"**{executions:,} executions** in {len(rounds)} rounds ({wall_s:.0f} s), over {len(seeds())} seed files "
        f"(PNG, JPEG, BMP, TIFF, DICOM native / implicit / multi-frame / deflated / RGB / JPEG / JPEG 2000 / RLE, "
        f"NIfTI-1, NIfTI-1 gz, NIfTI-2 4-D gz).",
        "",
        "| outcome | cases |",
        "|---|---|",
        *(f"| {kind} | {count:,} |" for kind, count in sorted(outcomes.items())),
        "",
        f"Slowest case: {slowest['slowest_s']:.2f} s ({slowest.get('slowest_seed', '')}); peak RSS of a round "
        f"process: {max(peaks):.0f} MB." if peaks else "",
        "",
        f"**Findings: {len(findings)}**" + ("" if findings else " (every case gave an image or an ImageReadError)."),
        "",
        *(f"- round {f['round']}, seed `{f.get('seed_file', '?')}`: {f['error']} (input: `{f.get('input', '')}`)"
          for f in findings),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="stop starting rounds after this long")
    ap.add_argument("--examples", type=int, default=300, help="cases per round (one hypothesis run)")
    ap.add_argument("--first-round", type=int, default=0, help="seed of the first round (rounds count up)")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit of a round's process")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz-readers"))
    ap.add_argument("--round", type=int, help=argparse.SUPPRESS)  # internal: run one round, print its JSON
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.round is not None:
        print(json.dumps(run_round(args.round, args.examples, args.out)))
        return 0
    start = time.monotonic()
    rounds = []
    seed = args.first_round
    per_round = args.examples * (FUZZ_BUDGET["max_seconds"] + SLACK_S) + 120
    while time.monotonic() - start < args.seconds:
        rounds.append(_child(seed, args.examples, args.out, args.memory_gb, per_round))
        done = rounds[-1]
        print(f"round {seed}: {done['executions']} executions, finding: {done['finding'] is not None}", flush=True)
        seed += 1
    wall = time.monotonic() - start
    (args.out / "results.json").write_text(json.dumps({"rounds": rounds, "wall_s": wall}, indent=1))
    (args.out / "results.md").write_text(_report(rounds, args, wall))
    print((args.out / "results.md").read_text())
    return 1 if any(r["finding"] for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
