import math

import torch
from reference_scaled_cross_attention import PrototypeClassifier
from torch import nn

import maskattn
from maskattn.nn import LearnableScaleCrossAttention
from maskattn.optim import param_groups


def ids(ps):
    return {id(p) for p in ps}


def test_matches_few_shot_model_get_parameters():
    model = PrototypeClassifier()
    theirs = model.get_parameters()
    mine = param_groups(model, 5e-4)
    assert len(mine) == 2
    assert ids(mine[0]["params"]) == ids(theirs[0]["params"]) and mine[0]["weight_decay"] == 5e-4
    assert ids(mine[1]["params"]) == ids(theirs[1]["params"]) and mine[1]["weight_decay"] == 0.0
    assert mine[1]["param_names"] == ["sap_module.logit_scale_log"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.xattn = LearnableScaleCrossAttention(8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's name
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.tied = self.proj  # the same parameters under a second name


def test_logit_scales_biases_norms_frozen_and_shared():
    net = Net()
    g = param_groups(net, 0.1)
    decay, keep = g
    assert set(keep["param_names"]) == {"xattn.logit_scale_log", "logit_scale"}
    assert set(decay["param_names"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias"}
    g = param_groups(net, 0.1, no_decay_bias_and_norm=True)
    assert g[0]["param_names"] == ["proj.weight"]
    assert len(g[1]["params"]) == 7
    g = param_groups(net, 0.1, no_decay=["proj.weight"])
    assert "proj.weight" in g[1]["param_names"]
    # every trainable parameter exactly once
    all_ids = [id(p) for grp in param_groups(net, 0.1) for p in grp["params"]]
    assert len(all_ids) == len(set(all_ids)) == len([p for p in net.parameters() if p.requires_grad])


def test_weight_decay_leaves_the_scale_alone():
    net = Net()
    for opt_cls in (torch.optim.SGD, torch.optim.AdamW):
        opt = opt_cls(param_groups(net, 0.5), lr=0.1)
        before = net.xattn.logit_scale_log.item(), net.proj.weight.detach().clone()
        for p in net.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        opt.step()
        assert net.xattn.logit_scale_log.item() == before[0]
        assert not torch.equal(net.proj.weight, before[1])  # decayed
        opt.state_dict()


def test_empty_groups_dropped():
    g = param_groups(LearnableScaleCrossAttention(4), 0.1)
    assert len(g) == 1 and g[0]["weight_decay"] == 0.0
    g = param_groups(nn.Linear(3, 3), 0.1)
    assert len(g) == 1 and g[0]["weight_decay"] == 0.1
    assert maskattn.optim.param_groups is param_groups
