"""docs/versions.md names every version range of requirements.txt and the Dockerfile's
container tag, the docs that show the container use that same tag, and CI runs the
lowest-version job (.ci/compat-tests)."""

import os
import re
import subprocess

from helpers import ROOT

DOC = (ROOT / "docs" / "versions.md").read_text()


def _requirements():
    for raw in (ROOT / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
            yield name, spec


def test_every_requirement_range_is_in_the_versions_table():
    rows = [r for r in DOC.splitlines() if r.startswith("|")]
    for name, spec in _requirements():
        hit = [r for r in rows if name in r and f"`{spec}`" in r]
        assert hit, f"docs/versions.md has no table row naming {name} with `{spec}` (requirements.txt)"


def test_container_tag_is_the_one_the_docs_use():
    tag = re.search(r"^FROM nvcr\.io/nvidia/nemo:(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert f"`nvcr.io/nvidia/nemo:{tag}`" in DOC
    for rel in ("README.md", "docs/slurm.md", "conf/launcher/ngc.yaml"):
        used = set(re.findall(r"nemo[:-](\d\d\.\d\d)", (ROOT / rel).read_text()))
        assert used == {tag}, f"{rel} names NeMo container tags {sorted(used)}; the Dockerfile uses {tag}"


def test_ci_runs_the_lowest_version_job():
    script = ROOT / ".ci" / "compat-tests"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert ".ci/compat-tests" in (ROOT / ".ci" / "run").read_text()
