"""Ray job entrypoint for the whole run:
`ray job submit --working-dir . -- python jobs/pipeline.py -c jobs/configs/local.yaml [k=v ...]`."""
from cft_ray.cli import job

if __name__ == "__main__":
    job("run")
