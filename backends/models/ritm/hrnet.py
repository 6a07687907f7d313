"""HRNet-W18/W32 backbone with the OCR head, as used by RITM's ``HRNetModel``.

A clean re-implementation of the network in RITM's ``isegm/model/modeling/hrnet_ocr.py``,
``ocr.py`` and ``resnetv1b.py``. Module names, nesting and parameter shapes follow the official
code exactly so the released ``state_dict`` files load with ``strict=True``; the order of the
additions in the fusion layers is also the official one (float sums are not associative).

Layout (``small`` halves the block counts of the released HRNet18s):

* stem: two stride-2 3×3 convs; RITM adds the click features (already at stride 2) between them;
* ``layer1``: Bottleneck blocks at 64 → 256 channels (4 blocks, 2 if small);
* stages 2/3/4 with 2/3/4 branches of widths ``w, 2w, 4w, 8w`` (modules 1/4/3, small 1/3/2);
* the four branch outputs upsampled (bilinear, ``align_corners=True``) and concatenated;
* OCR: ``aux_head`` gives a coarse logit map, used as a soft object region to gather one context
  vector, which an object-attention block distributes back to every pixel; ``cls_head`` then
  gives the final logits (at stride 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet V1b basic block (two 3×3 convs), the branch block of HRNet stages 2-4."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """ResNet V1b bottleneck (1×1, 3×3, 1×1; stride on the 3×3), used by ``layer1``."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def _make_blocks(
    block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int
) -> nn.Sequential:
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=1, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers: list[nn.Module] = [block(inplanes, planes, 1, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """One multi-branch module: per-branch residual blocks, then all-to-all fusion."""

    def __init__(self, num_blocks: int, channels: list[int]) -> None:
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(_make_blocks(BasicBlock, c, c, num_blocks) for c in channels)
        self.fuse_layers = self._make_fuse_layers(channels) if self.num_branches > 1 else None
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _make_fuse_layers(channels: list[int]) -> nn.ModuleList:
        n = len(channels)
        fuse_layers = nn.ModuleList()
        for i in range(n):
            row: list[nn.Module | None] = []
            for j in range(n):
                if j > i:  # coarser branch: 1×1 conv, then upsampled in forward
                    row.append(_conv_bn(channels[j], channels[i], 1, 1, relu=False))
                elif j == i:
                    row.append(None)
                else:  # finer branch: (i - j) stride-2 3×3 convs, ReLU on all but the last
                    steps = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = channels[i] if last else channels[j]
                        steps.append(_conv_bn(channels[j], cout, 3, 2, relu=not last))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        return fuse_layers

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.fuse_layers is None:
            return [self.branches[0](xs[0])]
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else row[0](xs[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + xs[j]
                elif j > i:
                    size = [xs[i].shape[-2], xs[i].shape[-1]]
                    y = y + F.interpolate(
                        row[j](xs[j]), size=size, mode="bilinear", align_corners=True
                    )
                else:
                    y = y + row[j](xs[j])
            fused.append(self.relu(y))
        return fused


class SpatialGather(nn.Module):
    """Soft object-region pooling: softmax of the coarse logits over pixels weights the features."""

    def forward(self, feats: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        b, k = probs.shape[:2]
        probs = F.softmax(probs.view(b, k, -1), dim=2)  # B×K×HW
        feats = feats.view(b, feats.shape[1], -1).permute(0, 2, 1)  # B×HW×C
        return torch.matmul(probs, feats).permute(0, 2, 1).unsqueeze(3)  # B×C×K×1


def _conv_bn_relu_nested(cin: int, cout: int) -> list[nn.Module]:
    # The official code wraps BatchNorm + ReLU in their own Sequential (hence keys like "1.0.").
    return [
        nn.Conv2d(cin, cout, 1, stride=1, padding=0, bias=False),
        nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True)),
    ]


class ObjectAttentionBlock(nn.Module):
    """OCR object attention (scale 1): pixel queries attend to the object-region keys.

    With a single object region the softmax over regions is identically 1, so ``f_pixel`` and
    ``f_object`` cannot change the result; they are still evaluated, as in the official code.
    """

    def __init__(self, in_channels: int, key_channels: int) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(
            *_conv_bn_relu_nested(in_channels, key_channels),
            *_conv_bn_relu_nested(key_channels, key_channels),
        )
        self.f_object = nn.Sequential(
            *_conv_bn_relu_nested(in_channels, key_channels),
            *_conv_bn_relu_nested(key_channels, key_channels),
        )
        self.f_down = nn.Sequential(*_conv_bn_relu_nested(in_channels, key_channels))
        self.f_up = nn.Sequential(*_conv_bn_relu_nested(key_channels, in_channels))

    def forward(self, x: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        query = self.f_pixel(x).view(b, self.key_channels, -1).permute(0, 2, 1)
        key = self.f_object(proxy).view(b, self.key_channels, -1)
        value = self.f_down(proxy).view(b, self.key_channels, -1).permute(0, 2, 1)
        sim_map = (self.key_channels**-0.5) * torch.matmul(query, key)
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        return self.f_up(context.view(b, self.key_channels, h, w))


class SpatialOCR(nn.Module):
    """Object-contextual representation: concat(context, features) → 1×1 conv + BN + ReLU."""

    def __init__(self, in_channels: int, key_channels: int, out_channels: int) -> None:
        super().__init__()
        self.object_context_block = ObjectAttentionBlock(in_channels, key_channels)
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels, out_channels, 1, padding=0, bias=False),
            nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)),
            nn.Dropout2d(0.05),  # identity in eval mode
        )

    def forward(self, feats: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
        context = self.object_context_block(feats, proxy)
        return self.conv_bn_dropout(torch.cat([context, feats], 1))


class HighResolutionNet(nn.Module):
    """RITM's ``HighResolutionNet`` (``num_classes=1``): returns ``[logits, aux_logits]``."""

    def __init__(self, width: int, ocr_width: int = 256, small: bool = False) -> None:
        super().__init__()
        self.width = width
        self.ocr_width = ocr_width

        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        num_blocks = 2 if small else 4
        self.layer1 = _make_blocks(Bottleneck, 64, 64, num_blocks)
        stage1_out = 64 * Bottleneck.expansion

        ch2 = [width, 2 * width]
        ch3 = [width, 2 * width, 4 * width]
        ch4 = [width, 2 * width, 4 * width, 8 * width]
        self.transition1 = self._make_transition([stage1_out], ch2)
        self.stage2 = self._make_stage(1, num_blocks, ch2)
        self.transition2 = self._make_transition(ch2, ch3)
        self.stage3 = self._make_stage(3 if small else 4, num_blocks, ch3)
        self.transition3 = self._make_transition(ch3, ch4)
        self.stage4 = self._make_stage(2 if small else 3, num_blocks, ch4)

        last_channels = sum(ch4)
        if ocr_width > 0:
            mid = 2 * ocr_width
            self.conv3x3_ocr = nn.Sequential(
                nn.Conv2d(last_channels, mid, 3, stride=1, padding=1),
                nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True),
            )
            self.ocr_gather_head = SpatialGather()
            self.ocr_distri_head = SpatialOCR(mid, ocr_width, mid)
            self.cls_head = nn.Conv2d(mid, 1, 1, stride=1, padding=0, bias=True)
            self.aux_head = nn.Sequential(
                nn.Conv2d(last_channels, last_channels, 1, stride=1, padding=0),
                nn.BatchNorm2d(last_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(last_channels, 1, 1, stride=1, padding=0, bias=True),
            )
        else:
            self.cls_head = nn.Sequential(
                nn.Conv2d(last_channels, last_channels, 3, stride=1, padding=1),
                nn.BatchNorm2d(last_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(last_channels, 1, 1, stride=1, padding=0, bias=True),
            )

    @staticmethod
    def _make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
        layers: list[nn.Module | None] = []
        for i, cout in enumerate(cur):
            if i < len(pre):
                layers.append(_conv_bn(pre[i], cout, 3, 1, relu=True) if pre[i] != cout else None)
            else:  # a new, coarser branch grown from the last one by stride-2 convs
                steps = []
                for j in range(i + 1 - len(pre)):
                    out = cout if j == i - len(pre) else pre[-1]
                    steps.append(_conv_bn(pre[-1], out, 3, 2, relu=True))
                layers.append(nn.Sequential(*steps))
        return nn.ModuleList(layers)

    @staticmethod
    def _make_stage(num_modules: int, num_blocks: int, channels: list[int]) -> nn.Sequential:
        return nn.Sequential(
            *(HighResolutionModule(num_blocks, list(channels)) for _ in range(num_modules))
        )

    @staticmethod
    def _transit(transition: nn.ModuleList, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = []
        for i, layer in enumerate(transition):
            if layer is None:
                xs.append(ys[i])
            else:
                xs.append(layer(ys[i] if i < len(ys) else ys[-1]))
        return xs

    def compute_hrnet_feats(
        self, x: torch.Tensor, additional_features: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if additional_features is not None:
            x = x + additional_features
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self.stage2(self._transit(self.transition1, [x]))
        ys = self.stage3(self._transit(self.transition2, ys))
        ys = self.stage4(self._transit(self.transition3, ys))
        size = (ys[0].shape[2], ys[0].shape[3])
        ups = [F.interpolate(y, size=size, mode="bilinear", align_corners=True) for y in ys[1:]]
        return torch.cat([ys[0], *ups], 1)

    def forward(
        self, x: torch.Tensor, additional_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.compute_hrnet_feats(x, additional_features)
        if self.ocr_width <= 0:
            return self.cls_head(feats), None
        out_aux = self.aux_head(feats)
        feats = self.conv3x3_ocr(feats)
        context = self.ocr_gather_head(feats, out_aux)
        feats = self.ocr_distri_head(feats, context)
        return self.cls_head(feats), out_aux
