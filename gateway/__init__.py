"""The network edge and orchestration: config, CLI, projects, DIMSE, pulls."""
