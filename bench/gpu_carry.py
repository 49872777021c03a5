"""Prepare ``.gpu-carry/``: what bench/gpu_check.py needs on a lent GPU machine beside the working tree.

That machine has Python 3.12, PyTorch, numpy, pytest, matplotlib and tqdm, reaches no package
registry and has no ../shared. The folder (git-ignored, sent with the tool's ``carry``) holds:

- ``simpleitk/``: SimpleITK, the engine's image library. Its wheel (~53 MB) would not fit in the
  60 MiB that the tree (~34 MB) and the carry may take together, so its shared library (~272 MB
  unpacked) is stored as xz (LZMA2) parts: the machine code through the x86 BCJ filter, and the
  relocation table split into columns (offsets as differences, types, addends), which compress
  about 4x better than its interleaved 24-byte records; the Python files as ``python.tar.xz``.
  :func:`unpack_site` rebuilds the package byte for byte (checked against its SHA256);
- ``wheels/``: pure-Python wheels, unzipped as they are (the reference implementation,
  icon_registration; its other imports are already on that machine);
- ``data/``, laid out as ../shared/data: the MONAI pair, the MRBrainTumor pair (bench/forward.py's
  inputs) and the SynthSeg label maps resampled onto the training box of the capture-range recipe
  (weights/training/carl-brain-3d-masked60.json: the shipped model's weights fine-tuned on that
  box with each image moved up to ±60 mm and cut to a field of view of 192 mm or more, as the
  translation sweep's heads are, the similarity taken where both images are valid): the same
  training code reads them and
  gets the same label tensors on that box (checked here map by map);
- ``train-config.json``: that recipe with ``data_folder`` pointed at ``data/`` (a training burst,
  started from the shipped weights, which are in the tree:
  ``python3 -m carlreg train --config .gpu-carry/train-config.json --device cuda --max-minutes 5``).

The total (tree + carry) is printed; the script fails over 60 MiB. Wheels are downloaded into
``build/gpu-carry`` (git-ignored, not carried); a package already packed from the same wheel is kept.

Usage: python bench/gpu_carry.py [--out .gpu-carry] [--reference icon_registration==1.1.9]
The device call: run(command="python3 bench/gpu_check.py --carry .gpu-carry --out $OUT",
carry=[".gpu-carry"], timeout_s=600)
"""
from __future__ import annotations

import argparse
import array
import hashlib
import io
import itertools
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
#: the limit the issue sets for the tree and the carry together (the device tool's is 64 MiB)
LIMIT_BYTES = 60 * 2**20
WHEEL_PLATFORM = (
    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
)
PAIRS = ("tiny_fixtures/monai_anatomical_pair", "tiny_fixtures/slicer_mrbraintumor")
LABEL_MAPS = "synthseg_label_maps"
#: the recipe of a burst: its box is the grid the label maps are resampled onto
TRAIN_RECIPE = REPO / "weights" / "training" / "carl-brain-3d-masked60.json"
#: bytes of one ELF64 relocation record (offset, info, addend)
RELA_RECORD = 24
MASK_64 = 2**64 - 1


class Segment(NamedTuple):
    """A byte range ``[start, end)`` of a shared library and how it is compressed:
    ``plain``, ``x86`` (BCJ filter: machine code) or ``columns`` (24-byte records split into columns)."""

    start: int
    end: int
    kind: str


# --- sizes -----------------------------------------------------------------------------------

def tree_bytes(repo: Path) -> int:
    """Bytes of what travels as the working tree: tracked files and untracked files git does not ignore."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True,
    ).stdout
    paths = {repo / name.decode() for name in listing.split(b"\0") if name}
    return sum(path.lstat().st_size for path in paths if os.path.lexists(path))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist)."""
    return sum(path.lstat().st_size for path in Path(folder).rglob("*") if not path.is_dir())


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n / 2**20:.1f} MiB)"


