"""Dataset specs: label tables, scan discovery, folds exactly as the references define them."""
import numpy as np
import pytest

from data.core.io import DataError, write_volume
from data.core.specs import load_spec
from tests.conftest import requires_chaos, requires_cmr, CHAOS_DIR, CMR_DIR
from tests.helpers import GEOMETRY, write_dataset

CHAOS_IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)


def test_chaos_folds_qnet_scheme_match_reference_table():
    spec = load_spec("CHAOST2")
    # adnet_qnet.md §5.1: test ids, ADNet support (the last one), Q-Net support (supp_idx=2)
    table = [((1, 2, 3, 5, 8), 8, 3), ((8, 10, 13, 15, 19), 19, 13), ((19, 20, 21, 22, 31), 31, 21),
             ((31, 32, 33, 34, 36), 36, 33), ((1, 36, 37, 38, 39), 39, 37)]
    for k, (test, adnet_support, qnet_support) in enumerate(table):
        fold = spec.fold(CHAOS_IDS, k, "qnet")
        assert fold.test_ids == test
        assert fold.support_and_queries(-1)[0] == adnet_support
        assert fold.support_and_queries(2)[0] == qnet_support
        assert len(fold.train_ids) == 15 and not set(fold.train_ids) & set(test)


def test_chaos_folds_alpnet_scheme_support_is_next_scan():
    spec = load_spec("CHAOST2")
    supports = [spec.fold(CHAOS_IDS, k, "alpnet").support_and_queries(-1) for k in range(5)]
    assert supports[0] == (8, (1, 2, 3, 5))
    assert supports[4] == (1, (36, 37, 38, 39))   # the support wraps around to the first scan


def test_cmr_folds_match_reference_table():
    spec = load_spec("CMR")
    ids = tuple(range(1, 36))
    expected = [(tuple(range(1, 9)), 8, 3), (tuple(range(8, 16)), 15, 10), (tuple(range(15, 23)), 22, 17),
                (tuple(range(22, 30)), 29, 24), ((1,) + tuple(range(29, 36)), 35, 30)]
    for k, (test, last, third) in enumerate(expected):
        fold = spec.fold(ids, k, "qnet")
        assert fold.test_ids == test
        assert fold.support_and_queries(-1)[0] == last and fold.support_and_queries(2)[0] == third
        assert len(fold.train_ids) == 27


def test_cmr_raw_labels_are_mapped_and_unknown_values_rejected():
    spec = load_spec("CMR")
    raw = np.array([[[0, 200], [500, 600]]], dtype=np.float64)
    assert spec.map_labels(raw).tolist() == [[[0, 1], [2, 3]]]
    with pytest.raises(DataError, match=r"values \[7\.0\] that are not in the CMR label table"):
        spec.map_labels(np.array([[[0, 7]]], dtype=np.float64), "label_9.nii.gz")


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(DataError, match="unknown dataset 'CHAOS2'.*CHAOST2.*Did you mean CHAOST2"):
        load_spec("CHAOS2")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_spec("CHAOST2").scan_ids(tmp_path / "nowhere")


def test_image_without_label_is_reported(tmp_path):
    root = write_dataset(tmp_path / "toy", ids=(1, 2, 3, 4, 5, 6))
    (root / "images" / "label_4.nii.gz").unlink()
    spec = load_spec("TOY", root)
    with pytest.raises(DataError, match="image_4.nii.gz needs label_4.nii.gz"):
        spec.scan_ids(root)


def test_generic_dataset_json_and_ids_sorted_numerically(tmp_path):
    root = write_dataset(tmp_path / "toy", ids=(10, 2, 1, 33, 4, 5))
    spec = load_spec("toy", root)           # the name, in any case, as dataset.json says
    assert spec.name == "TOY" and spec.labels == {"BG": 0, "C1": 1, "C2": 2}
    assert spec.scan_ids(root) == (1, 2, 4, 5, 10, 33)


def test_out_of_range_fold_and_supp_idx():
    spec = load_spec("CHAOST2")
    with pytest.raises(ValueError, match="eval_fold=5 is out of range"):
        spec.fold(CHAOS_IDS, 5)
    with pytest.raises(ValueError, match="supp_idx=7 is out of range"):
        spec.fold(CHAOS_IDS, 0).support_and_queries(7)


@requires_chaos
def test_real_chaos_ids_and_label_values():
    spec = load_spec("CHAOST2")
    assert spec.scan_ids(CHAOS_DIR) == CHAOS_IDS


@requires_cmr
def test_real_cmr_ids():
    assert load_spec("CMR").scan_ids(CMR_DIR) == tuple(range(1, 36))
