"""The synthetic phantoms: deterministic scans in the real layout, regenerated when their recipe changes."""
import json

import numpy as np
import pytest

from data.core.io import read_volume
from data.phantoms import GENERATOR_VERSION, MANIFEST, generate_phantoms, make_phantom


def test_a_scan_is_a_function_of_seed_and_id():
    image, label = make_phantom(3, size=48, slices=10)
    again_image, again_label = make_phantom(3, size=48, slices=10)
    other_image, _ = make_phantom(4, size=48, slices=10)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    assert not np.array_equal(image, other_image)
    assert image.shape == label.shape == (10, 48, 48)
    assert image.dtype == np.float32 and label.dtype == np.uint8


@pytest.mark.parametrize("scan_id", [1, 2, 3])
def test_every_organ_is_wide_enough_for_a_stride_8_encoder(scan_id):
    """The demo's Dice depends on it: at 128 x 128 each organ spans at least 4 feature cells somewhere."""
    _, label = make_phantom(scan_id, size=128, slices=24)
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    for organ in (1, 2, 3, 4):
        widest = (label == organ).sum(axis=(1, 2)).max()
        assert 2 * np.sqrt(widest / np.pi) >= 32, f"organ {organ} of scan {scan_id}: {widest} px at most"


def _image_mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in (root / "synth_normalized").glob("image_*.nii.gz")}


def test_generation_writes_the_real_layout_and_keeps_matching_scans(tmp_path):
    root = tmp_path / "SYNTH"
    written = generate_phantoms(root, n_scans=6, size=32, slices=6, n_sv=100, progress=False)
    assert len(written) == 6
    for scan_id in range(1, 7):
        image, geometry = read_volume(root / "synth_normalized" / f"image_{scan_id}.nii.gz")
        label, _ = read_volume(root / "synth_normalized" / f"label_{scan_id}.nii.gz")
        supervoxels, _ = read_volume(root / "supervoxels_100" / f"superpix-MIDDLE_{scan_id}.nii.gz")
        assert image.shape == label.shape == supervoxels.shape
        assert geometry.spacing == (2.5, 2.5, 8.0)
    assert json.loads((root / MANIFEST).read_text())["generator_version"] == GENERATOR_VERSION

    before = _image_mtimes(root)
    assert generate_phantoms(root, n_scans=6, size=32, slices=6, n_sv=100, progress=False) == []
    assert _image_mtimes(root) == before


@pytest.mark.parametrize("spoil", ["other size", "no manifest", "corrupt manifest", "old version"])
def test_phantoms_of_another_recipe_are_rewritten_not_mixed(tmp_path, caplog, spoil):
    root = tmp_path / "SYNTH"
    generate_phantoms(root, n_scans=6, size=32, slices=6, progress=False, supervoxels=False)
    size = 32
    if spoil == "other size":
        size = 40
    elif spoil == "no manifest":
        (root / MANIFEST).unlink()
    elif spoil == "corrupt manifest":
        (root / MANIFEST).write_text("{not json")
    else:
        recipe = json.loads((root / MANIFEST).read_text())
        (root / MANIFEST).write_text(json.dumps({**recipe, "generator_version": GENERATOR_VERSION - 1}))
    caplog.clear()

    written = generate_phantoms(root, n_scans=6, size=size, slices=6, progress=False, supervoxels=False)

    assert len(written) == 6
    assert "rewritten" in caplog.text
    image, _ = read_volume(root / "synth_normalized" / "image_1.nii.gz")
    assert image.shape == (6, size, size)
    assert json.loads((root / MANIFEST).read_text())["size"] == size


def test_a_rewrite_covers_scans_above_the_new_count(tmp_path):
    root = tmp_path / "SYNTH"
    generate_phantoms(root, n_scans=7, size=32, slices=6, progress=False, supervoxels=False)
    written = generate_phantoms(root, n_scans=6, size=40, slices=6, progress=False, supervoxels=False)
    assert len(written) == 7
    image, _ = read_volume(root / "synth_normalized" / "image_7.nii.gz")
    assert image.shape == (6, 40, 40)
