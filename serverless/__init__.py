"""tapmask's CVAT functions: their table (``functions``) and its generator (``generate``).

Deploy data, kept out of the installed package (``backends``).
"""
