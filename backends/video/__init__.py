"""Video: decoding frames for trackers."""
