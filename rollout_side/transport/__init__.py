"""The gRPC transport: servicers (proto in, one call into a core, proto out), auth before any
request is read (auth.py), limits per method (registry.py), error details (errors.py), and the relay
that forwards an update's chunks to further rollouts (relay.py).

The cores they call are rollout_side/update/core.py and rollout_side/serving/generation.py.
"""
