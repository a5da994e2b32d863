import torch
import torch.nn.functional as F

from lmtrain.losses import cross_entropy


def test_matches_torch_mean_with_label_smoothing_and_ignore():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = -100
    total, count = cross_entropy(logits, targets, label_smoothing=0.1)
    expected = F.cross_entropy(logits.view(-1, 11), targets.view(-1), label_smoothing=0.1)
    assert count == 13
    torch.testing.assert_close(total / count, expected)


def test_z_loss_adds_its_formula_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 3])
    base, _ = cross_entropy(logits, targets)
    with_z, _ = cross_entropy(logits, targets, z_loss=1e-2)
    log_z = torch.logsumexp(logits, -1)
    valid = targets != -100
    torch.testing.assert_close(with_z - base, 1e-2 * (log_z[valid] ** 2).sum())
    (grad_z,) = torch.autograd.grad(with_z - base, logits)
    expected = 1e-2 * 2 * log_z[:, None] * logits.softmax(-1) * valid[:, None]
    torch.testing.assert_close(grad_z, expected.detach())
