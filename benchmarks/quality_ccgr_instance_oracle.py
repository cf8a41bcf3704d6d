"""CCGR's instance branch on oracle targets: is its 0 a bug or the budget?

Not a speed benchmark. Trains CCGR's instance branch exactly as the ``instance_r1`` stage builds it
(:class:`weakbench.methods.ccgr.InstanceFit`: model, optimiser, dataset of pseudo instances, losses)
but on the **ground-truth** instance masks, boxes and classes of the first ``--images`` train images
of the synthetic default (split seed 0), with a plain loop, and scores it on the first 20 **test**
images as ``instance_eval`` does (:func:`weakbench.methods.bbam.detection_metrics`: COCOeval and
VOC mAP^r, no image labels). If the test mAP^r rises clearly above 0 with enough steps, labels,
box scaling, mask pasting and the evaluation's matching work, and a 0 at the stop-rule table's
budget is the budget.

    python benchmarks/quality_ccgr_instance_oracle.py --size 64 --images 20 --epochs 30 --eval-every 10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="input_size (Mask R-CNN's min_size)")
    ap.add_argument("--images", type=int, default=20, help="train images (first of the split)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.01, help="mask_rcnn_lr")
    ap.add_argument("--batch", type=int, default=4, help="mask_rcnn_batch_size")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--eval-every", type=int, default=10, help="score on test every N epochs (and at the end)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from weakbench.core.data import make_splits, open_dataset
    from weakbench.methods import build_method
    from weakbench.methods.bbam import _rle, detection_metrics
    from weakbench.methods.ccgr import InstanceFit, _PseudoInstanceData

    torch.manual_seed(args.seed)
    source = open_dataset(None)
    splits = make_splits(source, seed=0)
    method = build_method("ccgr", {"backbone": args.backbone, "input_size": args.size, "mask_rcnn_lr": args.lr,
                                   "mask_rcnn_batch_size": args.batch, "seed": args.seed},
                          num_classes=source.num_classes, multilabel=source.multilabel)
    train = [int(i) for i in splits["train"]][:args.images]
    test = [int(i) for i in splits["test"]][:20]
    table = {}
    for i in train:
        a = source.annotations(i)
        table[f"train:{i}"] = {"fg": [_rle(np.asarray(m, bool)) for m in a.instance_masks],
                               "boxes_fg": np.asarray(a.boxes, np.float32).tolist(),
                               "classes_fg": [int(k) for k in a.box_classes]}
    fit = InstanceFit(method, 1, None)
    model = fit.build_model().train()
    loader = torch.utils.data.DataLoader(_PseudoInstanceData(source, train, table), batch_size=args.batch,
                                         shuffle=True, collate_fn=fit.collate)
    opt = fit.configure_optimizers(model)["main"]
    t0, step = time.time(), 0
    print(json.dumps({"train_images": len(train), "test_images": len(test), "steps_per_epoch": len(loader),
                      **vars(args)}), flush=True)
    for ep in range(1, args.epochs + 1):
        total = 0.0
        for batch in loader:
            losses = fit.training_losses(model, batch, None)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
            step += 1
            total += float(losses["loss"].detach())
        row = {"epoch": ep, "steps": step, "loss": round(total / len(loader), 3), "seconds": round(time.time() - t0)}
        if ep % args.eval_every == 0 or ep == args.epochs:
            m = detection_metrics(model, source, test, "cpu", masks=True)
            row.update({f"test/{k}": round(v, 1) for k, v in m.items() if k in ("segm_map_r50", "segm_map_r25",
                                                                               "bbox_map_r50", "segm_ap50")})
            model.train()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
