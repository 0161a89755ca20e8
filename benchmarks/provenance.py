"""Where a result came from: the fields every benchmark JSON carries (device, date, versions, command)."""

import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """HEAD of the checkout, or $D2DMOE_GIT_SHA where the copy has no .git (the GPU machine's)."""
    if os.environ.get("D2DMOE_GIT_SHA"):  # set on the GPU machine, whose copy may carry a stale .git
        return os.environ["D2DMOE_GIT_SHA"]
    out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if not out.stdout.strip():
        return os.environ.get("D2DMOE_GIT_SHA", "unknown (no .git; set D2DMOE_GIT_SHA)")
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True, cwd=ROOT).stdout
    return out.stdout.strip() + ("+dirty" if dirty.strip() else "")


def provenance(**versions) -> dict:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "torch": torch.__version__, **versions,
            "command": " ".join(["python"] + sys.argv)}
