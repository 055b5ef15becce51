"""The results half (mtlbench.results) regenerates a leaderboard without torch and without the method registry."""
from __future__ import annotations

import random
import subprocess
import sys
import textwrap

from mtlbench.results.report import write_leaderboard
from mtlbench.testing import fake_record, write_fake_store


def test_leaderboard_regenerates_without_torch_or_registry(tmp_path):
    recs = [fake_record("ecommerce", a, o, s, {"ctr": 0.7 + 0.01 * i, "cvr": 0.6}, noise=0.01,
                        rng=random.Random(f"{a}{o}{s}"))
            for i, (a, o) in enumerate([("single", "ew"), ("mmoe", "ew"), ("mmoe", "pcgrad")]) for s in range(3)]
    runs = write_fake_store(tmp_path / "runs", recs)
    write_leaderboard(runs, tmp_path / "with_torch", formats=("md", "csv", "json", "tex"), plots=False)
    code = textwrap.dedent(f"""
        import sys

        BLOCKED = ("torch", "mtlbench.registry", "mtlbench.metrics", "mtlbench.train", "mtlbench.baselines")

        class Block:  # as if torch and the methods were not installed (sys.modules[name] = None would be read by
            def find_spec(self, name, path=None, target=None):   # scipy's array-API check as a module, and crash)
                if name.split(".")[0] == "torch" or name.startswith(BLOCKED[1:]):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from mtlbench.results.report import write_leaderboard
        write_leaderboard({str(runs)!r}, {str(tmp_path / 'without')!r}, formats=("md", "csv", "json", "tex"))
        assert not any(m.split(".")[0] == "torch" for m in sys.modules)
        print(sorted(m for m in sys.modules if m.startswith("mtlbench")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mtlbench.results.report" in proc.stdout
    for fmt in ("md", "csv", "json", "tex"):
        name = f"leaderboard.{fmt}"
        assert (tmp_path / "without" / name).read_bytes() == (tmp_path / "with_torch" / name).read_bytes(), name
    assert any((tmp_path / "without" / "figures").glob("*.png"))  # the plots need no torch either
