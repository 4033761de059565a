"""N networks served as one model: every member runs in one batched forward, probabilities averaged.

Two ways to batch the members, both exact (same answers as running them one by one):
- `StackedEnsemble`: torch.func.stack_module_state + vmap over one functional copy of the network.
  Works for any member architecture and variant that torch.func can trace (eager and fused).
- `GroupedEnsemble`: the members' convolutions concatenated into one wider (grouped) convolution
  and their linear layers into batched matmuls. Specific to `training.core.model.Net`.
Members of different architectures (e.g. one and two convs per block) are batched per architecture
and the groups' averages weighted by their sizes (`MixedEnsemble`): the same average over all members.
`bench/ensemble.py` measures them against a Python loop; `build_ensemble` picks the faster
(docs: Tuning and ensembles). Each member's logits are divided by its temperature (1.0 when the checkpoint
has none) before its softmax, so the average is over calibrated probabilities. The forward returns
the log of the averaged probabilities: a softmax of that gives back the average exactly, so a caller
that applies softmax to a single model's logits serves an ensemble unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from training.core.model import build_model, fuse_batch_norm

METHODS = ("grouped", "vmap", "loop")


class EnsembleError(ValueError):
    """Members that cannot be combined (none, different classes, bad temperatures)."""


def architecture(member: nn.Module) -> object:
    """What must be equal for members to batch together: the config without dropout (off in eval)."""
    config = getattr(member, "config", None)
    return dataclasses.replace(config, dropout=0.0) if dataclasses.is_dataclass(config) else type(member)


def _temperatures(members: Sequence[nn.Module], temperatures: Sequence[float] | None) -> torch.Tensor:
    if not members:
        raise EnsembleError("an ensemble needs at least one member")
    temperatures = [1.0] * len(members) if temperatures is None else list(temperatures)
    if len(temperatures) != len(members) or min(temperatures) <= 0:
        raise EnsembleError(f"need one positive temperature per member, got {temperatures}")
    return torch.tensor(temperatures, dtype=torch.float32)


def _average(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(members, batch, classes) logits → log of the mean calibrated probability, (batch, classes)."""
    probabilities = F.softmax(logits.float() / temperature.view(-1, 1, 1), dim=-1).mean(0)
    return probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()


