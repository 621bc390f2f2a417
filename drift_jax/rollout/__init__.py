"""Multi-turn rollouts: the samplers (static and continuous), the episode player, the rollout writer."""
