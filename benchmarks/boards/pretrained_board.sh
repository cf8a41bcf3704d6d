#!/usr/bin/env bash
# A board on data whose classes are not ImageNet's (coco128, the synthetic default): the trivial
# baselines and the four classifier → CAM methods fine-tuned from the packaged pretrained
# EfficientNet-Lite0 with each method's ImageNet search space (its paper protocol), 3 seeds each,
# then the leaderboard.
#
# What differs from the ImageNet board, and why: the classes are not the pretrained head's, so the
# CAM classifier is a new head (classifier_init random; Top-GAP's head is new anyway) at 10x the
# backbone's lr, and 10 epochs instead of 1 (coco128 has 76 train images in the 60/20/20 split, the
# synthetic default 57: one epoch would be 3-5 steps). MinMaxCAM's batch is 4 sets of 5 instead of
# 12 (fewer images than one batch otherwise). Everything else is each file's protocol. The test
# splits are small (coco128: 26 images, 65 image–class pairs; synthetic: 19 images): differences of
# a few points are test-sample noise, which the board's seed intervals do not show.
#
# usage: benchmarks/boards/pretrained_board.sh DATA OUTPUT_DIR [extra sweep options]
#   DATA: a dataset directory (e.g. ../shared/data/coco128) or "synthetic" for the embedded default
#   e.g. benchmarks/boards/pretrained_board.sh ../shared/data/coco128 board_coco128 --address local
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 2 ]; then sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
D=$1; O=$2; shift 2
W=${WEAKBENCH:-weakbench}
data=(); [ "$D" != synthetic ] && data=(--data "$D")
common=("${data[@]}" -o "$O" --max-concurrent 1 --no-baselines "$@")
head=(--set classifier_init=random --set lr=0.01 --set backbone_lr_mult=0.1 --set epochs=10)
$W sweep search_spaces/center_gaussian.yaml "${common[@]}" --set input_size=224 --trials 5 --searcher random
$W sweep search_spaces/whole_image.yaml "${common[@]}" --set input_size=224 --trials 1
$W sweep search_spaces/cam_imagenet.yaml "${common[@]}" "${head[@]}" --trials 3
$W sweep search_spaces/minmaxcam_imagenet.yaml "${common[@]}" "${head[@]}" --set batch_size=20 --trials 3
$W sweep search_spaces/puzzlecam_imagenet.yaml "${common[@]}" "${head[@]}" --trials 3
$W sweep search_spaces/topgap_imagenet.yaml "${common[@]}" --set epochs=10 --trials 3
$W leaderboard -o "$O"