class LoopEnsemble(nn.Module):
    """The members one after another: the baseline the batched versions are measured against."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("temperature", _temperatures(members, temperatures))
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _average(torch.stack([m(x) for m in self.members]), self.temperature)


class StackedEnsemble(nn.Module):
    """vmap of one functional network over the members' stacked weights."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("temperature", _temperatures(members, temperatures))
        params, buffers = stack_module_state(list(members))
        self.names = {"params": list(params), "buffers": list(buffers)}
        for i, tensor in enumerate([*params.values(), *buffers.values()]):
            self.register_buffer(f"stacked_{i}", tensor.detach())  # buffers: moved by .to(), never trained
        self.base = [copy.deepcopy(members[0]).to("meta")]  # a list: not a submodule, holds no weights

    def _stacked(self) -> tuple[dict, dict]:
        tensors = [getattr(self, f"stacked_{i}") for i in range(len(self.names["params"]) + len(self.names["buffers"]))]
        n = len(self.names["params"])
        return dict(zip(self.names["params"], tensors[:n], strict=True)), \
            dict(zip(self.names["buffers"], tensors[n:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base[0]

        def one(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (params, buffers), (x,))

        params, buffers = self._stacked()
        return _average(torch.vmap(one, in_dims=(0, 0, None))(params, buffers, x), self.temperature)


def _conv_biases(block: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each conv of a block (of a member already through `fuse_batch_norm`) as (weight, bias); a conv whose
    batch norm did not fold has none (the batch norm's shift replaces it): zeros."""
    return [(layer.weight.detach(), layer.bias.detach() if layer.bias is not None
             else layer.weight.new_zeros(layer.out_channels)) for layer in block if isinstance(layer, nn.Conv2d)]


def _after_pool(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel (scale, shift) of the batch norm that stayed after a block's pool (of a member through
    `fuse_batch_norm`: `pool_first` with a negative scale, which cannot fold); None where none stayed."""
    norms = [layer for layer in block if isinstance(layer, nn.BatchNorm2d)]
    if not norms:
        return None
    layers, bn = list(block), norms[-1]
    if len(norms) > 1 or not isinstance(layers[layers.index(bn) - 1], nn.MaxPool2d):
        raise EnsembleError("a member's batch norm did not fold into its conv")  # fuse_batch_norm folds all others
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    scale = (bn.weight.detach() if bn.weight is not None else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
    shift = (bn.bias.detach() if bn.bias is not None else torch.zeros_like(var)) - mean * scale
    return scale, shift


class GroupedEnsemble(nn.Module):
    """The members of `training.core.model.Net` as one network N times wider: grouped convs and bmm.

    The first conv reads the same 1-channel input for every member, so its filters simply stack;
    every later conv sees each member's own channels only (groups=N); the two linear layers become
    batched matmuls. Eval only (batch norm folded, dropout off). A batch norm after a pool that cannot
    fold (a negative scale) becomes a per-channel scale and shift after the grouped pool.
    """

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("temperature", _temperatures(members, temperatures))
        if len({architecture(m) for m in members}) != 1 or not hasattr(members[0], "features"):
            raise EnsembleError("grouped ensembles need members of one training.core.model.Net architecture")
        self.n = len(members)
        # Batch norm folded into each conv (copies: the members stay as they are).
        fused = [fuse_batch_norm(copy.deepcopy(m).eval()) for m in members]
        # blocks[b][k] = conv k of block b, one (weight, bias) per member.
        blocks = [list(zip(*(_conv_biases(m.features[b]) for m in fused), strict=True))
                  for b in range(len(fused[0].features))]
        self.layout = [len(convs) for convs in blocks]  # convs per block; a max-pool after each block
        # Where a member's batch norm stayed after a block's pool: that block's scale and shift after the
        # pool, over all members' channels (the identity for the members whose batch norm folded).
        self.after_pool: list[bool] = []
        for b, convs in enumerate(blocks):
            stayed = [_after_pool(m.features[b]) for m in fused]
            self.after_pool.append(any(affine is not None for affine in stayed))
            if not self.after_pool[-1]:
                continue
            identity = [(w.new_ones(w.shape[0]), w.new_zeros(w.shape[0])) for w, _ in convs[-1]]  # last conv's
            scale, shift = zip(*(affine or one for affine, one in zip(stayed, identity, strict=True)), strict=True)
            self.register_buffer(f"scale{b}", torch.cat(scale).view(1, -1, 1, 1))
            self.register_buffer(f"shift{b}", torch.cat(shift).view(1, -1, 1, 1))
        fc1 = [m.classifier[1] for m in fused]
        fc2 = [m.classifier[4] for m in fused]
        # channels_last filters: oneDNN's fast CPU convolutions (the inputs are channels_last too).
        cl = torch.channels_last
        for i, conv in enumerate((conv for convs in blocks for conv in convs), start=1):
            self.register_buffer(f"w{i}", torch.cat([w for w, _ in conv]).contiguous(memory_format=cl))
            self.register_buffer(f"b{i}", torch.cat([b for _, b in conv]))
        self.register_buffer("fc1_w", torch.stack([f.weight.detach().t() for f in fc1]))  # (N, in, hidden)
        self.register_buffer("fc1_b", torch.stack([f.bias.detach() for f in fc1]).unsqueeze(1))
        self.register_buffer("fc2_w", torch.stack([f.weight.detach().t() for f in fc2]))
        self.register_buffer("fc2_b", torch.stack([f.bias.detach() for f in fc2]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, i = x, 1
        for b, convs in enumerate(self.layout):
            for k in range(convs):
                groups = 1 if i == 1 else self.n
                h = F.conv2d(h, getattr(self, f"w{i}"), getattr(self, f"b{i}"), padding=1, groups=groups)
                h = F.relu(h) if k < convs - 1 else h
                i += 1
            h = F.max_pool2d(h, 2)  # the block's last ReLU after its pool: they commute (a quarter of the values)
            if self.after_pool[b]:
                h = torch.addcmul(getattr(self, f"shift{b}"), h, getattr(self, f"scale{b}"))
            h = F.relu(h)
        # (B, N·C, 7, 7) → (N, B, C·7·7): flatten each member's channels in Net's (C, H, W) order.
        h = h.reshape(h.shape[0], self.n, -1).transpose(0, 1)
        h = F.relu(torch.baddbmm(self.fc1_b, h, self.fc1_w))
        return _average(torch.baddbmm(self.fc2_b, h, self.fc2_w), self.temperature)


class MixedEnsemble(nn.Module):
    """Members of several architectures: one batched ensemble per architecture, their averages weighted
    by how many members each holds, which is the plain average over all the members."""

    def __init__(self, groups: Sequence[nn.Module], sizes: Sequence[int]) -> None:
        super().__init__()
        self.groups = nn.ModuleList(groups)
        self.register_buffer("log_share", (torch.tensor(sizes, dtype=torch.float32) / sum(sizes)).log().view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # log Σ_g (n_g / N) · mean_g(p) from each group's log mean_g(p)
        return torch.logsumexp(torch.stack([group(x) for group in self.groups]) + self.log_share, dim=0)


def build_ensemble(members: Sequence[nn.Module], temperatures: Sequence[float] | None = None,
                   method: str = "grouped") -> nn.Module:
    """One eval-mode module for the members; `method` is one of METHODS (grouped: fastest, README)."""
    kinds = {"grouped": GroupedEnsemble, "vmap": StackedEnsemble, "loop": LoopEnsemble}
    if method not in kinds:
        raise EnsembleError(f"unknown ensemble method {method!r}: choose one of {', '.join(METHODS)}")
    members = [m.eval() for m in members]
    temperatures = _temperatures(members, temperatures).tolist()
    groups: dict[object, list[int]] = {}  # architecture → member indices, in the members' order
    for i, member in enumerate(members):
        groups.setdefault(architecture(member), []).append(i)
    if method == "loop" or len(groups) == 1:  # the loop runs any mix of architectures as it is
        return kinds[method](members, temperatures).eval()
    return MixedEnsemble([kinds[method]([members[i] for i in idx], [temperatures[i] for i in idx])
                          for idx in groups.values()], [len(idx) for idx in groups.values()]).eval()


def load_ensemble(weights: dict, meta: dict, prepare: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """The served ensemble from an archive's weights ({"members": [state_dict, ...]}) and model.json.

    `prepare` turns each eval-mode member into its serving form (the handler's variant) first.
    """
    info = meta["ensemble"]
    # One config per member where they differ (archives before that: the one model_config for all).
    configs = info.get("model_configs") or [meta["model_config"]] * len(weights["members"])
    members = []
    for state_dict, config in zip(weights["members"], configs, strict=True):
        member = build_model(config)
        member.load_state_dict(state_dict)
        members.append(prepare(member.eval()) if prepare is not None else member.eval())
    return build_ensemble(members, info.get("temperatures"), info.get("method", "grouped"))