def size_problem(tree: int, carry: int, limit: int = LIMIT_BYTES) -> Optional[str]:
    """The one-line error when tree + carry exceed ``limit`` bytes, else None."""
    if tree + carry <= limit:
        return None
    return (f"gpu-carry: tree {mb(tree)} + carry {mb(carry)} = {mb(tree + carry)}, "
            f"over the {limit / 2**20:.0f} MiB limit by {mb(tree + carry - limit)}")


# --- the shared library: ELF sections, segments, parts ----------------------------------------

def elf_sections(data: bytes) -> Dict[str, Tuple[int, int]]:
    """``{name: (file offset, size)}`` of a little-endian ELF64 file's sections that occupy file bytes."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("elf_sections(): expected a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entry_size) for i in range(count)]
    names_offset = headers[names_index][4]
    sections = {}
    for name_at, kind, _flags, _address, offset, size in headers:
        if kind == 8 or size == 0:  # SHT_NOBITS (.bss) has no bytes in the file
            continue
        start = names_offset + name_at
        sections[data[start:data.index(b"\0", start)].decode()] = (offset, size)
    return sections


def library_segments(data: bytes) -> List[Segment]:
    """Segments covering the whole library: ``.rela.dyn`` as columns, ``.text`` through BCJ, the rest plain."""
    special = []
    sections = elf_sections(data)
    for name, kind in ((".rela.dyn", "columns"), (".text", "x86")):
        if name in sections:
            offset, size = sections[name]
            if kind == "columns":
                size -= size % RELA_RECORD
            special.append(Segment(offset, offset + size, kind))
    segments, position = [], 0
    for segment in sorted(special):
        if segment.start > position:
            segments.append(Segment(position, segment.start, "plain"))
        segments.append(segment)
        position = segment.end
    if position < len(data):
        segments.append(Segment(position, len(data), "plain"))
    return segments


def _uint64(data: bytes) -> array.array:
    values = array.array("Q", data)
    if sys.byteorder != "little":  # the records are little-endian
        values.byteswap()
    return values


def _bytes(values: array.array) -> bytes:
    if sys.byteorder != "little":
        values = array.array("Q", values)
        values.byteswap()
    return values.tobytes()


def to_columns(records: bytes) -> bytes:
    """24-byte records (three little-endian uint64) as three columns, the first as differences
    (modulo 2**64); standard library only, as the GPU machine unpacks with it."""
    table = _uint64(records)
    first = table[0::3]
    differences = array.array("Q", (b - a & MASK_64 for a, b in zip(itertools.chain([0], first), first)))
    return _bytes(differences) + _bytes(table[1::3]) + _bytes(table[2::3])


def from_columns(columns: bytes) -> bytes:
    """The inverse of :func:`to_columns`."""
    values = _uint64(columns)
    count = len(values) // 3
    table = array.array("Q", bytes(len(columns)))
    table[0::3] = array.array("Q", (total & MASK_64 for total in itertools.accumulate(values[:count])))
    table[1::3], table[2::3] = values[count:2 * count], values[2 * count:]
    return _bytes(table)


def _filters(segment: Segment, preset: int) -> List[dict]:
    lzma2 = {"id": lzma.FILTER_LZMA2, "preset": preset | lzma.PRESET_EXTREME,
             "dict_size": max(2**20, min(192 * 2**20, segment.end - segment.start))}
    if segment.kind == "x86":  # BCJ with the segment's file offset: call targets as in the whole file
        return [{"id": lzma.FILTER_X86, "start_offset": segment.start}, lzma2]
    return [lzma2]


def pack_segment(data: bytes, segment: Segment, preset: int = 9) -> bytes:
    """One segment of ``data`` compressed as an .xz stream (its filters are recorded in the stream)."""
    raw = data[segment.start:segment.end]
    if segment.kind == "columns":
        raw = to_columns(raw)
    return lzma.compress(raw, format=lzma.FORMAT_XZ, filters=_filters(segment, preset))


def unpack_segments(parts: Sequence[bytes], segments: Sequence[Segment]) -> bytes:
    """The library from its compressed parts (in segment order)."""
    pieces = []
    for part, segment in zip(parts, segments):
        raw = lzma.decompress(part)
        pieces.append(from_columns(raw) if segment.kind == "columns" else raw)
    return b"".join(pieces)


# --- a package: pack from its wheel, unpack into a site folder ---------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_wheel(wheel: Path, target: Path, library: str, preset: int = 9) -> dict:
    """A binary wheel as ``target/`` (``python.tar.xz``, ``library.N.xz``, ``manifest.json``); returns the manifest.

    ``library`` is the path, inside the wheel, of its one large shared library.
    """
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(library)
        others = [(info, archive.read(info)) for info in archive.infolist() if info.filename != library and not info.is_dir()]
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target / "python.tar.xz", "w:xz", preset=9) as tar:
        for info, content in others:
            entry = tarfile.TarInfo(info.filename)
            entry.size, entry.mode = len(content), 0o644
            tar.addfile(entry, io.BytesIO(content))
    segments = library_segments(data)
    # the parts in parallel (lzma releases the GIL; the machine code dominates: a few minutes)
    with ThreadPoolExecutor(max_workers=min(len(segments), os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda segment: pack_segment(data, segment, preset), segments))
    for index, part in enumerate(parts):
        (target / f"library.{index}.xz").write_bytes(part)
    manifest = {"wheel": wheel.name, "wheel_sha256": _sha256(wheel.read_bytes()), "library": library,
                "library_sha256": _sha256(data), "segments": [list(s) for s in segments]}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def unpack_packed(source: Path, site: Path) -> None:
    """A folder written by :func:`pack_wheel`, installed into ``site`` (its library checked by SHA256)."""
    manifest = json.loads((source / "manifest.json").read_text())
    with tarfile.open(source / "python.tar.xz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python ≥ 3.12 and recent 3.9 releases
            tar.extractall(site, filter="data")
        else:
            tar.extractall(site)
    segments = [Segment(*s) for s in manifest["segments"]]
    parts = [(source / f"library.{i}.xz").read_bytes() for i in range(len(segments))]
    data = unpack_segments(parts, segments)
    if _sha256(data) != manifest["library_sha256"]:
        raise RuntimeError(f"unpack_packed(): {source.name}: the rebuilt {manifest['library']} does not match its SHA256")
    library = site / manifest["library"]
    library.parent.mkdir(parents=True, exist_ok=True)
    library.write_bytes(data)
    library.chmod(0o755)


def unpack_site(carry: Path, site: Path) -> None:
    """Everything importable in ``carry`` (pure-Python wheels, packed wheels) installed into ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:  # a pure-Python wheel is its site-packages layout
            archive.extractall(site)
    for manifest in sorted(carry.glob("*/manifest.json")):
        unpack_packed(manifest.parent, site)


