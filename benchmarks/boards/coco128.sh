#!/usr/bin/env bash
# The coco128 board: the trivial baselines and the four classifier → CAM methods fine-tuned from the
# packaged pretrained EfficientNet-Lite0 (the ImageNet search spaces), 3 seeds each, then the board.
#
# coco128's 80 classes are not ImageNet's, so the CAM classifier is a new head (classifier_init
# random; Top-GAP's head is new anyway) at 10x the backbone's lr, and 10 epochs over the 77 train
# images of the 60/20/20 split (1 epoch of ImageNet's setting would be 5 steps here). Everything else
# is each file's paper protocol. The test split has 26 images (65 image–class pairs): read
# differences of a few points as sample noise, which the board's seed intervals do not show.
#
# usage: benchmarks/boards/coco128.sh [OUTPUT_DIR] [extra sweep options, e.g. --address local]
set -euo pipefail
cd "$(dirname "$0")/../.."
O=${1:-board_coco128}; shift || true
D=${WEAKBENCH_COCO128:-../shared/data/coco128}
W=${WEAKBENCH:-weakbench}
common=(--data "$D" -o "$O" --max-concurrent 1 --no-baselines "$@")
head=(--set classifier_init=random --set lr=0.01 --set backbone_lr_mult=0.1 --set epochs=10)
$W sweep search_spaces/center_gaussian.yaml "${common[@]}" --set input_size=224 --trials 5 --searcher random
$W sweep search_spaces/whole_image.yaml "${common[@]}" --set input_size=224 --trials 1
$W sweep search_spaces/cam_imagenet.yaml "${common[@]}" "${head[@]}" --trials 3
$W sweep search_spaces/minmaxcam_imagenet.yaml "${common[@]}" "${head[@]}" --set batch_size=20 --trials 3
$W sweep search_spaces/puzzlecam_imagenet.yaml "${common[@]}" "${head[@]}" --trials 3
$W sweep search_spaces/topgap_imagenet.yaml "${common[@]}" --set epochs=10 --trials 3
$W leaderboard -o "$O"
