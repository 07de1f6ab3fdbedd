"""A bare Flask app whose one route only answers 200: the web stack's ceiling.

bench/ingest.py serves it with gunicorn from the project folder, so the
same gunicorn.conf.py (workers, timeouts, logging) applies as to the service.
"""

from flask import Flask

app = Flask(__name__)


@app.post("/webhooks/instagram")
def receive():
    """Answer 200 and do nothing else."""
    return "ok", 200
