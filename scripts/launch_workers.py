"""Start N local Twinkle workers (one per rank) and print their cluster config: `twinkle-launch` from a checkout.

    python scripts/launch_workers.py --nproc 2 --base-port 50051 --output-root outputs

See twinkle_worker/launch.py (or --help) for every option.
"""

from twinkle_worker.launch import main

if __name__ == "__main__":
    main()
