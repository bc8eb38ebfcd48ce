"""ASL under DDP / FSDP2 (torchrun, 2 ranks, gloo): gradients of one step against one process.

The scenario is mae_worker.py's (each rank takes half of a global batch of 16 images, masks drawn
once for the whole batch; one pass and exact accumulation in micro-batches of 3 against one
process on the concatenated batch; gradient synchronisations counted), run with the overrides of
`--set` (the test's ASL config) instead of MAE's. Rank r writes `<out>/asl_<engine>_rank<r>.json`.

`--fixed-dropout` (DLE): the library draws the embedding dropout from the global RNG, seeded per
(step, rank), so a rank's masks cannot equal the single process's rows. The worker replaces the
draw with a mask that depends only on the image's bytes and the encoder pass, everywhere
(`scale.models.vit.F.dropout` stands in for the draw; nothing else of the library changes), so
the comparison tests what DDP does with the two passes' gradients under identical dropout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mae_worker  # noqa: E402

from scale.models import vit  # noqa: E402


class ImageKeyedDropout:
    """Stands in for torch.nn.functional inside scale.models.vit: `dropout` keeps each (image, pass)
    row with a mask drawn from that image's bytes and the pass, whatever rank or micro-batch it is in."""

    def __init__(self):
        self.keys: list = []
        self.calls = 0

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def dropout(self, x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
        passes = x.shape[0] // len(self.keys)  # rows are (image, pass), pass fastest (PretrainModule.encode)
        masks = [torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(key * passes + g)) >= p
                 for key in self.keys for g in range(passes)]
        self.calls += 1
        return x * torch.stack(masks).to(x.dtype) / (1.0 - p)

    def install(self) -> None:
        encode = vit.VisibleTokenViT.encode
        keyed = self

        def keyed_encode(encoder, images, *args, **kwargs):
            keyed.keys = [int.from_bytes(hashlib.sha256(row.detach().cpu().numpy().tobytes()).digest()[:6], "little")
                          for row in images]
            return encode(encoder, images, *args, **kwargs)

        vit.VisibleTokenViT.encode = keyed_encode
        vit.F = self


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fixed-dropout", action="store_true")
    args, rest = parser.parse_known_args()
    dropout = ImageKeyedDropout()
    if args.fixed_dropout:
        dropout.install()
    mae_worker.MAE_TINY = tuple(args.override)  # the scenario's config: ASL's instead of MAE's
    sys.argv = [sys.argv[0], *rest]
    code = mae_worker.main()
    out = Path(rest[rest.index("--out") + 1])
    engine, rank = rest[rest.index("--engine") + 1], int(os.environ.get("RANK", "0"))
    written = (out / f"mae_{engine}_rank{rank}.json").rename(out / f"asl_{engine}_rank{rank}.json")
    results = json.loads(written.read_text())
    results["fixed_dropout_calls"] = dropout.calls
    written.write_text(json.dumps(results))
    return code


if __name__ == "__main__":
    sys.exit(main())
