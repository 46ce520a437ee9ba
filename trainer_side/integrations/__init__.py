"""Glue between RL training frameworks and weightsync: trl.py makes weightsync a rollout backend of TRL's
GRPOTrainer. A module here imports its framework, so import it only with that extra installed
(`pip install weightsync[trl]`); it builds only on trainer_side's Publisher and weightsync's Generate client.
"""
