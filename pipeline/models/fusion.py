"""Fusing the per-modality encoder streams at each scale: TP-MoME, and the baselines' fusions.

Stage 2 runs the encoder once per input modality (a "stream": rgb, thermal, depth, ...) and
gets, at every scale, M feature maps of one shape. TP-MoME fuses them with a mixture of
modality experts:

    R_cat = [P_1(x_1), ..., P_M(x_M)]     (B, M*D, H, W); P_m = 1x1 conv C->D + GroupNorm
    E_0(R_cat)                            general expert: sees every modality
    E_m(R_cat * mask_m)                   modality expert m: every other stream's slice zeroed
    gate(GAP(R_cat)) -> logits            per-sample weights over the experts

The seed paper leaves the gating equation out ("a gating network computes weights beta, where
R_cat acts as a stable anchor"), so four readings are switchable (`gating=`):

- "residual" (the config default): out = W_a [x_1, ..., x_M] + sum_k beta_k * E_k, k over all
  M+1 experts: the concatenated streams, mixed by one 1x1 conv (a `ConcatFusion`), are the
  stable anchor, and the gated experts add corrections to it. Every expert's last conv starts at
  zero, so TP-MoME starts as exactly the concat fusion the baselines use and the experts grow in;
  the anchor keeps the frozen encoder's full features, which the D = C/4 projections do not.
  (Measured on the demo's val split, 10% labels, 36 steps: 49.5 mIoU against 46.2 for "anchor".)
- "anchor": out = E_0(R_cat) + sum_m beta_m * E_m(R_cat * mask_m), beta = softmax
  over the M modality experts. The general expert is always on at full weight: it is the
  "stable anchor" of the design, and the gate only decides how to mix the modality-specific
  corrections on top of it.
- "softmax": out = sum_k beta_k * E_k over all M+1 experts, E_0 included (a plain soft MoE; the
  anchor can be down-weighted per sample).
- "mean": out = mean of the M+1 experts, no gating network (ablates the gate).

Missing and dropped modalities: `present` (B, M) marks the streams a sample has, and in training
modality dropout also drops each stream with probability p (never all of a sample's streams).
`MultiScaleFusion` draws the dropout once per sample and applies it at every scale, so a stream
dropped at stride 4 is dropped at stride 32 too, and the decoder never sees it.
An inactive stream's slice of R_cat is zeroed for every expert and the gate, and its expert's
weight is zero with the others renormalised (a masked softmax). The GroupNorm centres every
slice, so zero is the "average feature", a neutral placeholder.

`MultiScaleFusion` puts one fusion at each encoder scale; `ConcatFusion` (concat + 1x1 conv)
and `MeanFusion` (parameter-free average) are the simple fusions the baselines use and the
fallback at scales without TP-MoME.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATINGS = ("anchor", "softmax", "mean", "residual")
KINDS = ("tp_mome", "concat", "mean")


def masked_concat(maps: Sequence[Tensor], active: Tensor) -> Tensor:
    """Concatenate per-stream maps on channels, zeroing stream m where `active[:, m]` is False."""
    return torch.cat([x.masked_fill(~active[:, m, None, None, None], 0) for m, x in enumerate(maps)], dim=1)


def conv_mlp(in_channels: int, hidden_dim: int, out_channels: int) -> nn.Sequential:
    """An expert: 1x1 conv, GELU, depthwise 3x3, GELU, 1x1 conv (SegFormer's Mix-FFN shape).

    The 1x1 convs mix channels, i.e. modalities, at every pixel; the depthwise 3x3 adds local
    context for a few parameters, so an expert can absorb small misalignments between sensors.
    No normalisation inside, so zeroing the last conv makes the whole expert output exactly zero.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_dim, kernel_size=1),
        nn.GELU(),
        nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim),
        nn.GELU(),
        nn.Conv2d(hidden_dim, out_channels, kernel_size=1),
    )


