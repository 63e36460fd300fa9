"""Pure-PyTorch reference for patch_mask: JiT's image-mask-to-patch-mask rule (mean over each p x p
patch > 0.5) and its always-valid condition tokens, kept verbatim in their arithmetic."""

import torch


def image_mask_to_patch_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """JiT: mean over each p x p patch > 0.5, as float [B, num_patches] (rectangular allowed)."""
    B, H, W = mask.shape
    p = patch_size
    mask_patches = mask.reshape(B, H // p, p, W // p, p)
    mask_patches = mask_patches.mean(dim=(2, 4))
    patch_mask = (mask_patches > 0.5).float()
    return patch_mask.reshape(B, -1)


def jit_condition_mask(patch_mask, n_cond):
    B = patch_mask.shape[0]
    cond_mask = torch.ones(B, n_cond, device=patch_mask.device)
    return torch.cat([cond_mask, patch_mask], dim=1)
