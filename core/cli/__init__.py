"""Operations tooling: the `gradwatch` command and what it starts (the one-machine stack, the demo, Grafana
dashboards, run listings)."""
