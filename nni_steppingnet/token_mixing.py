"""Token-mixing MLPs (MLP-Mixer, ResMLP): Linears over the token axis that never mix channels.

A Mixer block transposes its ``[batch, tokens, channels]`` activations to
``[batch, channels, tokens]`` and applies an MLP over the *token* axis (timm's
``MixerBlock.mlp_tokens``: ``fc1 -> act -> fc2``; ResMLP's ``ResBlock.linear_tokens``: one
Linear), then transposes back. For every channel ``c`` it computes the same token -> token map of
that channel's own values: it never mixes two channels, so it never mixes two subnets. The rule:

* a token-mixing Linear is **not** a neuron layer: its weight is never masked, it is left out of
  the neuron groups (torch-pruning gets it in ``ignored_layers``, so its tracer treats it as an
  op that passes the channel dimension through unchanged), and its hidden width (``fc1``'s
  outputs) is a number of tokens, not channels;
* the channel dimension passes through it unchanged: channel ``c`` of its input and of its output
  are one neuron (the residual channel ``c`` read through ``norm1``), so the residual stream before
  and after the token MLP stays one group;
* channel ``c`` of the token MLP is *active* in subnet ``s`` iff its neuron's index is ``<= s``;
  an inactive channel computes the MLP of zeros (its biases), which no active neuron reads (the
  mask rule keeps it out of every smaller subnet's weights) and which an exported subnet does not
  compute at all.

Detection is structural: a module with a ``norm1`` child and a ``mlp_tokens`` child holding
Linears (timm's ``MixerBlock``) or a ``linear_tokens`` Linear (timm's ``ResBlock``); a forward
probe then checks that the first token Linear reads the *transposed* output of ``norm1``
(``[batch, channels, tokens]``, a view of the same storage) with ``in_features`` equal to the
number of tokens, and that every token Linear keeps the channel dimension (``-2``) of that width.
A block that fails the probe is refused by name, and so is a token MLP other than timm's plain
``Mlp`` (gMixer's gated ``GluMlp``: torch-pruning's tracer does not finish on its split of
the token axis). gMLP's spatial gating unit (timm's
``SpatialGatingUnit``: the token-mixed half of the channels multiplies the other half) is
refused by name (:func:`unsupported_token_mixing_reason`).

MACs (the rule :meth:`TokenMixingSpec.macs` implements): a token-mixing Linear costs
``in_features x out_features`` per *active channel* per call (it runs once per active channel of
every sample), i.e. ``in x out x calls x |{c : a(c) <= s}|`` per sample in subnet ``s``; the
activation and the transposes cost none. That is what a dense kernel spends on the exported
subnet, whose token Linears run over the kept channels only
(:func:`nni_steppingnet.macs.macs` counts them so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, cast

import torch
import torch.nn as nn

from ._inputs import batch_size, probe_forward

__all__ = [
    "TokenMixingSpec",
    "token_mixing_candidates",
    "unsupported_token_mixing_reason",
    "probe_token_mixing",
    "token_channel_positions",
]

logger = logging.getLogger(__name__)


@dataclass
class TokenMixingSpec:
    """One token-mixing Linear: where its channels live in the flat neuron vector."""

    #: module name of the Linear
    name: str
    #: module name of the block it belongs to
    block: str
    in_features: int
    out_features: int
    #: flat neuron position of every channel it runs over (its input's dim -2)
    positions: torch.Tensor
    #: calls per forward (1 for timm's blocks)
    calls: int = 1

    @property
    def channel_macs(self) -> int:
        """MACs per sample of one active channel (all calls)."""
        return self.in_features * self.out_features * self.calls

    def macs(self, active_channels: int) -> int:
        """MACs per sample with ``active_channels`` channels active."""
        return self.channel_macs * int(active_channels)


def token_mixing_candidates(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """Blocks with a token-mixing MLP: block name -> (name of ``norm1``, names of the token
    Linears in call order), found structurally (see the module docstring)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for name, module in model.named_modules():
        norm = getattr(module, "norm1", None)
        if not isinstance(norm, nn.Module):
            continue
        prefix = f"{name}." if name else ""
        tokens = getattr(module, "linear_tokens", None)
        if isinstance(tokens, nn.Linear):
            found[name] = (f"{prefix}norm1", [f"{prefix}linear_tokens"])
            continue
        mlp = getattr(module, "mlp_tokens", None)
        if isinstance(mlp, nn.Module):
            linears = [f"{prefix}mlp_tokens.{n}" for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                found[name] = (f"{prefix}norm1", linears)
    return found


def unsupported_token_mixing_reason(module: nn.Module) -> str | None:
    """Why a token-mixing module cannot hold the subnets (``None``: supported, or not one)."""
    if type(module).__name__ == "SpatialGatingUnit":
        return (
            "gMLP's spatial gating unit multiplies two activations (u * proj(norm(v)): the "
            "token-mixed half of the channels gates the other half), which the per-channel "
            "token-mixing rule does not cover; MLP-Mixer and ResMLP blocks are supported"
        )
    mlp = getattr(module, "mlp_tokens", None)
    if isinstance(getattr(module, "norm1", None), nn.Module) and isinstance(mlp, nn.Module):
        linears = [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
        if linears and (type(mlp).__name__ != "Mlp" or linears != ["fc1", "fc2"]):
            return (
                f"{type(module).__name__}.mlp_tokens is a {type(mlp).__name__} with Linears {linears}; only "
                "timm's plain Mlp (fc1 -> act -> fc2) is supported as a token-mixing MLP (gated token "
                "MLPs such as gMixer's GluMlp are not): build the model with mlp_layer=timm.layers.Mlp"
            )
    return None


def probe_token_mixing(
    model: nn.Module, example_inputs: Any, candidates: Mapping[str, tuple[str, list[str]]]
) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]]]:
    """Run one forward and check every candidate block: its first token Linear reads the
    transposed output of ``norm1``, every token Linear keeps the channel dimension.

    Returns (token Linear name -> (channels, calls per forward), problems as (name, reason)).
    """
    modules = dict(model.named_modules())
    norm_out: dict[str, torch.Tensor] = {}
    seen: dict[str, list[tuple[int, ...]]] = {}
    first_ok: dict[str, bool] = {}
    firsts = {linears[0]: norm for norm, linears in candidates.values()}
    handles = []

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                norm_out[name] = output

        return hook

    def watch(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None:
                return
            seen.setdefault(name, []).append(tuple(x.shape))
            norm = firsts.get(name)
            if norm is not None:
                source = norm_out.get(norm)
                ok = (
                    source is not None
                    and source.dim() == 3
                    and x.shape == source.transpose(-1, -2).shape
                    and x.data_ptr() == source.data_ptr()
                    and x.stride() == source.transpose(-1, -2).stride()
                )
                first_ok[name] = first_ok.get(name, True) and bool(ok)

        return hook

    for norm, linears in candidates.values():
        handles.append(modules[norm].register_forward_hook(keep(norm)))
        for linear in linears:
            handles.append(modules[linear].register_forward_pre_hook(watch(linear)))
    probe_forward(model, example_inputs, handles)
    batch = batch_size(example_inputs)
    found: dict[str, tuple[int, int]] = {}
    problems: list[tuple[str, str]] = []
    for block, (norm, linears) in candidates.items():
        channels = None
        for k, linear in enumerate(linears):
            shapes = seen.get(linear)
            if not shapes:
                problems.append((linear, "token-mixing Linear is never called in forward"))
                continue
            module = cast(nn.Linear, modules[linear])
            if k == 0 and not first_ok.get(linear, False):
                problems.append(
                    (
                        linear,
                        f"{type(modules[block]).__name__} looks like a token-mixing block, but its first "
                        f"token Linear does not read the transposed output of {norm!r} "
                        "([batch, channels, tokens]); only Linears over the token axis of norm1's "
                        "output are supported",
                    )
                )
                continue
            widths = {shape[-2] if len(shape) == 3 and shape[0] == batch else -1 for shape in shapes}
            if len(widths) != 1 or -1 in widths or (channels is not None and widths != {channels}):
                problems.append(
                    (
                        linear,
                        f"token-mixing Linear is called on inputs of shapes {shapes[:2]}, not "
                        "[batch, channels, tokens] with the channel count of norm1's output",
                    )
                )
                continue
            channels = next(iter(widths))
            if k == 0 and module.in_features != shapes[0][-1]:
                problems.append((linear, "token-mixing Linear's in_features is not the number of tokens"))
                continue
            found[linear] = (channels, len(shapes))
    return found, problems


def token_channel_positions(
    norm: str,
    channel_modules: Mapping[str, torch.Tensor],
    channel_parameters: Mapping[str, torch.Tensor],
) -> torch.Tensor | None:
    """Flat neuron positions of the channels of ``norm`` (the module the token MLP reads): from
    the per-channel module table (LayerNorm) or a per-channel parameter of it (ResMLP's
    ``Affine.alpha``); ``None`` when torch-pruning mapped none."""
    if norm in channel_modules:
        return channel_modules[norm]
    for name, positions in channel_parameters.items():
        owner, _, _ = name.rpartition(".")
        if owner == norm:
            return positions
    return None
