"""``python -m finetune.serve``: a real-time prediction service for a fine-tuned model.

It speaks the Open Inference Protocol (KServe v2, Triton's HTTP/REST API: ``tritonclient.http`` works
unchanged), answers ``POST /predict`` (a multipart upload -> JSON top-k) and serves a page at ``/``.
What it answers for an image is what ``python -m finetune.predict`` writes for the same file
(`finetune.serve.model`). Requests that arrive together run as one batch (`finetune.serve.batching`);
``/metrics`` is Prometheus text (`finetune.serve.metrics`). Needs ``pip install 'finetune[serve]'``.
"""
