"""Shared head operations: pooling, cosine, episode-wise losses."""
import torch
import torch.nn.functional as F

from models.heads.common import (
    EPS_FLOAT32, episode_nll, masked_average_pool, masked_average_pool_lowres, two_class_log_probs,
    upsample_adjoint,
)


def test_masked_average_pool_equals_upsample_then_pool():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 16, 8, 8)
    masks = (torch.rand(2, 3, 64, 64) > 0.6).float()
    up = F.interpolate(feats.flatten(0, 1), size=(64, 64), mode="bilinear", align_corners=False).view(2, 3, 16, 64, 64)
    naive = (up * masks[:, :, None]).sum((-1, -2)) / (masks.sum((-1, -2))[..., None] + 1e-5)
    torch.testing.assert_close(masked_average_pool(feats, masks), naive, atol=1e-5, rtol=1e-5)


def test_empty_mask_gives_zero_prototype():
    proto = masked_average_pool(torch.randn(1, 4, 8, 8), torch.zeros(1, 32, 32))
    assert torch.equal(proto, torch.zeros(1, 4))


def test_adjoint_of_non_square_upsampling():
    torch.manual_seed(1)
    f = torch.randn(5, 7)
    m = torch.rand(20, 28)
    up = F.interpolate(f[None, None], size=(20, 28), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close((up * m).sum(), (f * upsample_adjoint(m, (5, 7))).sum(), rtol=1e-5, atol=1e-5)


def test_lowres_pool():
    f = torch.arange(8.0).view(2, 2, 2)          # C=2, 2x2
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(masked_average_pool_lowres(f, m), torch.tensor([1.5, 5.5]) * 2 / (2 + 1e-5))


def test_episode_nll_matches_torch_weighted_nll_for_one_episode():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 2, 16, 16)
    target = (torch.rand(1, 1, 16, 16) > 0.7).long()
    target[0, 0, 0, :4] = 255
    lp = F.log_softmax(logits, dim=2)
    ref = F.nll_loss(lp[0], target[0], weight=torch.tensor([0.1, 1.0]), ignore_index=255)
    torch.testing.assert_close(episode_nll(lp, target, [0.1, 1.0]), ref)


def test_episode_nll_is_mean_of_per_episode_losses():
    torch.manual_seed(0)
    lp = F.log_softmax(torch.randn(3, 1, 2, 8, 8), dim=2)
    target = (torch.rand(3, 1, 8, 8) > 0.5).long()
    per = torch.stack([episode_nll(lp[b:b + 1], target[b:b + 1], [0.1, 1.0]) for b in range(3)])
    torch.testing.assert_close(episode_nll(lp, target, [0.1, 1.0]), per.mean())


def test_two_class_log_probs_clamp():
    lp = two_class_log_probs(torch.tensor([[0.0, 1.0, 0.25]]))    # h x w = 1 x 3
    assert lp.shape == (2, 1, 3)
    torch.testing.assert_close(lp.exp()[:, 0, 2], torch.tensor([0.75, 0.25]))
    assert lp.exp().min() >= EPS_FLOAT32 * 0.99


def test_cosine_with_precomputed_norms_matches_torch():
    from models.heads.common import cosine_to_prototype, feature_norms
    torch.manual_seed(0)
    f = torch.randn(2, 3, 16, 5, 5)
    f[0, 0, :, 0, 0] = 0.0                                   # a zero feature vector: eps clamp
    p = torch.randn(2, 3, 16)
    torch.testing.assert_close(cosine_to_prototype(f, p, norms=feature_norms(f)), cosine_to_prototype(f, p),
                               rtol=1e-5, atol=1e-6)
