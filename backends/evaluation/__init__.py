"""Interactive-segmentation evaluation: the standard NoC protocol (clicker, datasets, loop)."""
