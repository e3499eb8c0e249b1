"""NIfTI volumes on disk: read with their geometry, write atomically.

Arrays follow SimpleITK's order, (z, y, x) = (slice, row, column). Geometry follows SimpleITK's
conventions: spacing and origin in (x, y, z) millimetres, direction as 9 row-major floats in the
LPS world frame.

Every writer in the project goes through `write_volume`, which writes to a temporary name in the
target folder and renames it into place, so an interrupted run never leaves a half-written file.

Every reader goes through `read_volume`, which refuses damaged files: SimpleITK's NIfTI reader
(niftilib) zero-fills a file that ends early and reads NaN and infinite voxels as 0, silently, so
NIfTI files are also read with nibabel, which raises on a short file and returns the stored values.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from data.core.errors import ConfigError, DataError, OutputError, UserError, output_error  # noqa: F401 - callers take the errors with the I/O


@dataclass(frozen=True)
class Geometry:
    """Where a (z, y, x) voxel array sits in the world (SimpleITK conventions)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in self.direction))
        return image

    def matches(self, other: "Geometry", rtol: float = 1e-4, atol: float = 1e-3) -> bool:
        return all(
            np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol)
            for a, b in ((self.spacing, other.spacing), (self.origin, other.origin),
                         (self.direction, other.direction))
        )

    def describe(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        org = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"spacing ({sp}) mm, origin ({org})"


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")


def read_volume(path: str | os.PathLike, dtype=None, what: str = "volume") -> tuple[np.ndarray, Geometry]:
    """Read a 3-D volume (NIfTI, or any format SimpleITK reads) as a (z, y, x) array and its geometry.

    The array and the geometry are SimpleITK's. Raises `DataError` naming the file if it is missing,
    unreadable, not 3-D, truncated, or stores NaN or infinite voxels: every reader of scans, labels
    and pseudolabels comes through here, so a damaged file never turns into zeros downstream.
    """
    path = Path(path)
    _require_file(path, what)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise DataError(f"cannot read {what} {path}: the file is corrupt or not NIfTI "
                        f"({str(err).strip().splitlines()[-1]}). Re-create or re-download it.") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{what} {path} is {image.GetDimension()}-D with "
                        f"{image.GetNumberOfComponentsPerPixel()} component(s); a single-channel 3-D "
                        f"volume is expected")
    array = sitk.GetArrayFromImage(image)
    _require_finite(_stored_nifti_voxels(path, what) if _is_nifti(path) else array, path, what)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, Geometry.of(image)


