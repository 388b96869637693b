"""What the ops page shows: a sample ring (charts), an event ring (timeline) and a log ring (live logs).

All three are bounded in memory and fed cheaply: counters are read on the event loop, /proc and NVML
in a worker thread, and state changes arrive from the runner's one dispatch point.
"""
