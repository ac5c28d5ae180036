"""Ray job entrypoint of the InstructDiff select stage:
`ray job submit --working-dir . -- python jobs/selection.py -c jobs/configs/instructdiff.yaml [k=v ...]`.
Not `select.py`: a script's directory comes first on sys.path, and that name would shadow the standard
library's `select` module (subprocess imports it), breaking every job started from jobs/."""
from cft_ray.cli import job

if __name__ == "__main__":
    job("select")
