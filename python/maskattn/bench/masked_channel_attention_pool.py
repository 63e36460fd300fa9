"""PyG's AttentionalAggregation with a feature-level gate against maskattn.

What is timed is the aggregation step of ``torch_geometric.nn.aggr.AttentionalAggregation`` when its
``gate_nn`` outputs one logit per channel (``gate [T, D]``): PyG's scatter softmax over the nodes of
each graph, per channel (``torch_geometric.utils.softmax``), then the sum of ``gate * x`` per graph.
``gate_nn`` and ``nn`` are the same modules on both sides and are left out. Graphs (bags) of
different sizes are stored back to back, as a PyG ``Batch`` holds them; maskattn takes the batch's
``ptr`` as its offsets.

The baseline is torch_geometric's own code when it is installed, else the same math in plain torch
(a scatter max, exp of the difference, a scatter sum plus PyG's 1e-16, the division, a scatter sum
of ``gate * x``).
"""

import torch

import maskattn

from ._harness import BASELINE, COMPILED, FLOOR, MASKATTN, Case, Impl, Layer, maybe_compile

LAYER = Layer("PyG AttentionalAggregation, feature-level gate", "maskattn.masked_channel_attention_pool_packed")
OURS = "maskattn.masked_channel_attention_pool_packed"

# (graphs, mean nodes per graph, D): small-graph batches, MIL bags as PyG graphs, one whole slide
CPU_SHAPES = [(64, 200, 128), (8, 2400, 512), (1, 50000, 512)]
GPU_SHAPES = CPU_SHAPES + [(256, 500, 256), (16, 4096, 1024), (1, 100000, 1024)]
QUICK_SHAPES = [(4, 300, 64), (1, 2000, 128)]


def _pyg_functions():
    """(softmax, scatter_sum, name) from torch_geometric, or plain-torch equivalents."""
    try:
        from torch_geometric.utils import scatter, softmax
    except ImportError:
        return _softmax_torch, _scatter_sum_torch, "plain-torch scatter"

    def scatter_sum(src, index, num_bags):
        return scatter(src, index, 0, num_bags, reduce="sum")

    def pyg_softmax(gate, index, num_bags):
        return softmax(gate, index, num_nodes=num_bags, dim=0)

    return pyg_softmax, scatter_sum, "torch_geometric"


def _softmax_torch(gate, index, num_bags):
    """torch_geometric.utils.softmax without torch_scatter: per (graph, channel)."""
    idx = index.view(-1, 1).expand_as(gate)
    gmax = gate.new_zeros((num_bags, gate.shape[1])).scatter_reduce(0, idx, gate.detach(), "amax", include_self=False)
    out = (gate - gmax.index_select(0, index)).exp()
    out_sum = out.new_zeros((num_bags, gate.shape[1])).index_add(0, index, out) + 1e-16
    return out / out_sum.index_select(0, index)


def _scatter_sum_torch(src, index, num_bags):
    return src.new_zeros((num_bags,) + tuple(src.shape[1:])).index_add(0, index, src)


def attentional_aggregation(softmax, scatter_sum):
    """AttentionalAggregation.forward after gate_nn (and nn): (pooled [B, D], gate [T, D])."""

    def pool(gate, x, index, num_bags: int):
        gate = softmax(gate, index, num_bags)
        return scatter_sum(gate * x, index, num_bags), gate

    return pool


def ours_pool(gate, x, offsets):
    return maskattn.masked_channel_attention_pool_packed(gate, x, offsets)


def add_args(p):
    p.add_argument(
        "--channel-pool-dtype",
        default=None,
        help="dtype for the masked_channel_attention_pool suite (default: float32 on CPU, bfloat16 on CUDA)",
    )


def make(B, N, D, dtype, device, seed=0):
    """gate, x [T, D]; batch [T] (graph id per node); ptr [B+1]. Graph sizes vary around N."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(max(1, N // 2), N + N // 2 + 1, (B,), generator=g)
    T = int(lengths.sum())
    gate = (torch.randn(T, D, generator=g) * 2).to(device=device, dtype=dtype)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    batch = torch.repeat_interleave(torch.arange(B), lengths).to(device)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    return gate, x, batch, ptr


def cases(args):
    dev = args.device
    dtype = (
        getattr(torch, args.channel_pool_dtype)
        if getattr(args, "channel_pool_dtype", None)
        else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    )
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)
    softmax, scatter_sum, source = _pyg_functions()
    theirs = attentional_aggregation(softmax, scatter_sum)
    compiled = maybe_compile(theirs, not args.no_compile)
    eager_name = f"PyG AttentionalAggregation ({source}, eager)"
    compiled_name = f"PyG AttentionalAggregation ({source}, compiled)"
    for B, N, D in shapes:
        gate, x, batch, ptr = make(B, N, D, dtype, dev)
        T = x.shape[0]
        case = f"B={B} T={T} D={D} {str(dtype).replace('torch.', '')}"
        tbytes = T * D * x.element_size()

        impls = [Impl(eager_name, lambda: theirs(gate, x, batch, B), BASELINE)]
        if compiled is not None:
            impls.append(Impl(compiled_name, lambda: compiled(gate, x, batch, B), COMPILED))
        impls.append(Impl(OURS, lambda: ours_pool(gate, x, ptr), MASKATTN))
        # read gate and x once, write one new [T, D] (the weights, a tensor of their own): the least
        # the forward must do
        impls.append(Impl("floor: read gate + x, write a new [T, D]", lambda: torch.add(gate, x), FLOOR))
        yield Case(LAYER, case, "fwd", impls, bytes_moved=3 * tbytes)
        impls = None

        # forward + backward: x from a trainable layer (both gradients), then frozen node features
        for detail, x_grad in (("trainable x", True), ("frozen x", False)):
            gl = gate.clone().requires_grad_()
            xl = x.clone().requires_grad_(x_grad)
            inputs = (gl, xl) if x_grad else (gl,)
            gp = torch.randn(B, D, device=dev, dtype=dtype)

            def step(fn):
                def go():
                    pooled, _ = fn()
                    return torch.autograd.grad(pooled, inputs, gp)

                return go

            impls = [Impl(eager_name, step(lambda: theirs(gl, xl, batch, B)), BASELINE)]
            if compiled is not None:
                impls.append(Impl(compiled_name, step(lambda: compiled(gl, xl, batch, B)), COMPILED))
            impls.append(Impl(OURS, step(lambda: ours_pool(gl, xl, ptr)), MASKATTN))
            # fwd: read gate, x, write the weights; bwd: read weights (and x), write each gradient
            moved = (7 if x_grad else 6) * tbytes
            yield Case(LAYER, case, "fwd+bwd", impls, detail=detail, bytes_moved=moved)
        del gate, x, batch, ptr, gl, xl
