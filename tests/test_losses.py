import pytest
import torch
from reference_masked_softmax import jit_masked_loss

from maskattn.losses import masked_mse_loss


def data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(3, 3, 8, 10, generator=g, dtype=dtype)
    target = torch.randn(3, 3, 8, 10, generator=g, dtype=dtype)
    mask = torch.zeros(3, 8, 10)
    mask[0, :5, :7] = 1
    mask[1] = 1
    mask[2, :1, :2] = 1
    return pred, target, mask


def test_mean_over_valid_elements_and_jit_loss_relation():
    pred, target, mask = data()
    loss = masked_mse_loss(pred, target, mask)
    m = mask.bool().unsqueeze(1).expand_as(pred)
    torch.testing.assert_close(loss, ((pred - target)[m] ** 2).mean())
    # JiT's masked loss divides a sum over C x pixels by the pixel count: C times ours.
    torch.testing.assert_close(loss * pred.shape[1], jit_masked_loss(pred, target, mask.double()))
    torch.testing.assert_close(masked_mse_loss(pred, target, mask.unsqueeze(1)), loss)
    torch.testing.assert_close(masked_mse_loss(pred, target, m), loss)
    torch.testing.assert_close(masked_mse_loss(pred, target, mask.bool()), loss)


def test_reductions():
    pred, target, mask = data(1)
    none = masked_mse_loss(pred, target, mask, "none")
    assert none.shape == pred.shape and (none[~mask.bool().unsqueeze(1).expand_as(pred)] == 0).all()
    torch.testing.assert_close(masked_mse_loss(pred, target, mask, "sum"), none.sum())


@pytest.mark.parametrize("mask_form", ["bhw", "b1hw", "bool"])
def test_pixel_mean_is_the_hand_written_scale(mask_form):
    pred, target, mask = data(3)
    pred.requires_grad_()
    m = {"bhw": mask, "b1hw": mask.unsqueeze(1), "bool": mask.bool()}[mask_form]
    loss = masked_mse_loss(pred, target, m, reduction="pixel_mean")
    ref = jit_masked_loss(pred, target, mask.double())  # sum over C x pixels / (pixels + 1e-8)
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-10)  # the "+ 1e-8" moves ~1e-10
    torch.testing.assert_close(loss, masked_mse_loss(pred, target, mask) * pred.shape[1])
    (g,) = torch.autograd.grad(loss, pred)
    (g_ref,) = torch.autograd.grad(ref, pred)
    torch.testing.assert_close(g, g_ref, atol=0, rtol=1e-10)
    assert masked_mse_loss(pred, target, torch.zeros_like(mask), reduction="pixel_mean") == 0


def test_padding_cannot_leak_and_grads():
    pred, target, mask = data(2)
    pred = pred.clone()
    pred[~mask.bool().unsqueeze(1).expand_as(pred)] = float("nan")
    pred.requires_grad_()
    loss = masked_mse_loss(pred, target, mask)
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(g).all() and (g[~mask.bool().unsqueeze(1).expand_as(g)] == 0).all()
    p2, t2, _ = data(3)
    assert torch.autograd.gradcheck(lambda p: masked_mse_loss(p, t2, mask), (p2.requires_grad_(),))


def test_empty_mask_gives_zero():
    pred, target, _ = data(4)
    assert masked_mse_loss(pred, target, torch.zeros(3, 8, 10)).item() == 0.0


def test_half_and_compile():
    pred, target, mask = data(5, torch.float32)
    ref = masked_mse_loss(pred, target, mask)
    got = masked_mse_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    cf = torch.compile(masked_mse_loss, fullgraph=True)
    torch.testing.assert_close(cf(pred, target, mask), ref)


def test_errors():
    pred, target, mask = data()
    with pytest.raises(ValueError, match="must have the same shape"):
        masked_mse_loss(pred, target[:, :2], mask)
    with pytest.raises(ValueError, match=r"mask must be \[B, H, W\]"):
        masked_mse_loss(pred, target, mask[:, :4])
    with pytest.raises(ValueError, match="reduction"):
        masked_mse_loss(pred, target, mask, "max")
