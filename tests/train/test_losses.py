import pytest
import torch
import torch.nn.functional as F

from lmtrain.config.choices import KL
from lmtrain.train.losses import cross_entropy, distillation


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


def test_distillation_is_zero_when_student_matches_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    for kl in (KL.forward, KL.reverse):
        loss, count = distillation(logits, targets, logits.detach().clone(), temperature=3.0, alpha=1.0, kl=kl)
        (grad,) = torch.autograd.grad(loss, logits)
        assert abs(loss.item()) < 1e-5 and grad.abs().max() < 1e-6 and count == 10


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_matches_kl_div(temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 7, 13), torch.randn(3, 7, 13)
    targets = torch.randint(0, 13, (3, 7))
    targets[0, :3] = -100  # positions without a target are left out of the KL too
    valid = targets != -100
    s = F.log_softmax(student[valid] / temperature, -1)
    t = F.log_softmax(teacher[valid] / temperature, -1)
    forward = F.kl_div(s, t, log_target=True, reduction="sum")  # KL(teacher || student)
    reverse = F.kl_div(t, s, log_target=True, reduction="sum")  # KL(student || teacher)
    ce, _ = cross_entropy(student, targets)
    for kl, expected in ((KL.forward, forward), (KL.reverse, reverse)):
        loss, count = distillation(student, targets, teacher, temperature=temperature, alpha=0.3, kl=kl)
        torch.testing.assert_close(loss, 0.3 * temperature**2 * expected + 0.7 * ce)
        assert count == valid.sum()


def test_distillation_on_class_logits():
    torch.manual_seed(2)
    student, teacher = torch.randn(8, 3), torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    loss, count = distillation(student, labels, teacher, temperature=2.0, alpha=1.0)
    expected = F.kl_div(
        F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="sum"
    )
    torch.testing.assert_close(loss, 4.0 * expected)
    assert count == 8


def test_class_weights_scale_each_target_and_keep_the_plain_count():
    torch.manual_seed(3)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 2, -100])
    weights = torch.tensor([2.0, 1.0, 0.5])
    total, count = cross_entropy(logits, labels, class_weights=weights)
    expected = F.cross_entropy(logits, labels, weight=weights, reduction="sum")
    torch.testing.assert_close(total, expected)
    assert count == 5  # normalised by examples, not by the sum of weights