# --- building the carry ----------------------------------------------------------------------

def download_wheel(requirement: str, folder: Path) -> Path:
    """``requirement`` (NAME==VERSION) as a CPython 3.12 manylinux x86-64 wheel in ``folder`` (no dependencies)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *WHEEL_PLATFORM, "-d", str(folder),
                    requirement], check=True)
    name, _, version = requirement.partition("==")
    prefix = f"{name.lower().replace('-', '_')}-{version}"
    chosen = [w for w in folder.glob("*.whl") if w.name.lower().startswith(prefix)]
    if len(chosen) != 1:
        raise RuntimeError(f"download_wheel(): expected one wheel for {requirement} in {folder}, found {[w.name for w in chosen]}")
    return chosen[0]


def installed_version(distribution: str) -> str:
    """The version installed here (the carry takes what the CPU tests run with)."""
    from importlib.metadata import version

    return version(distribution)


def pack_if_changed(wheel: Path, target: Path, library: str) -> bool:
    """:func:`pack_wheel` unless ``target`` already holds this wheel packed; True if it packed."""
    manifest = target / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("wheel_sha256") == _sha256(wheel.read_bytes()):
        return False
    shutil.rmtree(target, ignore_errors=True)
    pack_wheel(wheel, target, library)
    return True


def copy_pairs(shared: Path, data: Path) -> None:
    """The tiny fixture pairs, byte for byte, at their ../shared/data paths."""
    for relative in PAIRS:
        (data / relative).mkdir(parents=True, exist_ok=True)
        for path in sorted((shared / relative).iterdir()):
            shutil.copyfile(path, data / relative / path.name)


def reduce_label_maps(source: Path, target: Path, shape: Sequence[int], spacing_mm: float) -> int:
    """Each ``training_seg_NN.nii.gz`` resampled onto the training box (int16), plus ``labels_table.txt``.

    :func:`carlreg.data.load_label_map` gives the same tensor for the copy as for the original on
    that grid (the copy's centre is the original's): checked for each map. Returns the count.
    """
    import SimpleITK as sitk
    import torch

    from carlreg.data import label_map_image, load_label_map

    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "labels_table.txt", target / "labels_table.txt")
    shape = tuple(int(n) for n in shape)
    maps = sorted(source.glob("training_seg_*.nii.gz"))
    for path in maps:
        reduced = sitk.Cast(label_map_image(path, shape, spacing_mm), sitk.sitkInt16)
        sitk.WriteImage(reduced, str(target / path.name), True)
        if not torch.equal(load_label_map(target / path.name, shape, spacing_mm), load_label_map(path, shape, spacing_mm)):
            raise RuntimeError(f"reduce_label_maps(): {path.name} reads differently once reduced")
    return len(maps)


def write_train_config(recipe: Path, target: Path, data_folder: str) -> dict:
    """The recipe with ``data_folder`` in the carry and a fresh output named as the recipe
    (bench/gpu_session.sh names its runs so); its starting weights kept when they are a file of the
    tree (shipped weights), else dropped (a run's checkpoint stays on the machine that trained):
    then a burst from scratch."""
    config = json.loads(recipe.read_text())
    init_from = config.get("init_from", "")
    tracked = bool(init_from) and (REPO / init_from).is_file() and not init_from.startswith("weights/training/")
    config.update(data_folder=data_folder, output=f"runs/{recipe.stem}", init_from=init_from if tracked else "")
    target.write_text(json.dumps(config, indent=2) + "\n")
    return config


def build_carry(out: Path, reference: str, downloads: Path) -> None:
    """Everything the module docstring lists, in ``out``."""
    simpleitk = download_wheel(f"SimpleITK=={installed_version('SimpleITK')}", downloads)
    pack_if_changed(simpleitk, out / "simpleitk", "SimpleITK/_SimpleITK.abi3.so")
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    shutil.copy(download_wheel(reference, downloads), wheels)
    data = out / "data"
    copy_pairs(SHARED, data)
    recipe = json.loads(TRAIN_RECIPE.read_text())
    reduce_label_maps(SHARED / LABEL_MAPS, data / LABEL_MAPS, recipe.get("box_shape") or recipe["input_shape"],
                      recipe["spacing_mm"])
    relative = os.path.relpath(data / LABEL_MAPS, REPO)
    write_train_config(TRAIN_RECIPE, out / "train-config.json", relative)


def breakdown(out: Path) -> List[Tuple[str, int]]:
    """``(name, bytes)`` of each top-level entry of the carry."""
    return [(path.name, folder_bytes(path) if path.is_dir() else path.stat().st_size) for path in sorted(out.iterdir())]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".gpu-carry"), help="the carry folder (git-ignored)")
    parser.add_argument("--reference", default="icon_registration==1.1.9", help="the reference implementation's wheel")
    parser.add_argument("--downloads", default=str(REPO / "build" / "gpu-carry"), help="where wheels are downloaded")
    parser.add_argument("--check-only", action="store_true", help="only measure an existing carry")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if not args.check_only:
        build_carry(out, args.reference, Path(args.downloads))
    for name, size in breakdown(out):
        print(f"  {name:<20} {size:>12,d} bytes")
    tree, carry = tree_bytes(REPO), folder_bytes(out)
    problem = size_problem(tree, carry)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    print(f"gpu-carry: tree {mb(tree)} + carry {mb(carry)} = {mb(tree + carry)}, "
          f"{mb(LIMIT_BYTES - tree - carry)} under the {LIMIT_BYTES / 2**20:.0f} MiB limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
