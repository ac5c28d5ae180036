"""The job entrypoints (jobs/*.py): each names a stage, none shadows a standard-library module.
Submitting them with `ray job submit` and killing the driver is tests/reliability/test_killed_driver.py."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_entrypoints_shadow_no_module_and_name_a_stage():
    """`python jobs/x.py` puts jobs/ first on sys.path: a script named like a standard-library module
    (jobs/select.py did) breaks every import of that module in the job (subprocess imports select)."""
    import re

    from cft_ray.cli import COMMANDS as STAGES

    scripts = sorted((ROOT / "jobs").glob("*.py"))
    assert len(scripts) >= 8
    for f in scripts:
        assert f.stem not in sys.stdlib_module_names, f
        stage = re.search(r'job\("(\w+)"\)', f.read_text()).group(1)
        assert stage in STAGES, f
