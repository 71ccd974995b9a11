"""Scale-out: a corpus of videos on Ray (`thfm batch`).

inputs.py lists the videos and names their output folders; job.py processes one video and keeps the
run manifest (no Ray); ray_batch.py schedules the videos on a Ray cluster. Ray is imported only
when a run starts, from the `scale` extra.
"""
