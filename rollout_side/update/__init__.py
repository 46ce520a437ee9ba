"""The update lifecycle: what a rollout holds and serves, and how a new version gets there.

An update is announced, staged, verified and swapped in here (receiver.py over the transition table
in lifecycle.py, which also holds what is served: served.py, the one record the gate, GetStatus and
health read); its bytes come from chunks (incoming.py, staging.py), a delta against the committed
version (delta_base.py) or a co-located trainer's file (version_file.py). core.py is the WeightSync
calls as one object, free of protobuf; resume.py and reaper.py decide what becomes of an update whose
trainer went away; standalone.py commits weights read from disk at boot.
"""
