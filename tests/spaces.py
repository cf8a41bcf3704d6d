"""Search-space files for the sweep tests.

``search_spaces/cam.yaml`` (the README's main job) runs three seeds per configuration, the fewest
with which the board calls a verdict. The fault, chaos and tracking tests count trials per
configuration and were written for two; :func:`cam_space` writes the same space with its seed axis
cut to the seeds a test asks for, so those tests keep their trial counts (and their run time)
while every other value still comes from the one file.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cam_space(directory: Path, seeds: tuple[int, ...] = (0, 1)) -> str:
    """Write ``search_spaces/cam.yaml`` with ``seed: {grid: [seeds]}`` into ``directory``; return its path."""
    lines = (REPO / "search_spaces" / "cam.yaml").read_text().splitlines()
    axis = f"  seed: {{grid: [{', '.join(str(s) for s in seeds)}]}}"
    cut = [axis if line.startswith("  seed:") else line for line in lines]
    if cut == lines:
        raise AssertionError("search_spaces/cam.yaml has no '  seed:' axis to cut")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"cam_seeds_{'_'.join(str(s) for s in seeds)}.yaml"
    path.write_text("\n".join(cut) + "\n")
    return str(path)
