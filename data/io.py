"""NIfTI volumes on disk: read with their geometry, write atomically.

Arrays follow SimpleITK's order, (z, y, x) = (slice, row, column). Geometry follows SimpleITK's
conventions: spacing and origin in (x, y, z) millimetres, direction as 9 row-major floats in the
LPS world frame.

Every writer in the project goes through `write_volume`, which writes to a temporary name in the
target folder and renames it into place, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk


class DataError(RuntimeError):
    """A problem with the user's data: a missing, unreadable or inconsistent file.

    The message always names the file and says how to fix the problem.
    """


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
    """Read a 3-D NIfTI file as a (z, y, x) array and its geometry.

    Raises `DataError` naming the file if it is missing, unreadable or not 3-D.
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
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, Geometry.of(image)


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
