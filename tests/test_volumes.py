"""Volume store: read once, z-score, map labels, reject inconsistent files."""
import numpy as np
import pytest

from data.core.io import DataError, write_volume
from data.core.specs import load_spec
from dataloaders.volumes import VolumeStore
from tests.conftest import requires_cmr, CMR_DIR
from tests.helpers import GEOMETRY, write_dataset


def test_scan_is_zscored_per_volume_and_cached(tmp_path):
    root = write_dataset(tmp_path / "toy")
    store = VolumeStore(load_spec("TOY", root), root)
    scan = store.scan(3)
    assert scan.image.dtype == np.float32
    assert abs(scan.image.mean()) < 1e-4 and abs(scan.image.std() - 1) < 1e-3
    assert store.scan(3) is scan   # read once
    assert set(np.unique(scan.label)) <= {0, 1, 2}


def test_dataset_normalisation_uses_one_mean_and_std(tmp_path):
    root = write_dataset(tmp_path / "toy")
    store = VolumeStore(load_spec("TOY", root), root, normalize="dataset", stats_ids=(1, 2))
    raw1 = store._raw_image(1)[0].astype(np.float64)
    raw2 = store._raw_image(2)[0].astype(np.float64)
    both = np.concatenate([raw1.ravel(), raw2.ravel()])
    np.testing.assert_allclose(store.scan(1).image, (raw1 - both.mean()) / both.std(), rtol=1e-4, atol=1e-4)


def test_raw_label_values_are_mapped_on_load(tmp_path):
    root = write_dataset(tmp_path / "toy", raw_values={0: 0, 200: 1, 500: 2})
    store = VolumeStore(load_spec("TOY", root), root)
    assert set(np.unique(store.scan(1).label)) == {0, 1, 2}


def test_image_label_shape_mismatch(tmp_path):
    root = write_dataset(tmp_path / "toy")
    write_volume(root / "images" / "label_2.nii.gz", np.zeros((8, 30, 32)), GEOMETRY)
    store = VolumeStore(load_spec("TOY", root), root)
    with pytest.raises(DataError, match=r"label_2.nii.gz has shape \(8, 30, 32\).*image_2.nii.gz has \(8, 32, 32\)"):
        store.scan(2)


def test_wrong_label_values_and_corrupt_file(tmp_path):
    root = write_dataset(tmp_path / "toy")
    write_volume(root / "images" / "label_1.nii.gz", np.full((8, 32, 32), 9.0), GEOMETRY)
    (root / "images" / "image_3.nii.gz").write_bytes(b"not a nifti file")
    store = VolumeStore(load_spec("TOY", root), root)
    with pytest.raises(DataError, match=r"label_1.nii.gz contains values \[9.0\]"):
        store.scan(1)
    with pytest.raises(DataError, match="cannot read .*image_3.nii.gz"):
        store.scan(3)


def test_missing_pseudolabels_say_how_to_make_them(tmp_path):
    root = write_dataset(tmp_path / "toy", with_supervoxels=False)
    store = VolumeStore(load_spec("TOY", root), root)
    with pytest.raises(DataError, match="python -m data.pseudolabels"):
        store.pseudolabels(1, "supervoxels_100")


@requires_cmr
def test_real_cmr_labels_are_mapped_to_class_ids():
    store = VolumeStore(load_spec("CMR"), CMR_DIR)
    scan = store.scan(2)
    assert set(np.unique(scan.label)) == {0, 1, 2, 3}
    # scan 2 in classmap_200: LV-MYO 1-10, LV-BP 0-10, RV 2-10 (preprocessing.md §9.2)
    assert scan.slices_with(2).min() == 0 and scan.slices_with(3).min() == 2
