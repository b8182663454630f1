"""What a run needs started: its Prefect server, Ray, and its engines early, beside each other."""
