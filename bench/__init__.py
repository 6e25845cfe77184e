"""meshkit's benchmarks: each runs its peer in the same run and writes bench/results/<name>.json."""
