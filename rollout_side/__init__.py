"""The rollout server: receives weight versions from a trainer and serves Generate from them."""
