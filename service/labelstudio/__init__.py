"""Label Studio's ML-backend protocol: the served model pre-annotates a Label Studio project's
tasks (routes.py); the corrected labels train the next model, which the promotion gate and
the hot reload put in its place (docs/labelling.md)."""
