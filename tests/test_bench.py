"""``netloader bench --quick``, run as a user runs it: every method measured, every load bit-exact.

No timing is asserted (speed is shown by ``make bench``, not tested); only that each measurement exists,
was checked against the source's bytes, and that the report and the markdown are written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ENV
from netloader.bench import MARK_BEGIN, MARK_END, METHODS


def test_quick_bench_measures_every_method_bit_exact(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCH.md"
    stale = f"{MARK_BEGIN}\nSTALE-GENERATED-TEXT\n{MARK_END}"
    markdown.write_text(f"# hand-written intro\n\n{stale}\n\nhand-written outro\n")
    out = subprocess.run(
        [sys.executable, "-m", "netloader", "bench", "--quick", "--out", str(tmp_path / "results"),
         "--markdown", str(markdown), "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=ENV, timeout=280, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [report] = (tmp_path / "results").glob("*.json")
    result = json.loads(report.read_text())

    models = result["models"]
    assert {m["kind"] for m in models.values()} == {"llama", "moe"}
    for key, model in models.items():
        assert model["tensors"] > 0 and model["bytes"] > 0
        for target in ("touched", "fresh") if "fresh" in model else ("touched",):
            assert set(model[target]) == set(METHODS), (key, target)
            for method, stats in model[target].items():
                assert stats["verified"] is True, (key, target, method)
                assert stats["runs"] >= 1 and stats["min"] <= stats["median"] <= stats["max"]
        assert "source_extra_rss_mib" in model["touched"]["netloader"]
    assert any("fresh" in m for m in models.values() if m["kind"] == "moe")
    buckets = [m["buckets"] for m in models.values() if "buckets" in m]
    assert buckets and all(s["verified"] for b in buckets for s in b.values())
    by_k = result["clients"]["by_k"]
    assert set(by_k) == {"1", "2"} and all(s["verified"] for s in by_k.values())
    assert result["live_cost"]["idle_per_s"] > 0
    assert result["live_cost"]["netloader_while_matmul"]["verified"] is True
    assert result["targets"] and all({"target", "value", "goal", "met"} <= set(t) for t in result["targets"])

    text = markdown.read_text()
    assert text.startswith("# hand-written intro") and text.rstrip().endswith("hand-written outro")
    assert "STALE-GENERATED-TEXT" not in text and "netloader `load_weights`" in text and "### Targets" in text
