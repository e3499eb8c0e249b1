"""Device-side augmentation against the reference CPU implementation."""
import numpy as np
import pytest
import torch
from scipy import stats

from dataloaders.augment import AugmentParams, apply_draw, draw_alpnet_copy, draw_reference_pair, elastic_from_seed, \
    gamma_transform, warp
from dataloaders.augment_torch import apply_draws, elastic_fields, gamma_batch, warp_batch

P = AugmentParams()


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(size, size)).astype(np.float32)
    image[16:44, 20:40] += 3.0
    mask = np.zeros((size, size), np.float32)
    mask[16:44, 20:40] = 1.0
    return image, mask


def test_gamma_matches_the_reference():
    image, _ = _image()
    torch.testing.assert_close(gamma_batch(torch.from_numpy(image)[None], torch.tensor([1.3]))[0],
                               torch.from_numpy(gamma_transform(image, 1.3)), rtol=1e-5, atol=1e-5)


def test_same_affine_and_field_give_the_reference_warp():
    image, mask = _image()
    draw = draw_reference_pair(np.random.default_rng(4), image.shape, P)
    d = next(x for x in draw if x.affine is not None)
    dy, dx = elastic_from_seed(d.elastic_seed, image.shape, P)
    ref_img, ref_mask = warp(image, mask, d.affine, dy, dx)
    fields = torch.from_numpy(np.stack([dx, dy]))[None].float()
    out = warp_batch(torch.from_numpy(np.stack([image, mask]))[None], torch.from_numpy(d.affine)[None], fields)[0]
    assert np.abs(out[0].numpy() - ref_img).max() < 0.1 * np.ptp(image)   # OpenCV's 1/32-pixel weights
    assert np.abs(out[0].numpy() - ref_img).mean() < 0.01
    assert (torch.round(out[1]).numpy() != ref_mask).mean() < 0.005


def test_elastic_field_statistics_match():
    seeds = list(range(40))
    t = elastic_fields(seeds, (128, 128), P, "cpu")
    n = np.stack([np.stack(elastic_from_seed(s, (128, 128), P)[::-1]) for s in seeds])
    assert abs(t.std().item() - n.std()) / n.std() < 0.05
    assert abs(t.abs().max().item() - np.abs(n).max()) / np.abs(n).max() < 0.35


@pytest.mark.parametrize("draw_fn", ["reference_pair", "alpnet"])
def test_output_distributions_of_both_paths_agree(draw_fn):
    image, mask = _image(1)
    cpu, dev = [], []
    vectors, images = [], []
    for i in range(300):
        rng = np.random.default_rng(i)
        draw = draw_reference_pair(rng, image.shape, P)[i % 2] if draw_fn == "reference_pair" \
            else draw_alpnet_copy(rng, image.shape, P)
        img, msk = apply_draw(image, mask, draw, P)
        cpu.append((img.mean(), img.std(), msk.sum()))
        vectors.append(draw.to_vector())
    n = len(vectors)
    out_img, out_mask = apply_draws(torch.from_numpy(np.repeat(image[None], n, 0)),
                                    torch.from_numpy(np.repeat(mask[None], n, 0)), torch.from_numpy(np.stack(vectors)), P)
    dev = np.stack([out_img.mean((1, 2)).numpy(), out_img.std((1, 2), correction=0).numpy(), out_mask.sum((1, 2)).numpy()], 1)
    cpu = np.array(cpu)
    for k, name in enumerate(["image mean", "image std", "mask area"]):
        assert stats.ks_2samp(cpu[:, k], dev[:, k]).pvalue > 0.01, name
    assert set(np.unique(out_mask.numpy())) <= {0.0, 1.0}


def test_device_mode_episode_carries_the_same_draws_as_the_cpu_mode(tmp_path):
    from data.core.specs import load_spec
    from dataloaders.supervoxel_episodes import SupervoxelEpisodes
    from dataloaders.volumes import VolumeStore
    from tests.helpers import write_dataset
    root = write_dataset(tmp_path / "toy")
    store = VolumeStore(load_spec("TOY", root), root)
    cpu = SupervoxelEpisodes(store, (1, 2), "supervoxels_100", min_size=20, seed=3)
    dev = SupervoxelEpisodes(store, (1, 2), "supervoxels_100", min_size=20, seed=3, augment_on_device=True)
    a, b = cpu[11], dev[11]
    assert b["support_aug"].shape == (1, 11) and "support_aug" not in a
    # exactly one side has gamma and exactly one has the geometric transform, as the reference
    assert b["support_aug"][0, 0] + b["query_aug"][0, 0] == 1 and b["support_aug"][0, 2] + b["query_aug"][0, 2] == 1
    from dataloaders.augment import AugmentDraw
    side = "support" if b["support_aug"][0, 2] == 0 else "query"    # the side without geometry: gamma at most
    key = f"{side}_images"
    v = b[f"{side}_aug"][0]
    expected = gamma_transform(b[key][0, 0], v[1]) if v[0] else b[key][0, 0]
    np.testing.assert_allclose(a[key][0, 0], expected, rtol=1e-5, atol=1e-5)
    assert AugmentDraw.VECTOR_SIZE == 11
