"""Running the server as several replicas on Ray Serve (``lora-server serve-ray``, ``deploy/ray/``).

Only ``ray_app``, ``engine_replica``, ``ingress`` and ``directory`` import Ray (the optional extra
``pip install -e '.[ray]'``); ``forwarding``, ``routing`` and ``replica_metrics`` are plain Python, tested without a
cluster. See docs/deploy.md.
"""