def _is_nifti(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith((".nii", ".nii.gz"))


def _stored_nifti_voxels(path: Path, what: str) -> np.ndarray:
    """The voxel values as stored in a NIfTI file (unscaled, NaN and inf kept), read with nibabel.

    This is the integrity check of `read_volume`: nibabel raises where SimpleITK zero-fills (a
    compressed stream that ends early, fewer voxel bytes than the header declares).
    """
    try:
        return np.asanyarray(nib.load(str(path), mmap=False).dataobj.get_unscaled())
    except EOFError:
        reason = "its compressed stream ends early"
    except (OSError, ValueError, zlib.error, ImageFileError) as err:   # nibabel's many failure types
        reason = str(err).strip().splitlines()[0]
        short = re.match(r"Expected (\d+) bytes, got (\d+) bytes", reason)     # nibabel's short read
        if short:
            reason = (f"it holds {short.group(2)} voxel bytes where its header declares "
                      f"{short.group(1)}")
    raise DataError(f"cannot read {what} {path}: the file is truncated or corrupt ({reason}). Re-create it "
                    f"(re-run the step that wrote it) or copy it again from its source.")


def _require_finite(values: np.ndarray, path: Path, what: str) -> None:
    """Raise `DataError` with the counts if float `values` hold NaN or infinite voxels."""
    if not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all():
        return
    n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    raise DataError(f"{path}: {n_nan} NaN and {n_inf} infinite value(s) in this {what} (SimpleITK would "
                    f"read them as 0); re-export the file, or re-run the preprocessing that wrote it")


def read_geometry(path: str | os.PathLike, what: str = "volume") -> tuple[tuple[int, int, int], Geometry]:
    """Read only the header: the (z, y, x) shape and the geometry."""
    path = Path(path)
    _require_file(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DataError(f"cannot read the header of {what} {path}: the file is corrupt or not NIfTI") from None
    size = reader.GetSize()
    if len(size) != 3:
        raise DataError(f"{what} {path} is {len(size)}-D; a 3-D volume is expected")
    geometry = Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    return (size[2], size[1], size[0]), geometry


MIN_FREE_BYTES = 64 * 2 ** 20      # less than this free and a run's records and reports may not fit


def check_output_folder(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before anything is written, an output folder that cannot be created or written (a
    read-only file system, no write permission) or whose disk is full: the same `OutputError` a
    failed write gives (data.core.errors.output_error). Only looks: creates nothing."""
    folder = Path(folder).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise OutputError(f"cannot write {what} {folder}: {existing} is not a folder; choose another output folder")
    code = None
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EACCES
    elif shutil.disk_usage(existing).free < MIN_FREE_BYTES:
        code = errno.ENOSPC
    if code is not None:
        raise output_error(OSError(code, os.strerror(code), str(folder)), what)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".partial" + suffix,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry | None = None) -> Path:
    """Write a (z, y, x) array as NIfTI with the given geometry, atomically."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"write_volume expects a 3-D (z, y, x) array, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    if geometry is not None:
        geometry.apply_to(image)
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path


# ----------------------------------------------------------------------------- names from user data
# Class and dataset names reach file and folder names (predictions, overlays, run folders), so they
# are restricted to characters that cannot form a path: letters, digits, '_', '-', '+', '.' and
# inner spaces ("right kidney"), starting with a letter, digit or '_' (so never '.' or '..').
SAFE_NAME_RULE = ("1-64 characters from letters, digits, spaces, '_', '-', '+' and '.', starting with a "
                  "letter, digit or '_' and not ending with a space")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.+ -]{0,62}[A-Za-z0-9_.+-])?$")


def is_safe_name(name: str) -> bool:
    return isinstance(name, str) and bool(_SAFE_NAME_RE.match(name))


def check_safe_name(name, what: str, source: str) -> str:
    """`name` unchanged if it can be part of a file name; otherwise a `DataError` naming it,
    where it comes from, and the rule."""
    if not is_safe_name(name):
        raise DataError(f"{source}: {what} {name!r} cannot be used in file names; names must be "
                        f"{SAFE_NAME_RULE}. Rename it there.")
    return name


def safe_child_path(folder: str | os.PathLike, filename: str) -> Path:
    """`folder / filename`, refusing a file name that would resolve outside `folder`.

    Every output file whose name is built from user data (class names, dataset names, query file
    names) goes through here: a name holding a path separator, '..', or an absolute path is an
    error, never a write elsewhere."""
    folder = Path(folder)
    name = str(filename)
    candidate = folder / name
    inside = (name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
              and candidate.resolve().parent == folder.resolve())
    if not inside:
        raise DataError(f"refusing to write {name!r}: the file name would leave its folder {folder} "
                        f"(a class or file name with '/', '..' or an absolute path). Names of classes "
                        f"and datasets must be {SAFE_NAME_RULE}.")
    return candidate


# ----------------------------------------------------------------------------- JSON
def _json_text(obj, level: int = 0) -> str:
    """JSON with one key per line, but lists of numbers and strings kept on one line."""
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_json_text(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(inner + _json_text(v, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write a human-readable JSON file atomically (provenance sidecars, manifests, dataset.json)."""
    with atomic_path(path) as tmp:
        tmp.write_text(_json_text(obj) + "\n")
