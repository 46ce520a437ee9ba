"""`make bench`: weightsync's full sync beside the ways one could move the same weights instead."""
