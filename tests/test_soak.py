"""tools/soak.py in brief: random request lifecycles from several threads, then its own checks
(no leaked KV block, sampled requests equal their solo runs, bounded memory growth)."""

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "tools" / "soak.py"


def test_short_soak_passes_its_checks():
    r = subprocess.run(
        [sys.executable, str(SOAK), "--lifecycles", "120", "--threads", "3", "--check-every", "10",
         "--max-rss-growth", "0.25"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("soak: 120 lifecycles") and "0 differ" in summary
    assert "preemptions 0," not in summary  # the small KV budget did force preemption
