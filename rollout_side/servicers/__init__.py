"""gRPC servicers: proto in, one call into a core (rollout_side/updates.py, generation.py), proto out."""