class StreamFusion(nn.Module):
    """Input handling shared by the fusions: streams in a fixed order, and who is present."""

    def __init__(self, streams: Sequence[str]):
        super().__init__()
        if not streams or len(set(streams)) != len(streams):
            raise ValueError(f"streams must be distinct and non-empty, got {list(streams)}")
        self.streams = tuple(streams)

    def ordered(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [s for s in self.streams if s not in features]
        if missing:
            raise KeyError(f"no features for streams {missing}; got {sorted(features)}")
        return [features[s] for s in self.streams]

    def presence(self, present: Tensor | None, like: Tensor) -> Tensor:
        """(B, M) bool: all True when `present` is None; checked to leave each sample a stream."""
        shape = (like.shape[0], len(self.streams))
        if present is None:
            return torch.ones(shape, dtype=torch.bool, device=like.device)
        if tuple(present.shape) != shape:
            raise ValueError(
                f"present must have shape {shape} (batch, streams {self.streams}), got {tuple(present.shape)}"
            )
        present = present.to(device=like.device, dtype=torch.bool)
        if not present.any(dim=1).all():
            raise ValueError("every sample needs at least one present stream")
        return present


class MeanFusion(StreamFusion):
    """Parameter-free average of the present streams."""

    def forward(self, features: Mapping[str, Tensor], present: Tensor | None = None) -> Tensor:
        maps = self.ordered(features)
        weights = self.presence(present, maps[0]).to(maps[0].dtype)[..., None, None, None]
        return (torch.stack(maps, dim=1) * weights).sum(dim=1) / weights.sum(dim=1)


class ConcatFusion(StreamFusion):
    """Concatenate the streams (absent ones zeroed) and mix them with one 1x1 convolution."""

    def __init__(self, streams: Sequence[str], in_channels: int, out_channels: int | None = None):
        super().__init__(streams)
        self.mix = nn.Conv2d(len(self.streams) * in_channels, out_channels or in_channels, kernel_size=1)

    def forward(self, features: Mapping[str, Tensor], present: Tensor | None = None) -> Tensor:
        maps = self.ordered(features)
        return self.mix(masked_concat(maps, self.presence(present, maps[0])))


class TPMoME(StreamFusion):
    """Mixture of modality experts for one scale (see the module docstring for the equations).

    Experts are `experts[0]` (general) and `experts[1 + m]` (stream m). Defaults: D = C/4 per
    stream and hidden width C/2, so an expert costs about (M/8 + 1/2)*C^2 weights, in the
    order of one C->C 1x1 conv. After each forward, `last_gates` holds the detached weights
    per sample, columns named by `gate_names` (anchor: the M modality experts; softmax and
    mean: the general expert first, then the modality experts), and `last_active` the (B, M)
    streams that took part (`present`, after `MultiScaleFusion`'s modality dropout).

    Initialisation, for a stable start: the gate's last layer is zero, so every sample starts
    with uniform weights and no expert wins before the experts differ. With "anchor", the
    modality experts' last conv is zero too, so the first output is E_0(R_cat) alone and the
    modality experts grow in as residual corrections (ReZero/ControlNet style); their last conv
    gets gradient from the first step, so they do not stay zero. With "residual", every
    expert's last conv is zero and the first output is the anchor (`anchor`, a ConcatFusion).
    """

    def __init__(
        self,
        streams: Sequence[str],
        in_channels: int,
        out_channels: int | None = None,
        proj_dim: int | None = None,
        hidden_dim: int | None = None,
        gating: str = "residual",
    ):
        super().__init__(streams)
        if gating not in GATINGS:
            raise ValueError(f"unknown gating {gating!r}; choose one of {', '.join(GATINGS)}")
        m = len(self.streams)
        dim = proj_dim or max(in_channels // 4, 1)
        width = m * dim
        self.gating = gating
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=1), nn.GroupNorm(1, dim))
            for _ in self.streams
        )
        self.experts = nn.ModuleList(
            conv_mlp(width, hidden_dim or max(in_channels // 2, 1), out_channels or in_channels)
            for _ in range(m + 1)
        )
        # hide[m]: True on the channels of R_cat that modality expert m must not see
        hide = ~torch.eye(m, dtype=torch.bool).repeat_interleave(dim, dim=1)
        self.register_buffer("hide", hide[..., None, None], persistent=False)
        self.gate_names = self.streams if gating == "anchor" else ("general", *self.streams)
        self.gate = None
        if gating != "mean":
            self.gate = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, len(self.gate_names)))
            nn.init.zeros_(self.gate[-1].weight)
            nn.init.zeros_(self.gate[-1].bias)
        if gating == "anchor":
            for expert in self.experts[1:]:
                nn.init.zeros_(expert[-1].weight)
                nn.init.zeros_(expert[-1].bias)
        self.anchor = None
        if gating == "residual":
            self.anchor = ConcatFusion(self.streams, in_channels, out_channels)
            for expert in self.experts:
                nn.init.zeros_(expert[-1].weight)
                nn.init.zeros_(expert[-1].bias)
        self.last_gates: Tensor | None = None
        self.last_active: Tensor | None = None

    def concat(self, maps: Sequence[Tensor], active: Tensor) -> Tensor:
        """R_cat: the projected streams, inactive ones zeroed, (B, M*D, H, W)."""
        return masked_concat([p(x) for p, x in zip(self.project, maps, strict=True)], active)

    def only(self, r_cat: Tensor, m: int) -> Tensor:
        """R_cat with every slice but stream m's zeroed: modality expert m's input."""
        return r_cat.masked_fill(self.hide[m], 0)

    def gate_weights(self, r_cat: Tensor, active: Tensor) -> Tensor:
        """(B, len(gate_names)) weights, a distribution over the active experts of each sample."""
        if self.gating != "anchor":  # the general expert is always active
            active = torch.cat([torch.ones_like(active[:, :1]), active], dim=1)
        if self.gate is None:
            weights = active.float() / active.sum(dim=1, keepdim=True)
        else:
            logits = self.gate(r_cat.mean(dim=(2, 3))).float()
            weights = logits.masked_fill(~active, float("-inf")).softmax(dim=1)
        return weights.to(r_cat.dtype)

    def mixture(self, r_cat: Tensor, weights: Tensor) -> Tensor:
        """sum_k weights[:, k] * E_k(input_k), E_0 on R_cat and E_m on `only(R_cat, m)`, with all
        M+1 experts in three convolutions instead of 5(M+1) (the same function, up to float
        rounding; tests/test_fusion.py checks it against the experts run one by one):

        - first 1x1 convs as one conv to (M+1) * hidden channels; modality expert m's weight has
          the columns of the other streams zeroed, which is what zeroing their slice of its input did;
        - depthwise 3x3 convs as one depthwise conv over all (M+1) * hidden channels;
        - the weighted sum of the last 1x1 convs as one conv: sum_k w_k (W_k h_k + b_k)
          = [W_0 ... W_M] [w_0 h_0; ...; w_M h_M] + sum_k w_k b_k, so the M+1 outputs of
          C_out channels are never materialised (at stride 4, the largest tensors of the fusion).

        The experts stay `conv_mlp` modules (indices 0, 2, 4 are its convs), so checkpoints and
        the per-expert reading of the equations are unchanged."""
        first, depthwise, last = ([expert[i] for expert in self.experts] for i in (0, 2, 4))
        seen = [first[0].weight] + [conv.weight.masked_fill(self.hide[m][None], 0) for m, conv in enumerate(first[1:])]
        hidden = F.gelu(F.conv2d(r_cat, torch.cat(seen), torch.cat([conv.bias for conv in first])))
        hidden = F.gelu(F.conv2d(hidden, torch.cat([conv.weight for conv in depthwise]),
                                 torch.cat([conv.bias for conv in depthwise]), padding=depthwise[0].padding,
                                 groups=hidden.shape[1]))
        scaled = (hidden.unflatten(1, (len(self.experts), -1)) * weights[:, :, None, None, None]).flatten(1, 2)
        bias = weights @ torch.stack([conv.bias for conv in last])  # (B, C_out)
        return F.conv2d(scaled, torch.cat([conv.weight for conv in last], dim=1)) + bias[:, :, None, None]

    def forward(self, features: Mapping[str, Tensor], present: Tensor | None = None) -> Tensor:
        """{stream: (B, C, H, W)} -> (B, out_channels, H, W); `present` (B, M) marks missing inputs."""
        maps = self.ordered(features)
        active = self.presence(present, maps[0])
        r_cat = self.concat(maps, active)
        weights = self.gate_weights(r_cat, active)
        self.last_gates, self.last_active = weights.detach(), active
        if self.gating == "anchor":  # E_0 at full weight, the gate mixes the modality experts
            weights = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=1)
        mixture = self.mixture(r_cat, weights)
        if self.anchor is not None:
            return self.anchor.mix(masked_concat(maps, active)) + mixture
        return mixture


