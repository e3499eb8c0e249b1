"""Dataset specs: label tables, scan discovery, folds exactly as the references define them."""
import json

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


# ----------------------------------------------------------------------------- a description cannot lie
def _description(tmp_path, **changes):
    """A dataset.json (no scans: the description alone is read) with `changes` over a valid one."""
    root = tmp_path / "own"
    root.mkdir(exist_ok=True)
    description = {"name": "TOY", "modality": "MR", "image_dir": "images", "labels": {"BG": 0, "C1": 1, "C2": 2}}
    description.update(changes)
    (root / "dataset.json").write_text(json.dumps(description))
    return root


REFUSED = [
    ({"labels": {"BG": 0, "C1": 257, "C2": 2}}, "labels", "the id of 'C1' is 257; ids must be 0-255"),
    ({"labels": {"BG": 0, "C1": -1, "C2": 2}}, "labels", "the id of 'C1' is -1"),
    ({"labels": {"BG": 0, "C1": 1, "C2": 1}}, "labels", "'C1' and 'C2' both have id 1"),
    ({"labels": {"BG": 0, "liver": 1, "LIVER": 2}}, "labels", "'liver' and 'LIVER' differ only in case"),
    ({"labels": {"BG": 0, "C1": "3"}}, "labels", "the id of 'C1' is '3', not a whole number"),
    ({"labels": {"BG": 0, "C1": 2.5}}, "labels", "the id of 'C1' is 2.5, not a whole number"),
    ({"labels": {"BG": 0, **{f"C{i}": i for i in range(1, 10001)}}}, "labels", "10001 classes; at most 256"),
    ({"labels": {"BG": 0, "C" * 5000: 1}}, "labels", "a class name of 5000 characters"),
    ({"labels": {"BG": 0, **{f"C{i}": i for i in range(1, 200)}}}, "eval_labels",
     "199 classes evaluated together: run folder names"),
    ({"eval_labels": ["1"]}, "eval_labels", "a class id is '1', not a whole number"),
    ({"eval_labels": [7]}, "eval_labels", "7 is not a class id of labels (1 C1, 2 C2"),
    ({"table_order": [2, 2]}, "table_order", "class id 2 listed twice"),
    ({"setting2_groups": [[1, 2], [2]]}, "setting2_groups", "class 2 is in group 0 and group 1"),
    ({"folds": [[1, 2, 2], [3, 4]]}, "folds", "fold 0 lists scan 2 twice"),
    ({"folds": [[1, 2], [2, 3]]}, "folds", "scan 2 is in the test blocks of fold 0 and fold 1"),
    ({"folds": [[1, 2], ["3", 4]]}, "folds", "a scan id of fold 1 is '3', not a whole number"),
    ({"folds": [[1, 2], [3, 4]], "n_folds": 3}, "n_folds", "is 3 but folds lists 2 test blocks"),
    ({"expected_ids": [1, 2, 2.5]}, "expected_ids", "a scan id is 2.5, not a whole number"),
    ({"raw_label_values": {"0": 0, "2.5": 1}}, "raw_label_values", "the file value '2.5' is not a whole number"),
    ({"raw_label_values": {"0": 0, "200": 9}}, "raw_label_values", "file value 200 maps to 9"),
    ({"image_dir": "../OTHER/images"}, "image_dir", "'../OTHER/images' leaves the dataset folder"),
    ({"image_dir": "/elsewhere/images"}, "image_dir", "'/elsewhere/images' is an absolute path"),
    ({"image_dir": "../OTHER", "allow_outside": "yes"}, "allow_outside", "must be true or false"),
    ({"defaults": {"n_sv": "../x"}}, "defaults.n_sv", "the supervoxel size is '../x', not a whole number"),
    ({"preprocessing": {"in_plane": "spacing", "spacing": ["1.25", 1.25]}}, "preprocessing.spacing", "not a number"),
    ({"preprocessing": {"in_plane": "spacing", "spacing": [1.25, 1.25], "size": 256.5}}, "preprocessing.size",
     "size is 256.5, not a whole number"),
]


@pytest.mark.parametrize("changes, field, problem", REFUSED, ids=[f"{f}: {p[:30]}" for _, f, p in REFUSED])
def test_a_description_that_would_mislead_is_refused_naming_the_file_and_field(tmp_path, changes, field, problem):
    root = _description(tmp_path, **changes)
    with pytest.raises(DataError) as err:
        load_spec("TOY", root)
    message = str(err.value)
    assert message.startswith(f"{root / 'dataset.json'}: {field}") and problem in message, message
    assert len(message) < 600                      # a 10k-class table is one short line, not its listing


def test_a_key_written_twice_or_misspelt_is_refused(tmp_path):
    root = _description(tmp_path)
    (root / "dataset.json").write_text('{"name": "TOY", "modality": "MR", "labels": {"BG": 0, "C1": 1, "C1": 2}}')
    with pytest.raises(DataError, match=r"dataset.json: labels: the key 'C1' appears twice"):
        load_spec("TOY", root)
    _description(tmp_path, eval_label=[1])
    with pytest.raises(ValueError, match=r"dataset.json: unknown key 'eval_label' \(did you mean 'eval_labels'\?\)"):
        load_spec("TOY", root)


def test_what_a_description_may_say(tmp_path):
    """Whole numbers written 3.0, CMR-style raw values, folders outside with the flag, explicit folds."""
    spec = load_spec("TOY", _description(tmp_path, labels={"BG": 0, "C1": 1.0, "C2": 255}, eval_labels=[255],
                                         raw_label_values={"0": 0, "200": 1, "1000": 255},
                                         folds=[[1, 2], [3, 4, 5]], expected_ids=[1, 2, 3, 4, 5]))
    assert spec.labels == {"BG": 0, "C1": 1, "C2": 255} and spec.eval_labels == (255,) and spec.n_folds == 2
    assert spec.map_labels(np.array([[[0, 200, 1000]]])).tolist() == [[[0, 1, 255]]]
    assert load_spec("TOY", _description(tmp_path, image_dir="../shared/images", allow_outside=True)).image_dir \
        == "../shared/images"
