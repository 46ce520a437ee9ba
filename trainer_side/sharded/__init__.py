"""The sharded (collective) push: every rank of a torch.distributed job sends its own shards.

collective.py runs the push (the steps, and the ranks' agreement on each); placement.py says which rank
holds which rows, plan.py which rank sends which chunk, transport.py sends them to the rollouts and commits
(through trainer_side/session.py, as a plain push does), chunks.py moves the bytes between ranks,
rank_base.py and delta.py are one rank's delta base and the ranks' shared patches, demo.py is the demo
trainer as an FSDP2 job.
"""
