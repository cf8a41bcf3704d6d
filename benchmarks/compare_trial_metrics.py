"""One inline trial of the README's main job on the synthetic default (``search_spaces/cam.yaml``'s
fixed values: ResNet-18, 128 px, 3 epochs, batch 16; lr 0.02, weight decay 0, seed S): print its
final val/test/train metrics as one JSON line. Run it with ``PYTHONPATH`` set to the checkout to
compare (an older commit exported with ``git archive``, or this one) and compare the lines;
``docs/input_pipeline.md`` has the comparison of issue 22.

    PYTHONPATH=. python benchmarks/compare_trial_metrics.py OUT_DIR SEED ['{"loader_workers": 1}']
"""
import json, sys, time
from pathlib import Path
import weakbench
from weakbench.platform import tracking
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, run_trial

out = Path(sys.argv[1]); seed = int(sys.argv[2]); extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
out.mkdir(parents=True, exist_ok=True)
cache = out / "cache"
source = open_dataset(None, cache_dir=cache)
sp = out / "splits.json"
save_splits(make_splits(source, seed=0), sp)
params = {"backbone": "resnet18", "input_size": 128, "epochs": 3, "batch_size": 16, "lr": 0.02, "weight_decay": 0.0, "seed": seed}
spec = TrialSpec(method="cam", params=params, data=None, data_cache=str(cache), splits_path=str(sp), trial_dir=str(out / "trial"),
                 tracking_uri=tracking.default_tracking_uri(out), log_model=False, num_overlays=0, **extra)
t = time.time()
m = run_trial(spec, executor="inline")
print(json.dumps({"code": weakbench.__file__, "seed": seed, "seconds": round(time.time() - t, 1),
                  **{k: v for k, v in sorted(m.items()) if k.startswith(("val/", "test/", "train/"))}}))
