"""RMT as a detection / segmentation backbone in plain PyTorch: backbone + FPN + a dense head.

The backbone is the official RMT detection backbone (``vitattn.models.rmt.RMT``; same state_dict,
so ``--pretrained`` takes an official classification checkpoint, whose head is dropped, or a
detector / segmentor checkpoint, whose ``backbone.`` weights are used). The FPN is the usual
one (1x1 lateral convs, top-down nearest upsampling, 3x3 output convs); the head here sums the
levels at stride 4 and classifies every pixel (semantic segmentation), enough to train end to end:

    python examples/fpn_detection.py --size t --height 512 --width 864 --steps 2
    python examples/fpn_detection.py --size t --chunkwise 1 1 0 0 --height 800 --width 1344 --steps 1 --eval

``--chunkwise`` is per stage: 1 = decomposed MaSA, 0 = full MaSA (the official RMT-T detection
config runs stage 3 full, which vitattn's MaSA does in memory linear in the token count).
"""

from __future__ import annotations

import argparse
import time
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitattn.models.rmt import rmt_backbone


class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017) over NCHW maps of ``in_channels``, ``out_channels`` each."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in in_channels])
        self.output = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels])

    def forward(self, feats: List[Tensor]) -> List[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse to fine (sizes from odd inputs differ by one)
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class SegmentationModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, fpn_channels: int = 128):
        super().__init__()
        self.backbone = backbone
        self.fpn = FPN(backbone.feature_info.channels(), fpn_channels)
        self.classifier = nn.Conv2d(fpn_channels, num_classes, 1)

    def forward(self, images: Tensor) -> Tensor:
        pyramid = self.fpn(self.backbone(images))
        # Semantic-FPN style: every level upsampled to stride 4 and summed, then classified
        fused = pyramid[0]
        for p in pyramid[1:]:
            fused = fused + F.interpolate(p, size=fused.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(self.classifier(fused), size=images.shape[-2:], mode="bilinear", align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="t", choices=["t", "s", "b", "l"])
    ap.add_argument("--chunkwise", type=int, nargs=4, default=None, help="per stage: 1 decomposed, 0 full MaSA")
    ap.add_argument("--pretrained", default=None, help="local classification / backbone / detector checkpoint")
    ap.add_argument("--attn-backend", default="auto")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=864)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=19)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--eval", action="store_true", help="inference only (no_grad)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    kwargs = dict(attn_backend=args.attn_backend)
    if args.chunkwise is not None:
        kwargs["chunkwise_recurrents"] = [bool(c) for c in args.chunkwise]
    backbone = rmt_backbone(args.size, pretrained=args.pretrained, **kwargs)  # norm_eval=True, as officially
    model = SegmentationModel(backbone, args.num_classes).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        images = torch.randn(args.batch_size, 3, args.height, args.width, generator=g).to(args.device)
        labels = torch.randint(args.num_classes, (args.batch_size, args.height, args.width), generator=g)
        t = time.perf_counter()
        if args.eval:
            model.eval()
            with torch.no_grad():
                logits = model(images)
            print(f"step {step}: logits {tuple(logits.shape)} in {time.perf_counter() - t:.1f}s")
            continue
        model.train()  # the backbone's BatchNorm layers stay in eval mode (norm_eval)
        loss = F.cross_entropy(model(images), labels.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f} in {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
