"""The sharded (collective) push: every rank of a torch.distributed job sends its own shards.

collective.py runs the push; plan.py says which rank sends which chunk, chunks.py moves the bytes
between ranks, rank_base.py and delta.py are one rank's delta base and the ranks' shared patches,
demo.py is the demo trainer as an FSDP2 job.
"""
