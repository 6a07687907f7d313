"""RITM's click-conditioned network (the official ``HRNetModel`` / ``ISModel`` forward).

``net(image, points)``:

* ``image``: B×C×H×W float32, RGB in [0, 1] (``uint8 / 255``), plus a 4th channel with the
  previous probability map when ``with_prev_mask``;
* ``points``: B×2N×3 rows ``(y, x, click_index)`` in pixels of this input; rows ``0..N-1`` the
  positive clicks, ``N..2N-1`` the negative ones, padded with ``(-1, -1, -1)``. Its dtype matters
  the way it does in the official code (see :func:`click_maps`).

Returns ``{'instances': logits, 'instances_aux': aux_logits}``, both resized to H×W (bilinear,
``align_corners=True``); ``instances_aux`` only when ``with_aux_output`` (else at stride 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backends.models.ritm.hrnet import HighResolutionNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RitmConfig:
    """Architecture options of ``HRNetModel``; defaults are the official constructor defaults."""

    width: int = 48
    ocr_width: int = 256
    small: bool = False
    use_rgb_conv: bool = True
    with_aux_output: bool = False
    norm_radius: float = 260
    use_disks: bool = False
    with_prev_mask: bool = False
    use_leaky_relu: bool = False
    binary_prev_mask: bool = False
    conv_extend: bool = False
    norm_mean: tuple[float, float, float] = IMAGENET_MEAN
    norm_std: tuple[float, float, float] = IMAGENET_STD

    @property
    def coord_feature_ch(self) -> int:
        return 2 + int(self.with_prev_mask)


#: The architectures of the released ``coco_lvis_h*_itermask.pth`` checkpoints (read from their
#: ``config``), for random-weight builds (benchmarks): the weights do not change the cost.
OFFICIAL_CONFIGS = {
    variant: RitmConfig(
        width=width,
        ocr_width=ocr_width,
        small=small,
        use_rgb_conv=False,
        with_aux_output=True,
        norm_radius=5,
        use_disks=True,
        with_prev_mask=True,
        use_leaky_relu=True,
    )
    for variant, width, ocr_width, small in (
        ("h18", 18, 64, False),
        ("h18s", 18, 48, True),
        ("h32", 32, 128, False),
    )
}


def click_maps(
    points: torch.Tensor, rows: int, cols: int, norm_radius: float, use_disks: bool
) -> torch.Tensor:
    """Positive/negative click encodings, B×2×rows×cols float32 (official ``DistMaps``).

    The official code builds a (B·2N)×2×H×W tensor of coordinate differences and takes a minimum
    over the N clicks of each group. This computes the same per-click values one click at a time
    (a running minimum is exact), keeping memory at a few H×W maps on large frames. The
    arithmetic is kept operation for operation, including dtype promotion: ``points * 1.0`` is
    float32 for int64 points and stays float64 for float64 points; subtracting a float64 click
    from the float32 pixel grid happens in float64 and is rounded to float32; squares and sums
    are float32. Disks: ``d² <= norm_radius²``. Otherwise (older models): ``tanh(2·d/r)``.
    """
    batch = points.shape[0]
    num_points = points.shape[1] // 2
    device = points.device
    scaled = points[:, :, :2] * 1.0  # spatial_scale = 1.0; sets the dtype as in the original
    invalid = torch.max(scaled, dim=2)[0] < 0  # a row is padding when both y and x are negative
    row_grid = torch.arange(rows, dtype=torch.float32, device=device)
    col_grid = torch.arange(cols, dtype=torch.float32, device=device)
    out = torch.full((batch, 2, rows, cols), 1e6, dtype=torch.float32, device=device)
    scaled_cpu = invalid.cpu()
    for b in range(batch):
        for group in range(2):
            for k in range(num_points):
                index = group * num_points + k
                if bool(scaled_cpu[b, index]):
                    continue
                y = scaled[b, index, 0:1]  # shape (1,): participates in type promotion
                x = scaled[b, index, 1:2]
                dy = row_grid.clone()
                dx = col_grid.clone()
                dy.add_(-y)
                dx.add_(-x)
                if not use_disks:
                    dy.div_(norm_radius * 1.0)
                    dx.div_(norm_radius * 1.0)
                dy.mul_(dy)
                dx.mul_(dx)
                dist = dy[:, None] + dx[None, :]
                torch.minimum(out[b, group], dist, out=out[b, group])
    if use_disks:
        return (out <= (norm_radius * 1.0) ** 2).float()
    return out.sqrt_().mul_(2).tanh_()


class ScaleLayer(nn.Module):
    """Multiplies by ``|scale|`` (a learned scalar; ``lr_mult`` is 1 in every released model)."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), init_value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.abs(self.scale * 1)


