"""Every malformed file and image of tests/malformed.py ends in its documented error, under a memory cap."""
import json
import subprocess
import sys
from pathlib import Path

MALFORMED = Path(__file__).with_name("malformed.py")


def test_every_malformed_input_gets_the_documented_error(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    # A subprocess: the memory cap (RLIMIT_AS) must not bind pytest, and a hang must end (the timeout).
    run = subprocess.run([sys.executable, str(MALFORMED), str(folder)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) >= 150 and len({r["name"] for r in rows}) == len(rows)
    wrong = [f"{r['name']}: {r['outcome']} (expected {r['expected']}): {r['message'][:300]}" for r in rows if not r["ok"]]
    assert not wrong, "\n".join(wrong)
    unnamed = [r["name"] for r in rows if r["path"] is not None and r["path"] not in r["message"]]
    assert not unnamed, unnamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]  # nothing written beside the case folder
