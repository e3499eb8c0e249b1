"""Supervoxel episode sampler: pair rules, size rules, setting-2 exclusion, determinism."""
import numpy as np
import pytest

from data.core.io import DataError
from dataloaders.episodes import collate_episodes
from data.core.specs import load_spec
from dataloaders.supervoxel_episodes import SupervoxelEpisodes, build_pair_table, excluded_slices, slice_counts
from dataloaders.volumes import VolumeStore
from tests.helpers import write_dataset


def _volume(z_lists, size=20, shape=(12, 20, 20)):
    """Pseudolabel volume: id k occupies a size x size square on the slices in z_lists[k-1]."""
    v = np.zeros(shape, np.int32)
    for k, zs in enumerate(z_lists, start=1):
        for z in zs:
            v[z, :size, :size] = k
    return v


def test_slice_counts():
    ids, counts = slice_counts(_volume([[0, 1], [3]], size=4))
    assert ids.tolist() == [1, 2] and counts[0, :2].tolist() == [16, 16] and counts[1, 3] == 16


def test_adnet_pairs_are_neighbours_in_the_slice_list():
    # id 1 on slices 2, 3 and 7 (cut by the mask): ADNet pairs (2,3) and (3,7)
    table = build_pair_table(0, _volume([[2, 3, 7]]), np.zeros(12, bool), "adnet", min_size=200)
    assert sorted(zip(table.z_first.tolist(), table.z_second.tolist())) == [(2, 3), (3, 7)]
    np.testing.assert_allclose(table.weights, [0.5, 0.5])


def test_qnet_pairs_are_adjacent_in_z():
    table = build_pair_table(0, _volume([[2, 3, 7]]), np.zeros(12, bool), "qnet", min_size=200,
                             qnet_set_order=False)
    assert list(zip(table.z_first.tolist(), table.z_second.tolist())) == [(2, 3)]


def test_min_size_adnet_tests_first_slice_qnet_either():
    v = np.zeros((4, 20, 20), np.int32)
    v[0, :5, :5] = 1        # 25 px
    v[1, :20, :20] = 1      # 400 px
    adnet = build_pair_table(0, v, np.zeros(4, bool), "adnet", min_size=200)
    qnet = build_pair_table(0, v, np.zeros(4, bool), "qnet", min_size=200)
    assert len(adnet) == 0 and len(qnet) == 1


def test_qnet_set_order_splits_runs_as_the_reference():
    # slices 30..39 minus nothing: Python's set order [32..39, 30, 31] splits (31, 32) off
    v = _volume([list(range(30, 40))], shape=(40, 20, 20))
    ref = build_pair_table(0, v, np.zeros(40, bool), "qnet", 200, qnet_set_order=True)
    clean = build_pair_table(0, v, np.zeros(40, bool), "qnet", 200, qnet_set_order=False)
    assert order_is_split(ref) and len(clean) == 9
    # runs are drawn uniformly: the 2-slice run (30, 31) gets probability 1/2
    assert ref.weights[ref.z_first.tolist().index(30)] == pytest.approx(0.5)


def order_is_split(table):
    return (31, 32) not in list(zip(table.z_first.tolist(), table.z_second.tolist()))


def test_setting2_exclusion_any_and_all():
    label = np.zeros((4, 4, 4), np.uint8)
    label[1, 0, 0] = 2
    label[2, 0, 0], label[2, 1, 1] = 2, 3
    assert excluded_slices(label, [2, 3], "any").tolist() == [False, True, True, False]
    assert excluded_slices(label, [2, 3], "all").tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="'any' or 'all'"):
        excluded_slices(label, [2], "some")


def test_episodes_are_a_function_of_seed_and_index(tmp_path):
    root = write_dataset(tmp_path / "toy")
    store = VolumeStore(load_spec("TOY", root), root)
    ds = SupervoxelEpisodes(store, (1, 2, 3), "supervoxels_100", min_size=20, seed=5)
    a, b = ds[17], ds[17]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(ds[18]["query_images"], a["query_images"])
    batch = collate_episodes([ds[i] for i in range(4)]).to("cpu").check()
    assert batch.support_images.shape == (4, 1, 3, 32, 32) and batch.query_labels.shape == (4, 1, 32, 32)
    assert set(np.unique(batch.support_masks.numpy())) <= {0.0, 1.0}


def test_setting2_removes_training_slices_with_test_classes_mapped_from_raw(tmp_path):
    root = write_dataset(tmp_path / "toy", raw_values={0: 0, 200: 1, 500: 2})
    store = VolumeStore(load_spec("TOY", root), root)
    ds = SupervoxelEpisodes(store, (1, 2), "supervoxels_100", min_size=20, setting=2, test_labels=(1,),
                            exclude_rule="any", augment=None, seed=0)
    for table in ds.tables:
        excluded = excluded_slices(store.scan(table.scan_id).label, (1,), "any")
        assert not excluded[table.z_first].any() and not excluded[table.z_second].any()


def test_use_gt_trains_on_labels_without_test_classes(tmp_path):
    root = write_dataset(tmp_path / "toy")
    store = VolumeStore(load_spec("TOY", root), root)
    ds = SupervoxelEpisodes(store, (1, 2), "supervoxels_100", min_size=20, use_gt=True, test_labels=(1,))
    assert {int(c) for t in ds.tables for c in t.classes} == {2}


def test_no_valid_pair_is_a_clear_error(tmp_path):
    root = write_dataset(tmp_path / "toy")
    store = VolumeStore(load_spec("TOY", root), root)
    with pytest.raises(DataError, match="no training episode can be drawn"):
        SupervoxelEpisodes(store, (1, 2), "supervoxels_100", min_size=10 ** 6)