class HRNetModel(nn.Module):
    """Click-conditioned HRNet+OCR (RITM ``isegm.model.is_hrnet_model.HRNetModel``), eval only."""

    def __init__(self, config: RitmConfig) -> None:
        super().__init__()
        self.config = config
        self.with_prev_mask = config.with_prev_mask
        ch = config.coord_feature_ch

        def act() -> nn.Module:
            return nn.LeakyReLU(negative_slope=0.2) if config.use_leaky_relu else nn.ReLU(True)

        self.rgb_conv: nn.Module | None = None
        self.maps_transform: nn.Module | None = None
        if config.use_rgb_conv:
            self.rgb_conv = nn.Sequential(
                nn.Conv2d(3 + ch, 6 + ch, kernel_size=1),
                nn.BatchNorm2d(6 + ch),
                act(),
                nn.Conv2d(6 + ch, 3, kernel_size=1),
            )
        elif config.conv_extend:
            self.maps_transform = nn.Conv2d(ch, 64, kernel_size=3, stride=2, padding=1)
        else:  # "Conv1S": the click maps enter the backbone after its first conv
            self.maps_transform = nn.Sequential(
                nn.Conv2d(ch, 16, kernel_size=1),
                act(),
                nn.Conv2d(16, 64, kernel_size=3, stride=2, padding=1),
                ScaleLayer(init_value=0.05),
            )
        self.feature_extractor = HighResolutionNet(
            width=config.width, ocr_width=config.ocr_width, small=config.small
        )
        # Not part of the state dict (the official normaliser is a plain object).
        self.register_buffer(
            "norm_mean",
            torch.tensor(config.norm_mean, dtype=torch.float32)[None, :, None, None],
            persistent=False,
        )
        self.register_buffer(
            "norm_std",
            torch.tensor(config.norm_std, dtype=torch.float32)[None, :, None, None],
            persistent=False,
        )

    def forward(
        self, image: torch.Tensor, points: torch.Tensor, aux: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits for ``image`` (B×C×H×W) and ``points`` (B×2N×3); see the module docstring.

        ``aux=False`` skips resizing ``instances_aux`` (the predictor never reads it);
        ``None`` follows ``with_aux_output`` like the official model.
        """
        cfg = self.config
        prev_mask = None
        if cfg.with_prev_mask:
            prev_mask = image[:, 3:, :, :]
            image = image[:, :3, :, :]
            if cfg.binary_prev_mask:
                prev_mask = (prev_mask > 0.5).float()
        image = image.clone().sub_(self.norm_mean).div_(self.norm_std)

        coord = click_maps(points, image.shape[2], image.shape[3], cfg.norm_radius, cfg.use_disks)
        if prev_mask is not None:
            coord = torch.cat((prev_mask, coord), dim=1)

        if self.rgb_conv is not None:
            logits, aux_logits = self.feature_extractor(self.rgb_conv(torch.cat((image, coord), 1)))
        else:
            assert self.maps_transform is not None
            logits, aux_logits = self.feature_extractor(image, self.maps_transform(coord))

        size = image.shape[2:]
        outputs = {
            "instances": F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        }
        if aux_logits is not None:
            if aux if aux is not None else cfg.with_aux_output:
                aux_logits = F.interpolate(
                    aux_logits, size=size, mode="bilinear", align_corners=True
                )
            outputs["instances_aux"] = aux_logits
        return outputs
