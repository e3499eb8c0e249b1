"""Per-episode BatchNorm: B episodes in one step normalise like B separate steps."""
import torch
import torch.nn as nn

from models.episode_norm import EpisodeBatchNorm2d, episodes_of, use_episode_batchnorm


def test_groups_are_normalised_separately():
    torch.manual_seed(0)
    bn = EpisodeBatchNorm2d(4).train()
    ref = nn.BatchNorm2d(4).train()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
        ref.load_state_dict(bn.state_dict())
    x = torch.randn(6, 4, 5, 5) * torch.tensor([1.0, 3.0, 0.5, 2.0]).view(1, 4, 1, 1)
    bn.group_size = 2
    y = bn(x)
    expected = torch.cat([ref(x[i:i + 2]) for i in range(0, 6, 2)])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_gradients_match_separate_episodes():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    bn = EpisodeBatchNorm2d(3).train()
    bn.group_size = 2
    bn(x).pow(2).sum().backward()
    g_batched = x.grad.clone()
    x.grad = None
    ref = nn.BatchNorm2d(3).train()
    sum(ref(x[i:i + 2]).pow(2).sum() for i in (0, 2)).backward()
    torch.testing.assert_close(g_batched, x.grad, rtol=1e-4, atol=1e-5)


def test_conversion_keeps_state_and_eval_is_plain_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        net[1].running_mean.fill_(0.3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    use_episode_batchnorm(net)
    assert isinstance(net[1], EpisodeBatchNorm2d) and isinstance(net[2][0], EpisodeBatchNorm2d)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with episodes_of(net, 2):
        assert net[1].group_size == 2
    assert net[1].group_size is None
