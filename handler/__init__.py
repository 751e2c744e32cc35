"""RunPod serverless worker for SHARP: one photo in a job, one 3D Gaussian splat out.

`python -m handler` starts the worker; see `handler.__main__` and the README.
"""