def drop_streams(present: Tensor, p: float) -> Tensor:
    """Modality dropout: drop each present stream with probability p, then give a sample that
    lost all its streams back one present stream, chosen at random. (B, M) bool -> (B, M) bool."""
    kept = present & (torch.rand(present.shape, device=present.device) >= p)
    rescue = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0).argmax(dim=1)
    emptied = ~kept.any(dim=1, keepdim=True)
    return kept | (F.one_hot(rescue, present.shape[1]).bool() & emptied)


class MultiScaleFusion(nn.Module):
    """One fusion per encoder scale; output channels equal `channels`, so decoders are unchanged.

    kind "tp_mome": TPMoME at `stages` (tp_mome_kwargs go to each), MeanFusion elsewhere;
    "concat": ConcatFusion at every scale; "mean": MeanFusion at every scale. In training,
    `modality_dropout` drops streams once per sample for all scales (`drop_streams`);
    `last_active` holds the (B, M) streams of the last forward.
    """

    def __init__(
        self,
        streams: Sequence[str],
        channels: Sequence[int],
        kind: str = "tp_mome",
        stages: Sequence[int] = (0, 1, 2, 3),
        modality_dropout: float = 0.0,
        **tp_mome_kwargs,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown fusion {kind!r}; choose one of {', '.join(KINDS)}")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.modality_dropout = modality_dropout
        self.last_active: Tensor | None = None
        if tp_mome_kwargs and kind != "tp_mome":
            raise ValueError(f"options {sorted(tp_mome_kwargs)} only apply to kind='tp_mome', not {kind!r}")
        if not set(stages) <= set(range(len(channels))):
            raise ValueError(f"stages {list(stages)} must index the {len(channels)} scales")

        def fusion(stage: int, c: int) -> nn.Module:
            if kind == "concat":
                return ConcatFusion(streams, c)
            if kind == "tp_mome" and stage in stages:
                return TPMoME(streams, c, **tp_mome_kwargs)
            return MeanFusion(streams)

        self.scales = nn.ModuleList(fusion(i, c) for i, c in enumerate(channels))

    def forward(
        self, features: Mapping[str, Sequence[Tensor]], present: Tensor | None = None
    ) -> list[Tensor]:
        """{stream: [one map per scale]} -> [fused map per scale]."""
        for stream, maps in features.items():
            if len(maps) != len(self.scales):
                raise ValueError(f"stream {stream!r} has {len(maps)} maps, expected {len(self.scales)}")
        finest = self.scales[0].ordered({s: maps[0] for s, maps in features.items()})[0]
        present = self.scales[0].presence(present, finest)
        if self.training and self.modality_dropout > 0:
            present = drop_streams(present, self.modality_dropout)
        self.last_active = present
        return [
            fusion({s: maps[i] for s, maps in features.items()}, present)
            for i, fusion in enumerate(self.scales)
        ]

    @property
    def last_gates(self) -> dict[int, Tensor]:
        """Gate weights of the last forward per TP-MoME scale, for logging."""
        return {
            i: f.last_gates
            for i, f in enumerate(self.scales)
            if isinstance(f, TPMoME) and f.last_gates is not None
        }
