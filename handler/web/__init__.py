"""The worker's own HTTP server (`SHARP_SERVE=http`), for RunPod's load-balancing endpoints.

`POST /predict` runs the queue worker's pipeline (handler.worker) on a raw image body or on the
queue's JSON input and answers with the file's bytes; `GET /ping` answers 204 while the model
loads and 200 once it serves; `GET /` is a page that shows the splat of a photo.
"""
