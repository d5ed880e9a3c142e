"""scripts/sweep.py tabulates runs and counts the seeds that reach the success threshold."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def fake_run(folder, iou):
    folder.mkdir(parents=True)
    seg = dict(test=dict(iou=iou, dice=iou), gen_mask_area=0.3)
    (folder / "results.json").write_text(json.dumps(dict(segmentation=seg)))
    (folder / "stats.jsonl").write_text(json.dumps(dict(flags=["swapped"] if iou < 0.5 else [])) + "\n")


@pytest.mark.slow
def test_sweep_table_counts_successes(tmp_path):
    for seed, iou in enumerate([0.9, 0.3, 0.95]):
        fake_run(tmp_path / f"default-seed{seed}", iou)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--table-only", "--seeds", "0", "1", "2", "3",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "default-seed1" in r.stdout and "swapped" in r.stdout and "no results.json" in r.stdout
    assert "default: 2/3 seeds reach IoU >= 0.85" in r.stdout
