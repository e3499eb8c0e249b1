"""Superpixel episode sampler (SSL-ALPNet, DSPNet): episode semantics, id draws, exclusion, determinism."""
import numpy as np
import pytest

from data.core.io import DataError, write_volume
from dataloaders.augment import AugmentParams
from dataloaders.episodes import collate_episodes
from data.core.specs import load_spec
from dataloaders.superpixel_episodes import SuperpixelEpisodes
from dataloaders.supervoxel_episodes import excluded_slices
from dataloaders.volumes import VolumeStore
from tests.helpers import GEOMETRY, write_dataset

SHAPE = (8, 32, 32)
FOLDER = "superpixels_400"
IDENTITY = AugmentParams(gamma=(1.0, 1.0), rotate=0.0, shift=0.0, shear=0.0, scale=(1.0, 1.0), elastic_alpha=0.0)


def _superpixels():
    """Slice 0: none; slice 1: only id 1; slice 2: ids 1 and 3 (a gap at 2); others: quadrants 1..4."""
    Z, H, W = SHAPE
    quadrant = ((np.arange(H)[:, None] >= H // 2) * 2 + (np.arange(W)[None, :] >= W // 2) + 1).astype(np.int32)
    sp = np.broadcast_to(quadrant, SHAPE).copy()
    sp[0] = 0
    sp[1] = 1
    sp[2] = np.where(quadrant <= 2, 1, 3)
    return sp


@pytest.fixture
def store(tmp_path):
    root = write_dataset(tmp_path / "toy", ids=(1, 2, 3), shape=SHAPE, with_supervoxels=False)
    for i in (1, 2, 3):
        write_volume(root / FOLDER / f"superpix-MIDDLE_{i}.nii.gz", _superpixels(), GEOMETRY)
    return VolumeStore(load_spec("TOY", root), root)


def test_episode_is_one_slice_and_one_superpixel_seen_twice(store):
    ds = SuperpixelEpisodes(store, (1, 2), FOLDER, augment=IDENTITY, seed=3)
    for i in range(20):
        scan_id, z, sp = ds.draw(ds.rng(i))
        item = ds[i]
        image = store.scan(scan_id).image[z]
        mask = (store.pseudolabels(scan_id, FOLDER)[z] == sp).astype(np.float32)
        np.testing.assert_allclose(item["support_images"][0, 0], image, atol=1e-4)   # gamma 1 adds 1e-5
        np.testing.assert_allclose(item["query_images"][0, 0], image, atol=1e-4)
        np.testing.assert_array_equal(item["support_masks"][0], mask)
        np.testing.assert_array_equal(item["query_labels"][0], mask.astype(np.int64))
        assert mask.sum() > 0 and z != 0                  # 'present' never draws an absent id


def test_the_two_copies_are_augmented_independently(store):
    ds = SuperpixelEpisodes(store, (1, 2), FOLDER, seed=0)
    item = ds[5]
    scan_id, z, sp = ds.draw(ds.rng(5))
    raw = store.pseudolabels(scan_id, FOLDER)[z] == sp
    s, q = item["support_masks"][0] > 0, item["query_labels"][0] > 0
    assert set(np.unique(item["support_masks"])) <= {0.0, 1.0}
    assert not np.array_equal(item["support_images"], item["query_images"])
    for m in (s, q):                                      # a few pixels of shift/rotation/zoom
        assert (m & raw).sum() / (m | raw).sum() > 0.5
    batch = collate_episodes([ds[i] for i in range(3)]).to("cpu").check()
    assert batch.support_images.shape == (3, 1, 3, 32, 32) and batch.query_labels.shape == (3, 1, 32, 32)


def test_episodes_are_a_function_of_seed_and_index(store):
    a = SuperpixelEpisodes(store, (1, 2, 3), FOLDER, seed=7)
    b = SuperpixelEpisodes(store, (1, 2, 3), FOLDER, seed=7)
    for k in a[11]:
        np.testing.assert_array_equal(a[11][k], b[11][k])
    assert not np.array_equal(a[12]["query_images"], a[11]["query_images"])
    c = SuperpixelEpisodes(store, (1, 2, 3), FOLDER, seed=8)
    assert not np.array_equal(c[11]["query_images"], a[11]["query_images"])


def test_present_draw_is_uniform_over_ids_in_the_slice(store):
    ds = SuperpixelEpisodes(store, (1,), FOLDER, augment=None)
    assert sorted(set(ds.slice_z.tolist())) == list(range(1, 8))       # slice 0 has no superpixel
    k = ds.slice_z.tolist().index(2)
    assert ds.candidates[ds.offsets[k]:ds.offsets[k + 1]].tolist() == [1, 3]
    draws = [ds.draw(ds.rng(i)) for i in range(700)]
    assert {sp for _, z, sp in draws if z == 2} == {1, 3}
    assert {sp for _, z, sp in draws if z == 5} == {1, 2, 3, 4}
    big = SuperpixelEpisodes(store, (1,), FOLDER, augment=None, min_size=300)   # quadrants have 256 px
    assert sorted(set(big.slice_z.tolist())) == [1, 2]


def test_reference_draw_can_hit_absent_ids_and_never_the_largest(store):
    ds = SuperpixelEpisodes(store, (1,), FOLDER, id_draw="reference", augment=None)
    assert 1 not in ds.slice_z.tolist() and 0 not in ds.slice_z.tolist()   # max id 1 would crash the reference
    draws = [ds.draw(ds.rng(i)) for i in range(600)]
    assert {sp for _, z, sp in draws if z == 2} == {1, 2}                  # [1, 3): 2 is absent from slice 2
    assert {sp for _, z, sp in draws if z == 5} == {1, 2, 3}               # never 4, the slice's largest id
    empty = [i for i, (_, z, sp) in enumerate(draws) if z == 2 and sp == 2]
    assert empty and ds[empty[0]]["support_masks"].sum() == 0
    with pytest.raises(ValueError, match="id_draw"):
        SuperpixelEpisodes(store, (1,), FOLDER, id_draw="uniform")


def test_setting2_drops_every_slice_with_a_test_class(store):
    ds = SuperpixelEpisodes(store, (1, 2, 3), FOLDER, setting=2, test_labels=(1,), exclude_rule="any", augment=None)
    for scan_id in (1, 2, 3):
        excluded = excluded_slices(store.scan(scan_id).label, (1,), "any")
        assert excluded.any()
        zs = ds.slice_z[ds.slice_scan == scan_id]
        assert not excluded[zs].any() and len(zs) == (~excluded[1:]).sum()
    one = SuperpixelEpisodes(store, (1, 2, 3), FOLDER, setting=1, test_labels=(1,), augment=None)
    assert one.n_slices == 3 * 7


def test_no_slice_to_draw_is_a_clear_error(store):
    with pytest.raises(DataError, match="no training episode can be drawn"):
        SuperpixelEpisodes(store, (1, 2), FOLDER, min_size=10 ** 6)
    with pytest.raises(DataError, match="superpixel folder not found.*--kind superpixels --min-size 50"):
        SuperpixelEpisodes(store, (1,), "superpixels_50")
    (store.data_dir / "superpixels_50").mkdir()
    with pytest.raises(DataError, match="pseudolabel file not found"):
        SuperpixelEpisodes(store, (1,), "superpixels_50")


def test_built_from_the_config(store):
    from configs.experiment import build_config
    from models.engine.builders import build_episode_dataset
    from models.engine.experiment import Experiment
    exp = Experiment.from_config(build_config("alpnet", "CHAOST2", store.data_dir, updates={
        "test_labels": [1], "sampler.id_draw": "reference"}))
    ds = build_episode_dataset(exp, store, (1, 2), seed=4)
    assert isinstance(ds, SuperpixelEpisodes) and ds.id_draw == "reference" and ds.seed == 4
    assert ds.augment == AugmentParams()
