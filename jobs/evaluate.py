"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/evaluate.py -c jobs/configs/local.yaml [k=v ...]`."""
from cft_ray.cli import job

if __name__ == "__main__":
    job("arms")
