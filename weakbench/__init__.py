"""weakbench: sweeps and leaderboards for weakly supervised localisation and segmentation."""

__version__ = "0.1.0"
